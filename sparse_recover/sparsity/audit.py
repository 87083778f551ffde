"""Audit a checkpoint against its stored masks, without loading a model.

Per linear: sparsity of the mask, N:M compliance (exactly N kept in every aligned group), the
method's comparison-group budget (same kept count in every row / matrix / column block), and that
every pruned position of the checkpoint is exactly zero. A weight that is zero but kept is fine
(pre-existing zeros, e.g. from a 4-bit source); a pruned weight that is not zero is a violation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparse_recover.sparsity.io import MASKS_FILE, CheckpointTensors, MaskDigest, load_masks, sorted_items
from sparse_recover.sparsity.masks import nm_group_counts
from sparse_recover.sparsity.patterns import NM, Pattern, Unstructured


@dataclass
class Expectation:
    """What a checkpoint promises: its pattern, the comparison group whose kept count is exact
    (matrix, row, block of `group_size` columns, nm, prune-rows or none), the masks' hash, and the
    linears that were pruned."""

    pattern: Pattern | None = None
    group: str = "none"
    group_size: int | None = None
    masks_sha256: str | None = None
    pruned_layers: list[str] = field(default_factory=list)
    layer_targets: dict[str, float] = field(default_factory=dict)  # a layer-wise profile (OWL): per-linear target


def _budget_ok(keep: torch.Tensor, group: str, pattern, group_size: int | None = None) -> bool | None:
    """Whether every comparison group holds the exact kept count the method guarantees."""
    if isinstance(pattern, NM) or group in ("none", "nm", ""):
        return None
    rows, cols = keep.shape
    s = pattern.sparsity
    if group == "row":
        return bool((keep.sum(dim=1) == cols - int(cols * s)).all())
    if group == "matrix":
        return int(keep.count_nonzero()) == keep.numel() - int(keep.numel() * s)
    if group == "block" and group_size:
        b = group_size
        for c0 in range(0, cols, b):
            blk = keep[:, c0 : c0 + b]
            if int(blk.count_nonzero()) != blk.numel() - int(blk.numel() * s):
                return False
        return True
    return None


def audit_checkpoint(folder: Path, expect: Expectation | None = None,
                     row_reference: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Audit a checkpoint folder against its masks.safetensors and what it promises; returns a report
    with per-linear rows and a list of violations.

    row_reference: masks of an earlier stage whose per-row kept counts this stage must preserve
    (a refinement such as DSnoT from a stored mask, group "prune-rows").
    """
    folder = Path(folder)
    expect = expect or Expectation()
    report: dict[str, Any] = {"folder": str(folder), "layers": {}, "violations": []}
    masks_path = folder / MASKS_FILE
    if not masks_path.is_file():
        report["violations"].append(f"{masks_path} is missing")
        return report
    masks, meta = load_masks(masks_path)
    transposed = set(json.loads(meta.get("transposed", "[]")))
    pattern, group = expect.pattern, expect.group
    digest = MaskDigest()  # the hash is taken in the same pass as the checks: every mask is read once
    tensors = CheckpointTensors(folder)  # a damaged checkpoint is one line naming the file (RunDirError, exit 5)
    for key in sorted(set(expect.pruned_layers) - set(masks)):
        report["violations"].append(f"{key}: no stored mask")
    total = kept_total = revived_total = 0
    for key, keep in sorted_items(masks):
        digest.update(key, keep)
        weight = tensors.get(key)
        row: dict[str, Any] = {}
        if weight is None:
            report["violations"].append(f"{key}: mask has no weight in the checkpoint")
            continue
        w = weight.t() if key in transposed else weight
        if tuple(w.shape) != tuple(keep.shape):
            report["violations"].append(f"{key}: mask shape {tuple(keep.shape)} != weight shape {tuple(w.shape)}")
            continue
        revived = int(((w != 0) & ~keep).count_nonzero())
        incidental = int(((w == 0) & keep).count_nonzero())
        kept = int(keep.count_nonzero())  # no int64/float copy of a 4096 x 11008 mask
        row["shape"] = list(keep.shape)
        row["sparsity"] = round(1 - kept / keep.numel(), 6)
        row["pruned_nonzero"] = revived
        row["kept_zero"] = incidental
        if revived:
            report["violations"].append(f"{key}: {revived} pruned weights are not zero")
        if isinstance(pattern, NM):
            if keep.shape[1] % pattern.m:
                report["violations"].append(f"{key}: width {keep.shape[1]} not divisible by M={pattern.m}")
            else:
                counts = nm_group_counts(keep, pattern.m)
                bad = int((counts != pattern.n).sum())
                row["nm_bad_groups"] = bad
                if bad:
                    report["violations"].append(f"{key}: {bad} groups break {pattern.name}")
        if group == "prune-rows" and row_reference is not None and key in row_reference:
            budget = bool(torch.equal(keep.sum(dim=1), row_reference[key].sum(dim=1)))
        else:
            own = Unstructured(expect.layer_targets[key]) if key in expect.layer_targets else pattern
            budget = _budget_ok(keep, group, own, expect.group_size) if own is not None else None
        if budget is not None:
            row["budget_ok"] = budget
            if not budget:
                report["violations"].append(f"{key}: kept counts differ across its {group} comparison groups")
        total += keep.numel()
        kept_total += kept
        revived_total += revived
        report["layers"][key] = row
    if expect.masks_sha256 and expect.masks_sha256 != digest.hexdigest():
        report["violations"].insert(0, "masks.safetensors does not match the hash recorded in the manifest")
    report["overall_sparsity"] = round(1 - kept_total / total, 6) if total else 0.0
    report["pruned_nonzero"] = revived_total
    report["linears"] = len(report["layers"])
    report["ok"] = not report["violations"]
    return report
