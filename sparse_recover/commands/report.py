"""`sparse-recover report`: the table (and optionally a plot) of one or more runs (see reporting.py)."""

from __future__ import annotations

from sparse_recover.config import ReportConfig
from sparse_recover.rundir import RunDir


def run(cfg: ReportConfig, rd: RunDir | None = None, *, force: bool = False) -> str:
    """Read-only over `cfg.runs` (plus `rd` when given); `force` is accepted for the common shape."""
    from sparse_recover.reporting import report
    from sparse_recover.runtime import result_output

    runs = list(cfg.runs) + ([str(rd.path)] if rd is not None else [])
    with result_output():  # the table is the result, --quiet too
        return report(runs, fmt=cfg.format, plot_path=cfg.plot, output=cfg.output)
