"""common.experiments: running experiments: protocols, tuning, claims."""
