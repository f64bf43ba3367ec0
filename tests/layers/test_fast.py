"""labcore.layers.fast: every speed trick against the readable computation it replaces.

Top-k (integer ranking, block maxima), the searches (token chunks, pruned candidate grid, the fused
two-sided TDQKR search), the inference cache, the IVE value bags and the MoE expert paths. The
layers' own tests (test_pkm, test_ultramem, test_moe) check the same paths end to end against the
brute-force references.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import labcore.layers.fast.search as search_mod
from labcore.layers.fast.bags import core_major_proj_weight, ive_key_table, value_bags
from labcore.layers.fast.caches import DerivedCache, reuse
from labcore.layers.fast.experts import grouped_experts, grouped_mm_ok, padded_experts, swiglu_down
from labcore.layers.fast.search import in_token_chunks, pruned_candidates, pruned_pair_topk, tucker_search
from labcore.layers.fast.topk import block_size, exact_topk, ordered_int32, torch_exact_topk

# ---------------------------------------------------------------------------------------------
# topk.py
# ---------------------------------------------------------------------------------------------

# exact_topk (the compiled topk_rows when built, see test_compiled_*.py) and the PyTorch path
TOPKS = pytest.mark.parametrize("topk", [exact_topk, torch_exact_topk],
                                ids=["exact_topk", "torch_exact_topk"])


def test_ordered_int32_orders_like_the_floats():
    x = torch.cat([torch.randn(200) * 10 ** torch.randint(-30, 30, (200,)).float(),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40])])
    keys = ordered_int32(x)
    order = keys.argsort(stable=True)
    assert bool((x[order].diff() >= 0).all())


@TOPKS
def test_exact_topk_matches_torch_topk(topk):
    x = torch.randn(50, 40)
    x[0, :5] = torch.tensor([-0.0, 0.0, float("inf"), -float("inf"), 1e-40])
    x.requires_grad_(True)
    v, i = topk(x, 7, sorted=True)
    v_ref, i_ref = x.topk(7, dim=-1)
    assert torch.equal(v, v_ref) and torch.equal(i, i_ref)
    v.sum().backward()
    expected = torch.zeros(50, 40).scatter_(1, i, 1.0)
    assert torch.equal(x.grad, expected)
    vu, iu = topk(x.detach(), 7, sorted=False)
    assert torch.equal(iu.sort(-1).values, i_ref.sort(-1).values)
    neg = -(torch.randn(50, 40).abs() * 4)                  # all negative, across binades
    for largest_first in (neg, neg * 1e-30, neg * 1e30):
        v, i = topk(largest_first, 9, sorted=True)
        v_ref, i_ref = largest_first.topk(9, dim=-1)
        assert torch.equal(v, v_ref) and torch.equal(i, i_ref)


@TOPKS
def test_exact_topk_raw_bits_path_and_per_row_fallback(topk):
    """Rows with >= K non-negative scores take the raw-bits path; rows with fewer are re-ranked
    with the order-preserving keys; either way the result is torch.topk's (no ties here)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 20, 40, generator=gen)
    x[0, 5] = -x[0, 5].abs()                                # all negative: fallback row
    x[1, 7, :36] = -x[1, 7, :36].abs()                      # 4 non-negative < K = 6: fallback row
    x[2, 9] = x[2, 9].abs()                                 # all non-negative: raw bits
    x[2, 11, :34] = -x[2, 11, :34].abs()                    # exactly K = 6 non-negative: raw bits
    x[2, 11, 34] = 0.0                                      # +0.0 is non-negative
    x[2, 12, 0], x[2, 12, 1] = 0.0, -0.0                    # ties of +-0 only matter below the top K
    for sorted_ in (True, False):
        for grad in (True, False):
            xg = x.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                v, i = topk(xg, 6, sorted=sorted_)
            v_ref, i_ref = x.topk(6, dim=-1, sorted=sorted_)
            if sorted_:
                assert torch.equal(i, i_ref) and torch.equal(v, v_ref)
            else:
                assert torch.equal(i.sort(-1).values, i_ref.sort(-1).values)
                assert torch.equal(v, x.gather(-1, i))
            if grad:
                v.sum().backward()
                assert torch.equal(xg.grad, torch.zeros_like(x).scatter_(-1, i, 1.0))
    v1, i1 = topk(x[1, 7], 6, sorted=True)            # 1-D input, a fallback row
    assert torch.equal(i1, x[1, 7].topk(6).indices) and torch.equal(v1, x[1, 7].topk(6).values)


@TOPKS
def test_exact_topk_block_maxima_on_long_rows(topk):
    """n >= 16 K: ranking block maxima first; distinct values, so the result must be topk's exactly."""
    assert [block_size(n, k) for n, k in [(1024, 32), (1276, 16), (640, 8), (128, 32), (119, 32), (997, 4)]] == \
        [4, 4, 8, 1, 1, 1]                                   # 997 is prime: no divisor, no blocks
    gen = torch.Generator().manual_seed(4)
    x = (torch.randperm(70 * 640, generator=gen).float() - 20000.0).view(70, 640) / 64  # distinct, both signs
    x[2] = -x[2].abs() - 1.0                                # a row of negatives: per-row fallback inside
    x[4, :8] = 1e3 + torch.arange(8.0)                      # the top 8 all in block 0
    for sorted_ in (True, False):
        xg = x.clone().requires_grad_(True)
        v, i = topk(xg, 8, sorted=sorted_)
        v_ref, i_ref = x.topk(8, dim=-1, sorted=sorted_)
        if not sorted_:
            order, order_ref = i.argsort(-1), i_ref.argsort(-1)
            v, i, v_ref, i_ref = v.gather(-1, order), i.gather(-1, order), v_ref.gather(-1, order_ref), \
                i_ref.gather(-1, order_ref)
        assert torch.equal(i, i_ref) and torch.equal(v.detach(), v_ref)
        v.sum().backward()
        assert torch.equal(xg.grad, torch.zeros_like(x).scatter_(-1, i_ref, 1.0))
    with torch.no_grad():
        v, i = topk(x.view(70, 1, 640), 8, sorted=True)  # leading dims kept
    assert v.shape == (70, 1, 8) and torch.equal(i[:, 0], x.topk(8).indices)


# ---------------------------------------------------------------------------------------------
# search.py
# ---------------------------------------------------------------------------------------------


def test_pruned_candidates_are_the_rank_pairs_that_can_win():
    rows, cols = pruned_candidates(32)
    assert rows.numel() == 119
    assert bool(((rows + 1) * (cols + 1) <= 32).all())
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 119


@pytest.mark.parametrize("k", [1, 4, 7])
def test_pruned_pair_topk_equals_the_full_grid(k):
    gen = torch.Generator().manual_seed(k)
    s_row, i_row = torch.randn(3, 5, 40, generator=gen).topk(k, dim=-1)     # (3, 5, k) sorted descending
    s_col, i_col = torch.randn(3, 5, 40, generator=gen).topk(k, dim=-1)
    cand_row, cand_col = pruned_candidates(k)
    scores, rows, cols = pruned_pair_topk(s_row, s_col, i_row, i_col, cand_row, cand_col, k)
    grid = (s_row[..., :, None] + s_col[..., None, :]).flatten(-2)          # the readable K x K grid
    want, flat = grid.topk(k, dim=-1)
    want_rows, want_cols = i_row.gather(-1, flat // k), i_col.gather(-1, flat % k)
    order = scores.argsort(-1, descending=True)
    assert torch.equal(scores.gather(-1, order), want)
    assert torch.equal(rows.gather(-1, order), want_rows) and torch.equal(cols.gather(-1, order), want_cols)


def test_in_token_chunks_changes_nothing(monkeypatch):
    q = torch.randn(7, 3)

    def search(qc):
        return qc * 2, qc.sum(-1)

    whole = in_token_chunks(search, q, 3)
    monkeypatch.setattr(search_mod, "SEARCH_CHUNK_BYTES", 2 * 3 * 4)        # 2 tokens per chunk
    assert search_mod.search_chunk(3, 4) == 2
    calls = []
    chunked = in_token_chunks(lambda qc: calls.append(qc.shape[0]) or search(qc), q, 3)
    assert calls == [2, 2, 2, 1]
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


def _dense_tucker(s, core):
    """Readable TDQKR: every cell of S_row^T C S_col, (..., H, n_s^2)."""
    return torch.einsum("...hai,hab,...hbj->...hij", s[0], core, s[1]).flatten(-2)


@pytest.mark.parametrize("m", [4, 9])
def test_tucker_search_exact_at_full_m_and_rescores_exactly(m):
    gen = torch.Generator().manual_seed(m)
    H, R, n_s, K = 2, 3, 9, 5
    s = torch.randn(2, 6, H, R, n_s, generator=gen, dtype=torch.float64)   # (2, N_tok, H, R, n_s)
    core = torch.randn(H, R, R, generator=gen, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(core)
    uv = torch.stack((U[..., :, 0], Vh[..., 0, :]))                         # (2, H, R)
    cells, scores, vecs = tucker_search(s, uv, core, m, K)
    dense = _dense_tucker(s, core)                                          # (N_tok, H, n_s^2)
    slots = cells[0] * n_s + cells[1]
    torch.testing.assert_close(scores, dense.gather(-1, slots))             # exact scores of the cells
    assert torch.equal(vecs[0], s[0].gather(-1, cells[0].unsqueeze(-2).expand(-1, -1, R, -1)))
    assert torch.equal(vecs[1], s[1].gather(-1, cells[1].unsqueeze(-2).expand(-1, -1, R, -1)))
    assert bool((scores.diff(dim=-1) <= 0).all())                           # descending
    if m == n_s:                                                            # every cell a candidate
        want, want_slots = dense.topk(K, dim=-1)
        assert torch.equal(slots, want_slots)
        torch.testing.assert_close(scores, want)


# ---------------------------------------------------------------------------------------------
# caches.py
# ---------------------------------------------------------------------------------------------


def test_derived_cache_hits_until_a_source_changes():
    cache, src, calls = DerivedCache(), torch.randn(4), []

    def compute():
        calls.append(1)
        return src * 2

    a = cache.get("x", (src,), compute)
    b = cache.get("x", (src,), compute)
    assert a is b and len(calls) == 1
    src.add_(1.0)                                                           # in-place write: version bump
    c = cache.get("x", (src,), compute)
    assert len(calls) == 2 and torch.equal(c, src * 2)
    with torch.inference_mode():
        frozen = torch.randn(3)
    cache.get("y", (frozen,), compute)
    cache.get("y", (frozen,), compute)
    assert len(calls) == 4 and "y" not in cache.entries                     # no version counter: never cached


def test_reuse_caches_only_in_inference():
    cache, src, calls = DerivedCache(), torch.randn(4, requires_grad=True), []

    def compute():
        calls.append(1)
        return src * 2

    reuse(cache, True, "x", (src,), compute)
    with torch.no_grad():
        reuse(cache, True, "x", (src,), compute)                            # training module: recompute
    reuse(cache, False, "x", (src,), compute)                               # grad mode: recompute
    assert len(calls) == 3 and not cache.entries
    with torch.no_grad():
        reuse(cache, False, "x", (src,), compute)
        reuse(cache, False, "x", (src,), compute)
    assert len(calls) == 4
    with torch.inference_mode():
        reuse(cache, False, "t", (src,), lambda: torch.arange(3), always=True)
    assert "t" in cache.entries and not cache.entries["t"][2].is_inference()


# ---------------------------------------------------------------------------------------------
# bags.py
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("E,h", [(1, 1), (1, 2), (4, 1), (4, 2), (9, 3)])
def test_value_bags_pool_like_the_readable_loop(E, h):
    gen = torch.Generator().manual_seed(E * 10 + h)
    N, Dv, n_tok, S, D = 16, 6, 5, 7, 4
    perm = torch.randperm(E * N, generator=gen)
    V = torch.randn(N, Dv, generator=gen, dtype=torch.float64)
    slots = torch.randint(0, E * N, (n_tok, S), generator=gen)
    core_scores = torch.randn(n_tok, S, h, generator=gen, dtype=torch.float64)
    key = ive_key_table(perm, h) if E > 1 else None
    idx, offsets, w = value_bags(slots, core_scores, key, h, E, N, V.dtype)
    pooled = F.embedding_bag(idx, V.view(N * h, Dv // h), offsets, mode="sum", per_sample_weights=w)
    pooled = pooled.view(n_tok, h, E, Dv // h)                              # (token, core, block, d)
    want = torch.zeros(n_tok, E, Dv, dtype=torch.float64)                   # readable: U2 eq. 8-9 buffer
    Dc = Dv // h
    for t, s, c in itertools.product(range(n_tok), range(S), range(h)):
        v = int(slots[t, s])
        p = int(perm[v]) if E > 1 else v
        want[t, p // N, c * Dc:(c + 1) * Dc] += core_scores[t, s, c] * V[p % N, c * Dc:(c + 1) * Dc]
    torch.testing.assert_close(pooled, want.view(n_tok, E, h, Dc).transpose(1, 2))
    W = torch.randn(D, E * Dv, generator=gen, dtype=torch.float64)          # columns (block, core, d)
    torch.testing.assert_close(pooled.reshape(n_tok, -1) @ core_major_proj_weight(W, E, h).T,
                               want.view(n_tok, -1) @ W.T)


# ---------------------------------------------------------------------------------------------
# experts.py
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("I,D", [(4, 8), (8, 4)])
def test_swiglu_down_either_weight_placement(I, D):
    h, w, Wd = torch.randn(5, 2 * I, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64), \
        torch.randn(I, D, dtype=torch.float64)
    want = w * ((F.silu(h[:, :I]) * h[:, I:]) @ Wd)
    torch.testing.assert_close(swiglu_down(h.clone(), w, lambda a: a @ Wd, I, D), want)


def _sorted_assignments(N, E, K, gen):
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)])  # (N, K) distinct experts
    order = idx.reshape(-1).argsort(stable=True)
    return order // K, torch.bincount(idx.reshape(-1), minlength=E), idx.reshape(-1)[order]


@pytest.mark.parametrize("path", ["padded", "grouped", "loop"])
def test_expert_paths_equal_a_per_expert_loop(path):
    gen = torch.Generator().manual_seed(5)
    N, E, K, D, I = 20, 6, 2, 8, 16
    x = torch.randn(N, D, generator=gen)
    gate_up, down = torch.randn(E, D, 2 * I, generator=gen), torch.randn(E, I, D, generator=gen)
    tok, sizes, expert = _sorted_assignments(N, E, K, gen)
    w = torch.rand(tok.numel(), generator=gen)
    want = torch.zeros(N, D)
    for a in range(tok.numel()):                                            # readable: one row at a time
        e, t = int(expert[a]), int(tok[a])
        hh = x[t] @ gate_up[e]
        want[t] += w[a] * ((F.silu(hh[:I]) * hh[I:]) @ down[e])
    if path == "padded":
        y = padded_experts(x, tok, sizes, w, gate_up, down)
    else:
        if path == "grouped" and not grouped_mm_ok(x, gate_up, down):
            pytest.skip("F.grouped_mm is not available here")
        y = torch.zeros(N, D)
        for r0, r1, out in grouped_experts(x, tok, sizes, w, gate_up, down, path == "grouped", False):
            y.index_add_(0, tok[r0:r1], out)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_grouped_mm_ok_rules():
    assert not grouped_mm_ok(torch.zeros(4, 4, dtype=torch.float64))       # dtype
    assert not grouped_mm_ok(torch.zeros(4, 5)[:, :3])                      # 20-byte row stride
    if hasattr(F, "grouped_mm"):
        assert grouped_mm_ok(torch.zeros(4, 8), torch.zeros(2, 8, 4))
