"""Patterns (N:M = keep N of M) and mask selection in each comparison group."""

import pytest
import torch

from sparse_recover.errors import ConfigError
from sparse_recover.sparsity.masks import keep_nm, keep_per_matrix, keep_per_row, nm_group_counts
from sparse_recover.sparsity.patterns import NM, Unstructured, parse_pattern


def test_nm_means_keep_n_of_m():
    assert parse_pattern("2:4") == NM(2, 4)
    assert parse_pattern("2:4").sparsity == 0.5
    assert parse_pattern("4:8").sparsity == 0.5
    # The hardware / paper meaning: 2:8 keeps 2 of 8, 75% sparse (the reference code would read 25%).
    assert parse_pattern("2:8").sparsity == 0.75
    assert parse_pattern("2:8").n_prune == 6
    assert parse_pattern("unstructured", 0.6) == Unstructured(0.6)
    assert parse_pattern("2:4", 0.5) == NM(2, 4)


@pytest.mark.parametrize("bad", ["4:2", "0:4", "2-4", "abc", "4:4", "2:", ":4", "1:1", ""])
def test_bad_patterns(bad):
    with pytest.raises(ConfigError):
        parse_pattern(bad, 0.5 if bad == "" else None)


@pytest.mark.parametrize("s", [0, 1, 1.5, -0.1])
def test_bad_sparsity(s):
    with pytest.raises(ConfigError):
        parse_pattern("unstructured", s)


def test_sparsity_contradicting_nm():
    with pytest.raises(ConfigError, match="contradicts"):
        parse_pattern("2:4", 0.6)
    with pytest.raises(ConfigError, match="needs --sparsity"):
        parse_pattern("unstructured")


def _scores(rows=16, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, cols, generator=g)


@pytest.mark.parametrize("s", [0.3, 0.5, 0.6, 0.77])
def test_per_row_exact_counts(s):
    score = _scores()
    keep = keep_per_row(score, int(score.shape[1] * s))
    assert keep.dtype == torch.bool and keep.shape == score.shape
    assert (keep.sum(1) == score.shape[1] - int(score.shape[1] * s)).all()
    # the pruned entries are the lowest of each row
    for r in range(score.shape[0]):
        assert score[r][~keep[r]].max() <= score[r][keep[r]].min()


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_per_matrix_exact_and_reference_rule(s):
    score = _scores()
    k = int(score.numel() * s)
    keep = keep_per_matrix(score, k, "exact")
    assert int((~keep).sum()) == k
    assert score[~keep].max() <= score[keep].min()
    ref = keep_per_matrix(score, k, "reference")
    # the reference prunes every score <= sorted[k]: one more entry (no ties here)
    assert int((~ref).sum()) == k + 1
    assert (ref <= keep).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (2, 8), (1, 4), (3, 4)])
def test_nm_every_group(n, m):
    score = _scores(8, 64)
    keep = keep_nm(score, NM(n, m))
    counts = nm_group_counts(keep, m)
    assert (counts == n).all()
    grouped = score.view(8, 64 // m, m)
    kg = keep.view(8, 64 // m, m)
    lowest_kept = torch.where(kg, grouped, torch.full_like(grouped, 2.0)).min(-1).values
    highest_pruned = torch.where(~kg, grouped, torch.full_like(grouped, -1.0)).max(-1).values
    assert (highest_pruned <= lowest_kept).all()


def test_ties_break_deterministically_by_column():
    score = torch.zeros(3, 8)
    keep = keep_per_row(score, 4)
    assert (keep[:, :4] == False).all() and (keep[:, 4:] == True).all()  # noqa: E712
    keep = keep_nm(score, NM(2, 4))
    assert keep[0].tolist() == [False, False, True, True] * 2
    keep = keep_per_matrix(score, 5)
    assert (~keep).flatten().nonzero().flatten().tolist() == [0, 1, 2, 3, 4]


def test_nm_width_not_divisible():
    with pytest.raises(ConfigError):
        keep_nm(torch.rand(2, 6), NM(2, 4))


@pytest.mark.parametrize("seed", range(5))
def test_linear_time_selection_equals_stable_sort_with_many_ties(seed):
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 7, (9, 40), generator=g).float()  # heavy ties, like 4-bit weights
    for k in (0, 1, 13, 20, 39, 40):
        keep = keep_per_row(score, k)
        ref = torch.ones_like(keep)
        if k:
            ref.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], False)
        assert torch.equal(keep, ref), k
        keep = keep_per_matrix(score, k)
        ref = torch.ones(score.numel(), dtype=torch.bool)
        ref[torch.sort(score.flatten(), stable=True).indices[:k]] = False
        assert torch.equal(keep, ref.view_as(score)), k


def test_hub_calibration_sources_fail_closed_offline(monkeypatch):
    """c4 / wikitext2 are real hub loaders: offline they fail with one clear DataError, never fall back.
    (How long failing takes, next to loading the built-in corpus: scripts/bench_masks.py.)"""
    from sparse_recover.data import calibration_corpus, evaluation_text
    from sparse_recover.errors import DataError

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="allenai/c4"):
        calibration_corpus("c4")
    with pytest.raises(DataError, match="wikitext-2-raw-v1"):
        evaluation_text("wikitext2")


def test_yaml_keeps_nm_patterns_as_strings(tmp_path):
    from sparse_recover.config import PruneConfig, apply_overrides, load_yaml, validate

    path = tmp_path / "c.yaml"
    path.write_text("model: {model: m}\nprune: {method: wanda, pattern: 2:4}\ncalib: {nsamples: 8, seqlen: 64}\n")
    data = load_yaml(str(path))
    assert data["prune"]["pattern"] == "2:4" and data["calib"]["nsamples"] == 8
    data = apply_overrides(data, ["prune.pattern=4:8", "calib.seed=3", "prune.percdamp=0.1"])
    cfg = validate(PruneConfig, data)
    assert cfg.prune.pattern == "4:8" and cfg.calib.seed == 3 and cfg.prune.percdamp == 0.1
    with pytest.raises(ConfigError, match="prune.patern: unknown key"):
        validate(PruneConfig, {"model": {"model": "m"}, "prune": {"patern": "2:4"}})


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (8, 16), (16, 32)])
@pytest.mark.parametrize("seed", range(3))
def test_nm_rank_selection_equals_stable_sort(n, m, seed):
    """keep_nm ranks groups by pairwise comparisons for M <= 16; the mask is that of a stable sort of each group
    (lower column pruned first among equal scores), with heavy ties, zeros and NaN (sorted last)."""
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 4, (16, 4 * m), generator=g).float()
    score[0] = 0.0
    if seed == 2:
        score[3, 1] = float("nan")
    grouped = score.view(16, 4, m)
    idx = torch.sort(grouped, dim=2, stable=True).indices[..., : m - n]  # N:M keeps N: prune the M - N lowest
    expected = torch.ones_like(grouped, dtype=torch.bool).scatter_(2, idx, False).view(16, 4 * m)
    assert torch.equal(keep_nm(score, NM(n, m)), expected)
