"""common.maths: the SAE and what it computes."""
