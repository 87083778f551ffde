"""User-facing errors. Each class maps to an exit code; the CLI prints one line, no traceback.

Unexpected failures (bugs) are not SparseRecoverError and keep their traceback.
"""


class SparseRecoverError(Exception):
    """Base class: a mistake in the user's input or environment, reported as one line."""

    exit_code = 2


class ConfigError(SparseRecoverError):
    """Bad option, pattern, sparsity, config key or combination of settings."""

    exit_code = 2


class ModelSourceError(SparseRecoverError):
    """Model path missing, alias unknown, hub unreachable, optional package absent."""

    exit_code = 3


class DataError(SparseRecoverError):
    """Calibration or evaluation data missing, empty or unusable."""

    exit_code = 4


class RunDirError(SparseRecoverError):
    """Run directory belongs to another model, is corrupted, or lacks a prerequisite stage."""

    exit_code = 5


class AuditError(SparseRecoverError):
    """An audit found a violation (a pruned weight that is not zero, a broken N:M group...)."""

    exit_code = 6


class NumericalError(SparseRecoverError):
    """Non-finite weights or statistics that make the requested computation meaningless."""

    exit_code = 7
