"""`sparse-recover eval`: perplexity and lm-eval tasks on one stage (see engine/evaluate.py)."""

from __future__ import annotations

from typing import Any

from sparse_recover.config import EvalCommandConfig
from sparse_recover.rundir import RunDir


def run(cfg: EvalCommandConfig, rd: RunDir, *, force: bool = False) -> dict[str, Any]:
    from sparse_recover.engine import evaluate as engine
    from sparse_recover.runtime import quiet_libraries

    quiet_libraries()
    req = engine.prepare(cfg, rd)
    return engine.eval_stage(req, rd, force=force)
