"""OWL (Yin et al. 2024): outlier-weighted layer-wise sparsity, as luuyin/OWL `lib/prune_all.py` computes it.

Per decoder block, the Wanda score |W_ij| * sqrt(scaler_j) of every linear, flattened and concatenated in
module order; the block's outlier ratio is the share (in percent) of entries above M times their mean
(`check_outlier_mean`). The ratios are min-max scaled into [0, 2*lambda], shifted so their mean is the
target keep ratio 1 - S, and each block is pruned at sparsity 1 - its keep ratio.

Which activations: the reference's first pass runs every block on the *dense* model's activations (it
never prunes during that pass), so the scores use dense propagation; the second pass, the pruning, uses
the usual pruned propagation. Quirks kept: the ratio is in percent (it cancels in the min-max scaling) and
the scaling uses float64 numpy arithmetic. Quirks not needed: the reference clamps a block sparsity <= 0
to 0.01; with lambda <= min(S, 1 - S), which is validated, every block's sparsity stays in [0, 1]. When
every block has the same ratio the reference divides by zero; here every block gets the target.
"""

from __future__ import annotations

import torch

def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Percent of the entries of the concatenated (flattened, CPU, float32) scores above m x their mean."""
    flat = torch.cat([torch.flatten(s.detach().float().cpu()) for s in scores])
    threshold = torch.mean(flat) * m
    return float((flat > threshold).sum().item()) / flat.numel() * 100


def block_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Each block's sparsity from its outlier ratio: keep = minmax(ratio) * 2*lam - mean + (1 - target)."""
    import numpy as np

    arr = np.array(ratios)
    spread = arr.max() - arr.min()
    if spread == 0:
        return [float(target)] * len(ratios)
    arr = (arr - arr.min()) * (1 / spread * lam * 2)
    arr = arr - np.mean(arr) + (1 - target)
    return [float(1 - keep) for keep in arr]
