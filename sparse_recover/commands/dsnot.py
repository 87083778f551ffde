"""`sparse-recover dsnot`: DSnoT mask refinement of RUN/prune into RUN/dsnot (see engine/dsnot.py)."""

from __future__ import annotations

from typing import Any

from sparse_recover.config import DsnotConfig
from sparse_recover.rundir import RunDir


def run(cfg: DsnotConfig, rd: RunDir, *, force: bool = False) -> dict[str, Any]:
    from sparse_recover.engine import dsnot as engine
    from sparse_recover.runtime import quiet_libraries

    quiet_libraries()
    req = engine.prepare(cfg, rd)
    if not rd.guard("dsnot", req.requested(), force=force, summary=f" (init {req.init}, {cfg.dsnot.targets})"):
        return rd.stage_entry("dsnot")
    if force:  # starting over: an interrupted pass's snapshot is not resumed
        from sparse_recover.engine.snapshot import discard_snapshot

        discard_snapshot(rd, "dsnot")
    return engine.dsnot_stage(req, rd)
