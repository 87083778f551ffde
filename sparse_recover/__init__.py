"""sparse-recover: prune causal LMs, refine the masks, recover accuracy, merge without losing a zero."""

__version__ = "0.1.0"
