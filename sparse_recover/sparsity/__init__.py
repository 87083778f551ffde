"""Sparsity patterns, mask selection and statistics. Masks are torch.bool, shaped (out, in), True = keep."""

from sparse_recover.sparsity.patterns import NM, Pattern, Unstructured, parse_pattern

__all__ = ["NM", "Pattern", "Unstructured", "parse_pattern"]
