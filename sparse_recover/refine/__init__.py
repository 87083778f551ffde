"""Mask refinement after pruning: pure tensor functions that change which weights are kept, never their values."""

from sparse_recover.refine.dsnot import (
    DSnoTResult,
    DSnoTSettings,
    ReconstructionError,
    dsnot_contribution,
    dsnot_initial_keep,
    dsnot_refine,
    reconstruction_error,
)

__all__ = [
    "DSnoTResult",
    "DSnoTSettings",
    "ReconstructionError",
    "dsnot_contribution",
    "dsnot_initial_keep",
    "dsnot_refine",
    "reconstruction_error",
]
