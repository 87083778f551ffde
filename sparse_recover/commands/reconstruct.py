"""`sparse-recover reconstruct`: re-solve the kept weights of a stored mask with SparseGPT into
RUN/reconstruct (see engine/reconstruct.py)."""

from __future__ import annotations

from typing import Any

from sparse_recover.config import ReconstructConfig
from sparse_recover.rundir import RunDir


def run(cfg: ReconstructConfig, rd: RunDir, *, force: bool = False) -> dict[str, Any]:
    from sparse_recover.engine import reconstruct as engine
    from sparse_recover.runtime import quiet_libraries

    quiet_libraries()
    req = engine.prepare(cfg, rd)
    if not rd.guard("reconstruct", req.requested(), force=force, summary=f" (masks of {req.source_stage})"):
        return rd.stage_entry("reconstruct")
    return engine.reconstruct_stage(req, rd)
