"""`sparse-recover run CONFIG.yaml`: a whole pipeline from one YAML (see pipeline.py), or with
--dry-run its plan and memory estimates (pipeline.dry_run)."""

from __future__ import annotations

from typing import Any

from sparse_recover.config import RunConfig
from sparse_recover.rundir import RunDir


def run(cfg: RunConfig, rd: RunDir | None, *, force: bool = False) -> dict[str, Any]:
    from sparse_recover.pipeline import dry_run, run_pipeline, select
    from sparse_recover.runtime import quiet_libraries, result_output

    selected = select(cfg.pipeline, cfg.from_stage, cfg.until)
    if cfg.dry_run:
        with result_output():  # the plan is the result, --quiet too
            return dry_run(cfg.pipeline, rd, selected)
    quiet_libraries()
    return run_pipeline(cfg.pipeline, rd, selected, force=force, config_file=cfg.config_file)
