"""Sparsity patterns.

N:M here means KEEP N of every M consecutive input weights of a row (the hardware meaning):
2:4 and 4:8 are 50% sparse, 2:8 is 75% sparse. The reference Wanda/SparseGPT/DSnoT code reads
"N:M" as *prune* N of M; the two readings agree only when N = M/2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sparse_recover.errors import ConfigError


@dataclass(frozen=True)
class Unstructured:
    sparsity: float

    @property
    def name(self) -> str:
        return "unstructured"

    @property
    def spec(self) -> str:
        """One round-trippable string: `unstructured:0.5` (parse_pattern reads it back)."""
        return f"unstructured:{self.sparsity!r}"

    def n_prune(self, numel: int) -> int:
        # int(numel * s), exactly as the reference code computes its counts.
        return int(numel * self.sparsity)

    def describe(self) -> str:
        return f"unstructured {self.sparsity:.2%}"


@dataclass(frozen=True)
class NM:
    n: int  # kept per group
    m: int  # group size along the input dimension

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def spec(self) -> str:
        return self.name

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    @property
    def n_prune(self) -> int:
        return self.m - self.n

    def describe(self) -> str:
        return f"{self.n}:{self.m} (keep {self.n} of every {self.m}, {self.sparsity:.2%} sparse)"


Pattern = Unstructured | NM

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str, sparsity: float | None = None) -> Pattern:
    """Parse `unstructured` (with `sparsity`), `unstructured:S` (a pattern's `spec`) or `N:M` (keep N of M).
    Raises ConfigError with one line."""
    text = str(pattern).strip().lower()
    if text.startswith("unstructured:"):
        value = text.partition(":")[2]
        try:
            embedded = float(value)
        except ValueError:
            raise ConfigError(f"invalid pattern {pattern!r}: use 'unstructured:S' with 0 < S < 1") from None
        if sparsity is not None and abs(float(sparsity) - embedded) > 1e-12:
            raise ConfigError(f"--sparsity {sparsity} contradicts --pattern {pattern}")
        text, sparsity = "unstructured", embedded
    if text == "unstructured":
        if sparsity is None:
            raise ConfigError("--pattern unstructured needs --sparsity S with 0 < S < 1")
        _check_sparsity(sparsity)
        return Unstructured(float(sparsity))
    match = _NM_RE.match(text)
    if not match:
        raise ConfigError(
            f"invalid pattern {pattern!r}: use 'unstructured' or 'N:M' (keep N of every M, e.g. 2:4)"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if m < 2 or n < 1 or n >= m:
        raise ConfigError(
            f"invalid N:M pattern {pattern!r}: N:M keeps N of every M weights, so it needs 1 <= N < M (e.g. 2:4, 4:8, 2:8)"
        )
    nm = NM(n, m)
    if sparsity is not None:
        _check_sparsity(sparsity)
        if abs(float(sparsity) - nm.sparsity) > 1e-9:
            raise ConfigError(
                f"--sparsity {sparsity} contradicts --pattern {nm.name}, which keeps {n} of every {m} "
                f"weights ({nm.sparsity:g} sparsity); drop --sparsity or change the pattern"
            )
    return nm


def _check_sparsity(sparsity: float) -> None:
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ConfigError(f"sparsity must be a number between 0 and 1, got {sparsity!r}") from None
    if not (0.0 < value < 1.0):
        raise ConfigError(f"sparsity must be strictly between 0 and 1, got {sparsity}")
