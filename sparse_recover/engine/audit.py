"""The audit engine: check every checkpoint stage of a run against its stored masks and its record."""

from __future__ import annotations

from typing import Any

from sparse_recover.errors import RunDirError
from sparse_recover.rundir import RunDir
from sparse_recover.stages import CHECKPOINT_STAGES


def stages_to_audit(rd: RunDir, stages: list[str] | None) -> list[str]:
    rd.require_run()
    if stages:
        for s in stages:
            if s not in CHECKPOINT_STAGES:
                raise RunDirError(f"unknown stage {s!r}: audit checks {', '.join(CHECKPOINT_STAGES)}")
            rd.require(s)
        return list(stages)
    present = [s for s in CHECKPOINT_STAGES if rd.is_complete(s)]
    if not present:
        raise RunDirError(f"run directory {rd.path} has no completed checkpoint stage to audit: "
                          "run `sparse-recover prune` first")
    return present


def audit_stage(rd: RunDir, stage: str) -> dict[str, Any]:
    """The audit report of RUN/<stage>: what the record promises, checked against the files."""
    from sparse_recover.sparsity.audit import Expectation, audit_checkpoint
    from sparse_recover.sparsity.io import MASKS_FILE, load_masks

    rec = rd.record(stage)
    reference = None
    origin = (rec.model_extra or {}).get("from", "prune")
    if rec.group == "prune-rows" and rd.is_complete(origin):
        reference, _ = load_masks(rd.stage_dir(origin) / MASKS_FILE)
    layers = rec.sparsity.layers if rec.sparsity else {}
    expect = Expectation(pattern=rec.parsed_pattern(), group=rec.group or "none", group_size=rec.group_size,
                         masks_sha256=rec.masks_sha256,
                         pruned_layers=[k for k, v in layers.items() if "shape" in v],
                         layer_targets={k: float(v["target"]) for k, v in layers.items() if "target" in v})
    return audit_checkpoint(rd.stage_dir(stage), expect, row_reference=reference)


def stage_line(stage: str, r: dict[str, Any]) -> str:
    """The one-line audit result of a stage."""
    status = "ok" if r["ok"] else f"{len(r['violations'])} violation(s)"
    return (f"audit {stage}: {r.get('linears', 0)} linears, overall sparsity {r.get('overall_sparsity', 0):.4%}, "
            f"{r.get('pruned_nonzero', 0)} pruned weights non-zero: {status}")


def log_report(rd: RunDir, results: dict[str, dict[str, Any]]) -> None:
    """RUN/logs/audit.log: one block per audit, each stage's line and every violation."""
    from sparse_recover.engine.stageio import write_log

    lines = []
    for stage, r in results.items():
        lines.append("  " + stage_line(stage, r))
        lines += [f"    violation: {v}" for v in r["violations"]]
    ok = all(r["ok"] for r in results.values())
    write_log(rd, "audit", f"audit {', '.join(results)}: {'ok' if ok else 'FAILED'}", lines)
