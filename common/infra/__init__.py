"""common.infra: data and plumbing: datasets, activations, streams, output folders, ranks, interop."""
