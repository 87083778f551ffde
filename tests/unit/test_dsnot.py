"""DSnoT: statistics, initial mask, refinement invariants, and bit-equivalence with a restatement of the
reference prune_DSnoT loop (zyxxmu/DSnoT lib/prune.py, algorithms.md section 5)."""

import pytest
import torch

from sparse_recover.errors import ConfigError
from sparse_recover.pruning.wanda import wanda_keep
from sparse_recover.refine import DSnoTSettings, dsnot_initial_keep, dsnot_refine, reconstruction_error
from sparse_recover.sparsity.masks import nm_group_counts
from sparse_recover.sparsity.patterns import NM, Unstructured
from sparse_recover.sparsity.stats import STATISTICS, DSnoTStats

CPU = torch.device("cpu")
INF = float("inf")


def _layer(out=32, inp=1024, nseq=8, length=32, seed=0):
    """A random dense weight and DSnoT statistics accumulated one sequence at a time."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * (0.5 + torch.rand(out, 1, generator=g))
    scale = 0.2 + 2 * torch.rand(inp, generator=g)
    mean = 0.5 * torch.randn(inp, generator=g)
    x = torch.randn(nseq, length, inp, generator=g) * scale + mean
    stat = DSnoTStats(inp, CPU)
    for s in range(nseq):
        stat.add(x[s : s + 1])
    return w, stat, x


def _wrapped_gpt(x):
    """Literal restatement of the reference WrappedGPT.add_batch, called once per sequence."""
    cols = x.shape[-1]
    scaler, ssum, var = torch.zeros(cols), torch.zeros(cols), torch.zeros(cols)
    n = ntok = 0
    for s in range(x.shape[0]):
        inp = x[s].reshape(-1, cols).t().float()  # (cols, tokens)
        v = torch.var(inp, dim=1, unbiased=False)
        t = inp.shape[1]
        var = v if ntok == 0 else (var * ntok + v * t) / (ntok + t)
        ntok += t
        scaler *= n / (n + 1)
        ssum *= n / (n + 1)
        n += 1
        scaler += torch.norm(inp, p=2, dim=1) ** 2 / n
        ssum += torch.sum(inp, dim=1) / n
    return scaler, ssum, var


# ---------------------------------------------------------------------------------------------------
# Restatement of the reference prune_DSnoT inner loops (weight_mask True = PRUNED, as in the reference),
# with per-row pointer pairs advanced every cycle for every row. Gathers out of range (where the
# reference crashes) are clamped, and `flagged` marks rows on which the reference leaves its candidate
# lists in a way that matters: a live row reading outside a list, or a stopped row whose rewrite
# changes the mask. Unflagged rows must match our masks bit for bit.
# ---------------------------------------------------------------------------------------------------


def _reorder_indices(t):
    """return_reorder_indice: negatives keep their order, positives are flipped, zeros map to 0."""
    rows, k = t.shape
    base = torch.arange(k, dtype=torch.float64).repeat(rows, 1)
    pos_i, neg_i = base.clone(), base.clone()
    pos_i[~(t > 0)] = INF
    neg_i[~(t < 0)] = INF
    pos_v = torch.flip(torch.sort(pos_i, dim=1)[0], dims=[1])
    neg_v = torch.sort(neg_i, dim=1)[0]
    pos_v[pos_v == INF] = 0
    neg_v[neg_v == INF] = 0
    return (pos_v + neg_v).to(torch.int64)


def _run_lengths(pruned_in_order):
    """Per row: length of the leading and trailing runs of True (python loops, independent of the code)."""
    lo, hi = [], []
    for row in pruned_in_order.tolist():
        a = 0
        while a < len(row) and row[a]:
            a += 1
        b = 0
        while b < len(row) and row[len(row) - 1 - b]:
            b += 1
        lo.append(a)
        hi.append(b)
    return torch.tensor(lo).reshape(-1, 1), torch.tensor(hi).reshape(-1, 1)


def _grow_setup(c, mask, var, pow_):
    rows, cols = c.shape
    regrow = c.clone()
    regrow[~mask] = 0  # scatter 0 at the kept indices
    eps = torch.sum(regrow, dim=1, keepdim=True)
    sigma = torch.sign(eps)
    if pow_:
        regrow /= torch.pow(var.reshape((1, -1)), pow_)
    order = torch.sort(regrow, dim=1, stable=True)[1]
    lo_len, hi_len = _run_lengths(mask.gather(1, order))
    ptr = torch.zeros(rows, 2, dtype=torch.long)
    ptr[:, 1] = cols - 1
    return eps, sigma, order, ptr, lo_len, hi_len


STEP = torch.tensor([[1, -1]])


def ref_unstructured(w, sq_norm, ssum, var, sparsity, max_cycle, thr, pow_, without_same_sign):
    rows, cols = w.shape
    c = w * ssum.reshape((1, -1))
    initial = torch.abs(w) * torch.sqrt(sq_norm.reshape((1, -1)))
    sorted_init = torch.sort(initial, dim=-1, stable=True)[1]
    n_pr = int(cols * sparsity)
    n_res = cols - n_pr
    init_prune, init_res = torch.split(sorted_init, [n_pr, n_res], dim=1)
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask.scatter_(1, init_prune, True)
    eps, sigma, grow_order, gptr, lo_len, hi_len = _grow_setup(c, mask, var, pow_)

    wanda = torch.abs(w) * torch.sqrt(sq_norm.reshape((1, -1)))
    wanda.scatter_(1, init_prune, INF)
    wanda_res = torch.sort(wanda, dim=1, stable=True)[1][:, :n_res]
    c_res = torch.gather(c, 1, wanda_res)
    prune_list = torch.gather(wanda_res, 1, _reorder_indices(c_res))
    n_neg = (c_res < 0).sum(1, keepdim=True)
    n_pos = (c_res > 0).sum(1, keepdim=True)
    pptr = torch.zeros(rows, 2, dtype=torch.long)
    pptr[:, 1] = n_res - 1

    update = torch.ones_like(eps, dtype=torch.bool)
    flagged = torch.zeros(rows, 1, dtype=torch.bool)
    cycle = 0
    while not (torch.all(update == False) or cycle >= max_cycle):  # noqa: E712
        cycle += 1
        gs = (eps > 0).int().to(torch.int64)
        gi = torch.gather(gptr, 1, gs)
        g_oob = (gi < 0) | (gi >= cols)
        r = torch.gather(grow_order, 1, gi.clamp(0, cols - 1))
        c_r = c.gather(1, r)
        gptr.scatter_(1, gs, gi + STEP.expand(rows, 2).gather(1, gs))

        ps = (eps < 0).int().to(torch.int64)
        pi = torch.gather(pptr, 1, ps)
        p_oob = (pi < 0) | (pi >= n_res)
        p = torch.gather(prune_list, 1, pi.clamp(0, n_res - 1))
        c_p = c.gather(1, p)
        pptr.scatter_(1, ps, pi + STEP.expand(rows, 2).gather(1, ps))

        after = eps + c_p - c_r
        live_before = update
        if without_same_sign:
            update = update & (abs(eps) > thr)
        else:
            update = update & (abs(eps) > thr) & (sigma == torch.sign(after))

        in_g = torch.where(gs == 1, gi >= cols - hi_len, gi < lo_len) & ~g_oob
        in_p = torch.where(ps == 1, pi >= n_res - n_pos, pi < n_neg) & ~p_oob
        changes = ~update & (mask.gather(1, p) | ~mask.gather(1, r))
        flagged |= g_oob | p_oob | changes | (live_before & ~(in_g & in_p))

        mask.scatter_(1, p, update)
        mask.scatter_(1, r, ~update)
        eps += torch.where(update, c_p, torch.zeros_like(c_p))
        eps -= torch.where(update, c_r, torch.zeros_like(c_r))
    return ~mask, flagged.reshape(-1)


def ref_nm(w, sq_norm, ssum, var, prune_n, prune_m, max_cycle, thr, pow_):
    """prune_n/prune_m in the reference's convention: prune prune_n of every prune_m."""
    rows, cols = w.shape
    c = w * ssum.reshape((1, -1))
    initial = torch.abs(w) * torch.sqrt(sq_norm.reshape((1, -1)))
    mask = torch.zeros_like(w, dtype=torch.bool)
    init_prune = torch.zeros((rows, 0), dtype=torch.int64)
    init_res = torch.zeros((rows, 0), dtype=torch.int64)
    for ii in range(0, cols, prune_m):
        _, idx = torch.sort(initial[:, ii : ii + prune_m].float(), dim=1)
        idx += ii
        a, b = torch.split(idx, [prune_n, prune_m - prune_n], dim=1)
        init_prune = torch.cat((init_prune, a), dim=1)
        init_res = torch.cat((init_res, b), dim=1)
        mask.scatter_(1, a, True)
    eps, sigma, grow_order, gptr, lo_len, hi_len = _grow_setup(c, mask, var, pow_)
    initial.scatter_(1, init_prune, INF)
    max_plus_one = torch.max(initial, dim=1, keepdim=True)[0] + 1

    update = torch.ones_like(eps, dtype=torch.bool)
    flagged = torch.zeros(rows, 1, dtype=torch.bool)
    cycle = 1
    while not (torch.all(update == False) or cycle > max_cycle):  # noqa: E712
        cycle += 1
        gs = (eps > 0).int().to(torch.int64)
        gi = torch.gather(gptr, 1, gs)
        g_oob = (gi < 0) | (gi >= cols)
        r = torch.gather(grow_order, 1, gi.clamp(0, cols - 1))
        c_r = c.gather(1, r)
        start = r - r % prune_m
        block = torch.arange(0, prune_m).repeat(start.shape[1], 1) + start
        p_val, p = torch.topk(torch.gather(initial, 1, block), 1, dim=1, largest=False)
        p += start
        c_p = c.gather(1, p)
        after = eps + c_p - c_r
        live_before = update
        update = update & (sigma == torch.sign(after)) & (abs(eps) > thr)

        in_g = torch.where(gs == 1, gi >= cols - hi_len, gi < lo_len) & ~g_oob
        changes = ~update & (mask.gather(1, p) | ~mask.gather(1, r))
        flagged |= g_oob | changes | (live_before & ~(in_g & torch.isfinite(p_val)))

        initial.scatter_(1, p, max_plus_one)
        mask.scatter_(1, p, update)
        mask.scatter_(1, r, ~update)
        eps += torch.where(update, c_p, torch.zeros_like(c_p))
        eps -= torch.where(update, c_r, torch.zeros_like(c_r))
        gptr.scatter_(1, gs, gi + STEP.expand(rows, 2).gather(1, gs))
    return ~mask, flagged.reshape(-1)


def _ours(w, stat, pattern, **kw):
    keep0 = dsnot_initial_keep(w, stat.sq_norm, pattern)
    return keep0, dsnot_refine(w, keep0, stat.sq_norm, stat.sum, stat.var, pattern, DSnoTSettings(**kw))


def _nm_ref(w, stat, nm, **kw):
    kw.pop("sign_check", None)  # the N:M path always applies the sign test
    s = DSnoTSettings(**kw)
    return ref_nm(w, stat.sq_norm, stat.sum, stat.var, nm.m - nm.n, nm.m, s.max_cycles, s.threshold,
                  s.pow_var_regrow)


def _un_ref(w, stat, sparsity, **kw):
    s = DSnoTSettings(**kw)
    return ref_unstructured(w, stat.sq_norm, stat.sum, stat.var, sparsity, s.max_cycles, s.threshold,
                            s.pow_var_regrow, without_same_sign=not s.sign_check)


# ---------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------


def test_stats_match_reference_wrapper_and_batching():
    assert STATISTICS["dsnot"] is DSnoTStats
    _, one, x = _layer(inp=48, nseq=6, length=20)
    scaler, ssum, var = _wrapped_gpt(x)
    assert one.value is one.sq_norm and one.nsamples == 6 and one.ntokens == 120
    torch.testing.assert_close(one.sq_norm, scaler, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(one.sum, ssum, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(one.var, var, rtol=1e-6, atol=1e-6)
    for split in ([6], [2, 4], [1, 3, 2]):
        batched = DSnoTStats(48, CPU)
        start = 0
        for b in split:
            batched.add(x[start : start + b])
            start += b
        assert batched.nsamples == 6 and batched.ntokens == 120
        torch.testing.assert_close(batched.sq_norm, one.sq_norm, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(batched.sum, one.sum, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(batched.var, one.var, rtol=1e-6, atol=1e-6)
    # the reference's var is the mean of per-sequence variances, not the pooled variance
    pooled = torch.var(x.reshape(-1, 48), dim=0, unbiased=False)
    per_seq = torch.var(x, dim=1, unbiased=False).mean(0)
    torch.testing.assert_close(one.var, per_seq, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(one.var, pooled, rtol=1e-3)
    # a 2-D input is one sequence
    flat = DSnoTStats(48, CPU)
    flat.add(x[0])
    assert flat.nsamples == 1 and flat.ntokens == 20


def test_reorder_restatement_matches_reference_docstring():
    t = torch.tensor([[1.0, -2.0, 3.0], [-2, 2, -4], [5, 6, -7], [-6, -7, -4]])
    got = torch.gather(t, 1, _reorder_indices(t))
    assert torch.equal(got, torch.tensor([[-2.0, 3.0, 1.0], [-2, -4, 2], [-7, 6, 5], [-6, -7, -4]]))


# ---------------------------------------------------------------------------------------------------
# initial mask
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7), NM(2, 4), NM(1, 4), NM(2, 8)])
def test_initial_keep_equals_wanda(pattern):
    w, stat, _ = _layer(out=16, inp=256)
    assert torch.equal(dsnot_initial_keep(w, stat.sq_norm, pattern), wanda_keep(w, stat.sq_norm, pattern))


# ---------------------------------------------------------------------------------------------------
# equivalence with the reference loop (wide layer: every pointer stays inside its list)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sign_check", [False, True])
def test_unstructured_matches_reference_bit_for_bit(sign_check):
    w, stat, _ = _layer()
    for sparsity in (0.5, 0.6):
        ref_keep, flagged = _un_ref(w, stat, sparsity, sign_check=sign_check)
        assert not flagged.any()  # wide layer: the reference stays inside its lists
        keep0, res = _ours(w, stat, Unstructured(sparsity), sign_check=sign_check)
        assert res.swaps > 0 and res.list_end_rows == 0
        assert not torch.equal(res.keep, keep0)
        assert torch.equal(res.keep, ref_keep)


@pytest.mark.parametrize("nm", [NM(2, 4), NM(4, 8)])
def test_nm_matches_reference_bit_for_bit(nm):
    w, stat, _ = _layer()
    ref_keep, flagged = _nm_ref(w, stat, nm)
    assert not flagged.any()
    keep0, res = _ours(w, stat, nm)
    assert res.swaps > 0 and res.list_end_rows == 0 and res.skipped_groups == 0
    assert torch.equal(res.keep, ref_keep)


def test_matches_reference_with_other_settings():
    w, stat, _ = _layer(seed=3)
    for kw in (dict(pow_var_regrow=0.0), dict(pow_var_regrow=2.0, max_cycles=20), dict(threshold=200.0)):
        ref_keep, flagged = _un_ref(w, stat, 0.5, **kw)
        assert not flagged.any()
        assert torch.equal(_ours(w, stat, Unstructured(0.5), **kw)[1].keep, ref_keep)
        ref_keep, flagged = _nm_ref(w, stat, NM(2, 4), **kw)
        assert not flagged.any()
        assert torch.equal(_ours(w, stat, NM(2, 4), **kw)[1].keep, ref_keep)


# ---------------------------------------------------------------------------------------------------
# invariants
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7), NM(2, 4), NM(1, 4), NM(2, 8)])
@pytest.mark.parametrize("sign_check", [False, True])
def test_counts_preserved(pattern, sign_check):
    w, stat, _ = _layer(out=24, inp=256, seed=1)
    keep0, res = _ours(w, stat, pattern, sign_check=sign_check)
    assert res.keep.dtype == torch.bool and res.keep.shape == w.shape
    assert torch.equal(res.keep.sum(1), keep0.sum(1))
    if isinstance(pattern, NM):
        assert bool((nm_group_counts(res.keep, pattern.m) == pattern.n).all())
    assert res.swaps == int(res.swaps_per_row.sum()) > 0
    # each accepted swap changes exactly two entries of its row
    assert torch.equal((res.keep != keep0).sum(1), 2 * res.swaps_per_row)


def test_unstructured_keeps_non_uniform_row_counts():
    w, stat, _ = _layer(out=8, inp=256, seed=2)
    g = torch.Generator().manual_seed(0)
    keep0 = torch.rand(w.shape, generator=g) < torch.linspace(0.2, 0.8, 8).reshape(-1, 1)
    res = dsnot_refine(w, keep0, stat.sq_norm, stat.sum, stat.var, Unstructured(0.5), DSnoTSettings())
    assert res.swaps > 0
    assert torch.equal(res.keep.sum(1), keep0.sum(1))


def test_max_cycles_zero_returns_initial_mask():
    w, stat, _ = _layer(out=16, inp=256)
    for pattern in (Unstructured(0.5), NM(2, 4)):
        keep0, res = _ours(w, stat, pattern, max_cycles=0)
        assert torch.equal(res.keep, keep0) and res.keep is not keep0
        assert res.swaps == 0 and res.cycles_run == 0
        assert res.error_after == res.error_before


def test_reconstruction_error_decreases():
    w, stat, _ = _layer(seed=4)
    # with the sign test every accepted swap moves eps towards 0 without crossing it: per row non-increasing
    _, res = _ours(w, stat, Unstructured(0.5), sign_check=True)
    assert bool((res.eps_after.abs() <= res.eps_before.abs() + 1e-3).all())
    assert res.error_after.mean_abs < 0.5 * res.error_before.mean_abs
    assert res.error_after.sum_sq < res.error_before.sum_sq
    # the error fields are the per-row eps of the initial and final masks
    torch.testing.assert_close(res.eps_after, reconstruction_error(w, res.keep, stat.sum))
    assert res.error_before.mean_abs == pytest.approx(float(res.eps_before.double().abs().mean()))
    # default settings (no sign test) and N:M: decreases overall
    for pattern in (Unstructured(0.5), NM(2, 4)):
        _, res = _ours(w, stat, pattern)
        assert res.error_after.mean_abs < res.error_before.mean_abs
        assert res.error_after.sum_sq < res.error_before.sum_sq


def test_threshold_stops_rows_before_the_swap():
    w, stat, _ = _layer(out=16, inp=256, seed=5)
    keep0 = dsnot_initial_keep(w, stat.sq_norm, Unstructured(0.5))
    eps0 = reconstruction_error(w, keep0, stat.sum)
    thr = float(eps0.abs().median())
    res = dsnot_refine(w, keep0, stat.sq_norm, stat.sum, stat.var, Unstructured(0.5), DSnoTSettings(threshold=thr))
    small = eps0.abs() <= thr
    assert small.any() and (~small).any()
    assert bool((res.swaps_per_row[small] == 0).all())  # rows already under the threshold never swap
    assert bool((res.swaps_per_row[~small] > 0).all())  # the others swap at least once


def test_deterministic_and_inputs_not_mutated():
    w, stat, _ = _layer(out=16, inp=512)
    for pattern in (Unstructured(0.5), NM(2, 4)):
        keep0 = dsnot_initial_keep(w, stat.sq_norm, pattern)
        inputs = (w, keep0, stat.sq_norm, stat.sum, stat.var)
        before = [t.clone() for t in inputs]
        a = dsnot_refine(*inputs, pattern, DSnoTSettings())
        b = dsnot_refine(*inputs, pattern, DSnoTSettings())
        for t, t0 in zip(inputs, before):
            assert torch.equal(t, t0)
        assert torch.equal(a.keep, b.keep) and torch.equal(a.swaps_per_row, b.swaps_per_row)
        assert a.error_after == b.error_after


def test_low_precision_weight():
    w, stat, _ = _layer(out=16, inp=256)
    wb = w.to(torch.bfloat16)
    keep0, res = _ours(wb, stat, Unstructured(0.5))
    ref_keep, flagged = _un_ref(wb.float(), stat, 0.5)
    assert not flagged.any() and torch.equal(res.keep, ref_keep)
    assert res.keep.dtype == torch.bool and torch.equal(res.keep.sum(1), keep0.sum(1))


# ---------------------------------------------------------------------------------------------------
# narrow layers: the reference walks out of its lists; we stop there and keep the counts
# ---------------------------------------------------------------------------------------------------


NARROW = [(Unstructured(0.5), False), (Unstructured(0.5), True), (NM(2, 4), False)]


def _narrow_ref(w, stat, pattern, **kw):
    if isinstance(pattern, NM):
        return _nm_ref(w, stat, pattern, **kw)
    return _un_ref(w, stat, pattern.sparsity, **kw)


@pytest.mark.parametrize("pattern,sign_check", NARROW)
def test_narrow_layer_50_cycles_keeps_counts(pattern, sign_check):
    w, stat, _ = _layer(out=64, inp=64, seed=6)  # 32 kept per row: the reference's pointers overrun
    keep0, res = _ours(w, stat, pattern, max_cycles=50, sign_check=sign_check)
    assert torch.equal(res.keep.sum(1), keep0.sum(1))
    if isinstance(pattern, NM):
        assert bool((nm_group_counts(res.keep, 4) == 2).all())
    ref_keep, flagged = _narrow_ref(w, stat, pattern, max_cycles=50, sign_check=sign_check)
    assert torch.equal(res.keep[~flagged], ref_keep[~flagged])  # rows where the reference stays in its lists
    if sign_check:
        assert not flagged.any()  # every row stops early; nothing overruns
    else:
        # the reference's pointers walk onto kept weights: counts (and N:M groups) break there
        assert flagged.any() and not torch.equal(ref_keep.sum(1), keep0.sum(1))
        if isinstance(pattern, NM):
            assert not bool((nm_group_counts(ref_keep, 4) == 2).all())
        else:
            assert res.list_end_rows > 0


@pytest.mark.parametrize("pattern,sign_check", NARROW)
def test_narrow_layer_matches_reference_while_inside_lists(pattern, sign_check):
    w, stat, _ = _layer(out=64, inp=64, seed=6)
    ref_keep, flagged = _narrow_ref(w, stat, pattern, max_cycles=8, sign_check=sign_check)
    assert not flagged.any()
    _, res = _ours(w, stat, pattern, max_cycles=8, sign_check=sign_check)
    assert res.swaps > 0 and torch.equal(res.keep, ref_keep)


def test_nm_group_exhaustion_is_skipped_not_broken():
    # keep 1 of 4: three regrow candidates per group share one prunable weight
    w, stat, _ = _layer(out=32, inp=64, seed=7)
    _, res = _ours(w, stat, NM(1, 4), max_cycles=50, threshold=0.0)
    assert res.skipped_groups > 0 and res.swaps > 0
    assert bool((nm_group_counts(res.keep, 4) == 1).all())
    # the reference regrows r anyway (its p is an already pruned weight), breaking the group
    ref_keep, _ = _nm_ref(w, stat, NM(1, 4), max_cycles=50, threshold=0.0)
    assert not bool((nm_group_counts(ref_keep, 4) == 1).all())


def test_bad_inputs_raise_config_error():
    w, stat, _ = _layer(out=4, inp=32, nseq=2, length=8)
    keep0 = dsnot_initial_keep(w, stat.sq_norm, Unstructured(0.5))
    with pytest.raises(ConfigError):
        dsnot_refine(w, keep0[:, :16], stat.sq_norm, stat.sum, stat.var, Unstructured(0.5))
    with pytest.raises(ConfigError):
        dsnot_refine(w, keep0, stat.sq_norm[:16], stat.sum, stat.var, Unstructured(0.5))
    with pytest.raises(ConfigError):
        dsnot_refine(w[:, :30], keep0[:, :30], stat.sq_norm[:30], stat.sum[:30], stat.var[:30], NM(2, 4))
    with pytest.raises(ConfigError):
        dsnot_refine(w, keep0, stat.sq_norm, stat.sum, stat.var, Unstructured(0.5), DSnoTSettings(max_cycles=-1))
