"""Pruning methods, registered by name in one place.

Each method declares the input statistics it needs (the calibration engine computes only those) and
the comparison group its budget applies to (what `audit` checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from sparse_recover.errors import ConfigError
from sparse_recover.sparsity.masks import ThresholdRule
from sparse_recover.sparsity.patterns import NM, Pattern


@dataclass(frozen=True)
class PruneSettings:
    pattern: Pattern
    rule: ThresholdRule = "exact"
    use_variant: bool = False  # Wanda appendix variant
    blocksize: int = 128  # SparseGPT
    percdamp: float = 0.01  # SparseGPT
    ria_alpha: float = 0.5  # RIA: exponent of the activation norm


@dataclass
class PruneOutcome:
    keep: torch.Tensor  # (out, in) bool for each matrix
    weight: torch.Tensor | None = None  # updated (out, in) weight, or None when only masked
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    statistic: str | None  # name in sparsity.stats.STATISTICS, None for data-free methods
    # fn(weights: list[(out, in)], stat tensor or None, settings) -> list[PruneOutcome]; the list holds
    # the matrices that share one input (and so one statistic)
    fn: Callable[..., list[PruneOutcome]]
    description: str

    def group(self, settings: PruneSettings) -> str:
        """The comparison group whose kept count is exact (audited)."""
        if isinstance(settings.pattern, NM):
            return "nm"
        if settings.rule == "reference":
            return "none"
        return {"magnitude": "matrix", "ria": "matrix", "wanda": "none" if settings.use_variant else "row",
                "sparsegpt": f"block{settings.blocksize}"}.get(self.name, "none")


def _magnitude(weights, stat, settings: PruneSettings):
    from sparse_recover.pruning.magnitude import magnitude_keep

    return [PruneOutcome(keep=magnitude_keep(w, settings.pattern, settings.rule)) for w in weights]


def _wanda(weights, stat, settings: PruneSettings):
    from sparse_recover.pruning.wanda import wanda_keep

    return [PruneOutcome(keep=wanda_keep(w, stat, settings.pattern, settings.use_variant)) for w in weights]


def _ria(weights, stat, settings: PruneSettings):
    from sparse_recover.pruning.ria import ria_keep

    return [PruneOutcome(keep=ria_keep(w, stat, settings.pattern, settings.ria_alpha, settings.rule)) for w in weights]


def _sparsegpt(weights, stat, settings: PruneSettings, fixed_keeps=None):
    """SparseGPT on the matrices sharing one input, stacked; `fixed_keeps` (one mask per matrix) keeps
    given masks and only re-solves the weights (see `sparsegpt_reconstruct`)."""
    from sparse_recover.pruning.sparsegpt import sparsegpt_prune

    def stack(ts):
        return ts[0] if len(ts) == 1 else torch.cat([t.detach() for t in ts], dim=0)

    res = sparsegpt_prune(stack(weights), stat, settings.pattern, blocksize=settings.blocksize,
                          percdamp=settings.percdamp, rule=settings.rule,
                          segments=[w.shape[0] for w in weights],
                          fixed_keep=None if fixed_keeps is None else stack(fixed_keeps))
    outcomes, start = [], 0
    for w in weights:
        stop = start + w.shape[0]
        info = {"damp": res.damp, "cholesky_retries": res.retries, "dead_columns": res.dead_columns,
                "obs_error": float(res.row_losses[start:stop].sum())}
        outcomes.append(PruneOutcome(keep=res.keep[start:stop], weight=res.weight[start:stop], info=info))
        start = stop
    return outcomes


def sparsegpt_reconstruct(weights, hessian, keeps, settings: PruneSettings) -> list[PruneOutcome]:
    """Keep the given masks and re-solve the kept weights of matrices sharing one input with SparseGPT's
    column-wise OBS updates (a mask from Wanda, OWL, RIA or DSnoT -> a reconstructed checkpoint)."""
    return _sparsegpt(weights, hessian, settings, fixed_keeps=keeps)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("magnitude", None, _magnitude, "|W|, one threshold per matrix (data-free)"),
        Method("wanda", "sq_norm", _wanda, "|W| * input norm, per output row"),
        Method("sparsegpt", "hessian", _sparsegpt, "OBS reconstruction with adaptive masks"),
        Method("ria", "sq_norm", _ria, "relative importance * input norm ** a, per matrix"),
    )
}


def get_method(name: str) -> Method:
    key = str(name).strip().lower()
    if key not in METHODS:
        raise ConfigError(f"unknown prune method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[key]
