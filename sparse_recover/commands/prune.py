"""`sparse-recover prune`: calibrate, prune layer by layer, write RUN/prune and the manifest."""

from __future__ import annotations

from typing import Any

from sparse_recover.config import PruneConfig
from sparse_recover.rundir import RunDir


def run(cfg: PruneConfig, rd: RunDir, *, force: bool = False) -> dict[str, Any]:
    from sparse_recover.engine import prune as engine
    from sparse_recover.runtime import quiet_libraries

    quiet_libraries()
    req = engine.prepare(cfg, rd)
    if not rd.guard("prune", req.requested(), force=force, summary=f" ({req.method.name}, {req.pattern.describe()})"):
        return rd.stage_entry("prune")
    if force:  # starting over: an interrupted pass's snapshot is not resumed
        from sparse_recover.engine.snapshot import discard_snapshot

        discard_snapshot(rd, "prune")
    return engine.prune_stage(req, rd)
