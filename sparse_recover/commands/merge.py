"""`sparse-recover merge`: fold the adapters into the sparse checkpoint, reviving nothing, into
RUN/merge (see engine/merge.py)."""

from __future__ import annotations

from typing import Any

from sparse_recover.config import MergeConfig
from sparse_recover.rundir import RunDir


def run(cfg: MergeConfig, rd: RunDir, *, force: bool = False) -> dict[str, Any]:
    from sparse_recover.engine import merge as engine
    from sparse_recover.runtime import quiet_libraries

    quiet_libraries()
    req = engine.prepare(cfg, rd)
    if not rd.guard("merge", req.requested(), force=force, summary=f" ({req.adapter_config['method']} adapters)"):
        return rd.stage_entry("merge")
    return engine.merge_stage(req, rd)
