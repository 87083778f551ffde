"""`sparse-recover audit`: check every checkpoint stage of a run against its stored masks."""

from __future__ import annotations

import json
from typing import Any

from sparse_recover.config import AuditConfig
from sparse_recover.errors import AuditError
from sparse_recover.rundir import RunDir


def run(cfg: AuditConfig, rd: RunDir, *, force: bool = False) -> dict[str, Any]:
    """Audit writes only RUN/logs/audit.log: `force` is accepted for the common command shape and changes nothing."""
    from sparse_recover.engine.audit import audit_stage, log_report, stages_to_audit
    from sparse_recover.runtime import summary

    results = {stage: audit_stage(rd, stage) for stage in stages_to_audit(rd, cfg.audit.stages)}
    ok = all(r["ok"] for r in results.values())
    log_report(rd, results)
    if cfg.audit.json_out:
        summary(json.dumps({"ok": ok, "stages": results}, indent=2))
    else:
        for stage, r in results.items():
            _print_stage(stage, r, cfg.audit.verbose)
    if not ok:
        bad = [s for s, r in results.items() if not r["ok"]]
        raise AuditError(f"audit failed for stage(s) {', '.join(bad)} in {rd.path}")
    return results


def _print_stage(stage: str, r: dict[str, Any], verbose: bool) -> None:
    from sparse_recover.engine.audit import stage_line
    from sparse_recover.runtime import summary

    if verbose:
        for key, row in r["layers"].items():
            flags = "" if not row.get("pruned_nonzero") else f"  {row['pruned_nonzero']} pruned non-zero"
            nm = "" if "nm_bad_groups" not in row else f"  N:M bad groups {row['nm_bad_groups']}"
            print(f"  {key:60s} {row['sparsity']:.4f}{nm}{flags}")
    summary(stage_line(stage, r))
    for v in r["violations"][:20]:
        print(f"  violation: {v}")
