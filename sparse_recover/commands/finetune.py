"""`sparse-recover finetune`: sparsity-preserving fine-tuning of the newest sparse checkpoint into
RUN/finetune (see engine/finetune.py)."""

from __future__ import annotations

from typing import Any

from sparse_recover.config import FinetuneConfig
from sparse_recover.rundir import RunDir


def run(cfg: FinetuneConfig, rd: RunDir, *, force: bool = False) -> dict[str, Any]:
    from sparse_recover.engine import finetune as engine
    from sparse_recover.runtime import quiet_libraries

    quiet_libraries()
    req = engine.prepare(cfg, rd)
    rec = rd.record("finetune")
    recorded = engine.recorded_config(rec) if rec is not None else None
    if not rd.guard("finetune", req.requested(), force=force or cfg.resume, recorded=recorded,
                    summary=f" ({cfg.finetune.method} from {req.stage})"):
        return rd.stage_entry("finetune")
    engine.check_no_partial(req, rd, force)
    return engine.finetune_stage(req, rd)
