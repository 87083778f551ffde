"""`sparse-recover audit`: check every checkpoint stage of a run against its stored masks."""

from __future__ import annotations

import json
from typing import Any

from sparse_recover.errors import AuditError, RunDirError
from sparse_recover.rundir import CHECKPOINT_STAGES, RunDir


def run(run_dir: str, stages: list[str] | None = None, as_json: bool = False, verbose: bool = False) -> dict[str, Any]:
    from sparse_recover.sparsity.audit import audit_checkpoint

    rd = RunDir(run_dir)
    if not rd.exists():
        raise RunDirError(f"{rd.path} is not a run directory (no manifest.json)")
    manifest = rd.read()
    present = [s for s in CHECKPOINT_STAGES if rd.is_complete(s)]
    if stages:
        for s in stages:
            if s not in CHECKPOINT_STAGES:
                raise RunDirError(f"unknown stage {s!r}: audit checks {', '.join(CHECKPOINT_STAGES)}")
            rd.require(s)
        present = stages
    if not present:
        raise RunDirError(f"run directory {rd.path} has no completed checkpoint stage to audit: run `sparse-recover prune` first")
    results = {}
    for stage in present:
        entry = manifest["stages"].get(stage) or {}
        reference = None
        if entry.get("group") == "prune-rows" and rd.is_complete(entry.get("from", "prune")):
            from sparse_recover.sparsity.io import MASKS_FILE, load_masks

            reference, _ = load_masks(rd.stage_dir(entry.get("from", "prune")) / MASKS_FILE)
        results[stage] = audit_checkpoint(rd.stage_dir(stage), entry, row_reference=reference)
    ok = all(r["ok"] for r in results.values())
    if as_json:
        print(json.dumps({"ok": ok, "stages": results}, indent=2))
    else:
        for stage, r in results.items():
            if verbose:
                for key, row in r["layers"].items():
                    flags = "" if not row.get("pruned_nonzero") else f"  {row['pruned_nonzero']} pruned non-zero"
                    nm = "" if "nm_bad_groups" not in row else f"  N:M bad groups {row['nm_bad_groups']}"
                    print(f"  {key:60s} {row['sparsity']:.4f}{nm}{flags}")
            status = "ok" if r["ok"] else f"{len(r['violations'])} violation(s)"
            print(f"audit {stage}: {r.get('linears', 0)} linears, overall sparsity {r.get('overall_sparsity', 0):.4%}, "
                  f"{r.get('pruned_nonzero', 0)} pruned weights non-zero: {status}")
            for v in r["violations"][:20]:
                print(f"  violation: {v}")
    if not ok:
        bad = [s for s, r in results.items() if not r["ok"]]
        raise AuditError(f"audit failed for stage(s) {', '.join(bad)} in {rd.path}")
    return results
