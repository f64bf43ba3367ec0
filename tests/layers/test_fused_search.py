"""The fused searches of the compiled extension against the readable ones.

PKM (``fast.search.fused_pkm_search``, ``csrc/pkm_search.cpp``) against ``side_search`` +
``pruned_pair_topk`` (compiled: the same scores bitwise) and against torch's brute-force top-K of
the full n x n grid of sums.

UltraMem's fused TDQKR search (``fast.search.fused_tucker_search``, ``csrc/tucker_search.cpp``)
against the readable search on the full side scores (``fast.search.tucker_search`` on S = K q):
the same cells per token and head, scores, selected side-score columns and per-core scores to float32
rounding, for signed and two-sided proxies, odd sizes, one token and many (several tiles, a tail),
both instruction sets and any thread count."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from einops import rearrange

from labcore.config import ConfigError
from labcore.layers.fast import compiled, search
from labcore.layers.ultramem import UltraMem, UltraMemConfig


@pytest.fixture(scope="module", autouse=True)
def need_extension():
    if compiled.disabled() or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("compiled extension disabled or no C++ compiler")
    assert compiled.available(), compiled.unavailable_reason()


def _inputs(T, H, R, n, D, h, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, 2, D, generator=gen)                              # (N_tok, H, 2, D_k)
    keys = torch.randn(H, 2, R, n, D, generator=gen) / D ** 0.5             # (H, 2, R, n_s, D_k)
    uv = torch.nn.functional.normalize(torch.randn(2, H, R, generator=gen), dim=-1)
    cores = torch.randn(h, H, R, R, generator=gen)
    return q, keys, uv, cores


def _readable(q, keys, uv, cores, m, k, proxy_search):
    s = torch.einsum("thsd,hsrnd->sthrn", q, keys)                          # S: (2, N_tok, H, R, n_s)
    cells, scores, vecs = search.tucker_search(s, uv, cores.sum(0), m, k, proxy_search)
    left = torch.einsum("thrk,chra->thkca", vecs[0], cores)                 # S_row[:, i]^T C^(c): (N_tok, H, K, h, R)
    core_scores = torch.einsum("thkca,thak->thkc", left, vecs[1])           # (N_tok, H, K, h)
    return cells, scores, vecs, core_scores


def _by_cell(cells, n, scores=None, core_scores=None):
    """Each (token, head)'s K cell ids sorted, with their scores (N_tok, H, K) and per-core scores
    (N_tok, H, K, h) permuted alike (the grid's top-K is unique up to exact ties; its order is not
    compared here, only the set)."""
    ids = cells[0] * n + cells[1]                                           # (N_tok, H, K)
    order = ids.argsort(-1)
    out = [ids.gather(-1, order)]
    if scores is not None:
        out.append(scores.gather(-1, order))
    if core_scores is not None:
        out.append(core_scores.gather(-2, order.unsqueeze(-1).expand_as(core_scores)))
    return out


def _close(a, b):
    """Equal to float32 rounding: 1e-6 relative to the tensor's largest magnitude (sums of products
    cancel, so a small entry's own relative error can be larger)."""
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))


CASES = {
    # T, H, R, n_s, D_k, h, m, K, proxy search
    "inference_bench": (1000, 2, 2, 638, 32, 2, 16, 16, "signed"),
    "layer_bench": (300, 2, 2, 128, 128, 2, 32, 32, "signed"),
    "odd_two_sided": (21, 3, 3, 37, 10, 3, 5, 5, "two_sided"),
    "two_sided_overlap": (13, 2, 2, 9, 6, 1, 6, 20, "two_sided"),     # 2m > n_s: I+ and I- overlap
    "m_above_k_rank1": (50, 1, 1, 64, 16, 1, 12, 7, "signed"),
    "one_token": (1, 2, 2, 40, 8, 2, 4, 4, "signed"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fused_equals_readable_search(name):
    T, H, R, n, D, h, m, k, proxy = CASES[name]
    q, keys, uv, cores = _inputs(T, H, R, n, D, h)
    ref = _readable(q, keys, uv, cores, m, k, proxy)
    with torch.no_grad():
        got = search.fused_tucker_search(q, keys, uv, cores.sum(0), cores, m, k, proxy)
    assert got[0].shape == ref[0].shape and got[1].shape == ref[1].shape and got[2].shape == ref[2].shape
    ids_r, sc_r, cs_r = _by_cell(ref[0], n, ref[1], ref[3])
    ids_g, sc_g, cs_g = _by_cell(got[0], n, got[1], got[3])
    assert torch.equal(ids_g, ids_r)                                        # the same cells per token and head
    _close(sc_g, sc_r)                                                      # float32 rounding of the sums
    _close(cs_g, cs_r)
    assert torch.all(got[1][..., :-1] >= got[1][..., 1:])                   # descending per (token, head)
    # the selected side-score columns are S at the selected cells
    s = torch.einsum("thsd,hsrnd->sthrn", q, keys)
    cols = torch.stack([s[0].gather(-1, got[0][0].unsqueeze(-2).expand(-1, -1, R, -1)),
                        s[1].gather(-1, got[0][1].unsqueeze(-2).expand(-1, -1, R, -1))])
    _close(got[2], cols)


def test_fused_search_without_cores_returns_none_and_same_cells():
    q, keys, uv, cores = _inputs(30, 2, 2, 50, 8, 2)
    with torch.no_grad():
        a = search.fused_tucker_search(q, keys, uv, cores.sum(0), None, 6, 6)
        b = search.fused_tucker_search(q, keys, uv, cores.sum(0), cores, 6, 6)
    assert a[3] is None and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("isa", ["portable", "avx512"])
def test_instruction_sets_and_thread_counts_agree_bitwise(isa):
    if isa == "avx512" and compiled.isa() != "avx512":
        pytest.skip("CPU without AVX-512")
    T, H, R, n, D, h, m, k, _ = CASES["inference_bench"]
    q, keys, uv, cores = _inputs(T, H, R, n, D, h, seed=3)
    qh = rearrange(q, "t h s d -> h s t d").contiguous()
    pk = search.proxy_keys(keys, uv)
    threads = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(compiled.tucker_topk(qh, keys, pk, cores.sum(0), cores, m, k, isa=isa))
    finally:
        torch.set_num_threads(threads)
    auto = compiled.tucker_topk(qh, keys, pk, cores.sum(0), cores, m, k)
    for a, b in zip(outs[0], outs[1]):
        assert torch.equal(a, b)
    assert torch.equal(_by_cell(outs[0][0], n)[0], _by_cell(auto[0], n)[0])


def test_bad_input_is_named():
    q, keys, uv, cores = _inputs(4, 2, 2, 10, 4, 1)
    qh = rearrange(q, "t h s d -> h s t d").contiguous()
    pk = search.proxy_keys(keys, uv)
    with pytest.raises(ConfigError, match="m=11"):
        compiled.tucker_topk(qh, keys, pk, cores.sum(0), None, 11, 4)
    with pytest.raises(ConfigError, match="k=10"):
        compiled.tucker_topk(qh, keys, pk, cores.sum(0), None, 3, 10)
    with pytest.raises(ConfigError, match="q=torch.float64"):
        compiled.tucker_topk(qh.double(), keys, pk, cores.sum(0), None, 3, 4)
    with pytest.raises(ConfigError, match="isa='sse'"):
        compiled.tucker_topk(qh, keys, pk, cores.sum(0), None, 3, 4, isa="sse")
    with pytest.raises(ValueError, match="proxy_search='both'"):
        search.fused_tucker_search(q, keys, uv, cores.sum(0), None, 3, 4, "both")


def test_layer_uses_the_fused_search_only_without_a_graph(monkeypatch):
    """Inference (no graph): the layer runs the fused search; training and grad-mode eval run the
    readable one (the fused search has no backward). Both give the same output."""
    calls = []
    real = search.fused_tucker_search

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    import labcore.layers.ultramem as um
    monkeypatch.setattr(um, "fused_tucker_search", counting)
    torch.manual_seed(0)
    layer = UltraMem(UltraMemConfig(d_model=32, n_keys=24, heads=2, k_dim=8, top_k=6, d_value=16, n_cores=2,
                                    expansion=4)).eval()
    x = torch.randn(17, 32)
    with torch.no_grad():
        y_fast, aux_fast = layer(x)
    assert calls == [1]
    y_ref, aux_ref = layer(x)                                               # grad mode: readable path
    assert calls == [1]
    torch.testing.assert_close(y_fast, y_ref.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(aux_fast.indices.sort(-1).values, aux_ref.indices.sort(-1).values)
    layer.train()
    layer(x)[0].sum().backward()
    assert calls == [1] and layer.keys.grad is not None


def test_fused_ok_needs_no_graph_cpu_and_float32():
    t = torch.zeros(3, requires_grad=True)
    assert search.fused_search_ok(torch.zeros(3)) is True
    assert search.fused_search_ok(t) is False
    with torch.no_grad():
        assert search.fused_search_ok(t) is True
        assert search.fused_search_ok(torch.zeros(3, dtype=torch.float64)) is False


# ---------------------------------------------------------------------------------------------
# PKM
# ---------------------------------------------------------------------------------------------
PKM_CASES = {
    # T, H, n, D (= D_k / 2), K
    "inference_bench": (1000, 4, 451, 32, 32),
    "layer_bench": (300, 4, 128, 64, 32),
    "odd": (21, 3, 37, 5, 5),
    "k_equals_n": (9, 2, 6, 4, 6),
    "one_token": (1, 2, 40, 8, 4),
}


@pytest.mark.parametrize("name", list(PKM_CASES))
def test_fused_pkm_search_equals_the_unfused_path(name):
    T, H, n, D, K = PKM_CASES[name]
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(T, H, 2, D, generator=gen)                              # (N_tok, H, 2, D_k/2)
    keys = torch.randn(H, 2, n, D, generator=gen)                           # (H, 2, n, D_k/2)
    with torch.no_grad():
        scores, slots = search.fused_pkm_search(q, keys, K)                 # (N_tok, H, K)
        s_half, i_half = search.side_search(rearrange(q, "t h s d -> (h s) t d"),
                                            rearrange(keys, "h s n d -> (h s) d n"), K)
        s_half = rearrange(s_half, "(h s) t k -> s h t k", s=2)
        i_half = rearrange(i_half, "(h s) t k -> s h t k", s=2)
        ref_s, i_row, i_col = search.pruned_pair_topk(s_half[0], s_half[1], i_half[0], i_half[1],
                                                      *search.pruned_candidates(K), K)
    ref_slots = (i_row * n + i_col).transpose(0, 1)                         # (N_tok, H, K)
    ref_s = ref_s.transpose(0, 1)
    o_got, o_ref = slots.argsort(-1), ref_slots.argsort(-1)
    assert torch.equal(slots.gather(-1, o_got), ref_slots.gather(-1, o_ref))  # the same slots ...
    assert torch.equal(scores.gather(-1, o_got), ref_s.gather(-1, o_ref))     # ... and scores, bitwise
    assert torch.all(scores[..., :-1] >= scores[..., 1:])                   # descending
    # against the brute-force top-K of all n^2 sums (torch.bmm + torch.topk)
    sub = torch.einsum("thsd,hsnd->sthn", q, keys)                          # (2, N_tok, H, n)
    full = (sub[0].unsqueeze(-1) + sub[1].unsqueeze(-2)).flatten(-2)        # (N_tok, H, n*n)
    best = full.topk(K, dim=-1)
    assert torch.equal(slots.sort(-1).values, best.indices.sort(-1).values)
    _close(scores, best.values)


def test_fused_pkm_bad_input_is_named():
    q, keys = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 5, 4)
    with pytest.raises(ConfigError, match="k=6"):
        compiled.pkm_topk(q, keys, 6)
    with pytest.raises(ConfigError, match="keys=torch.float64"):
        compiled.pkm_topk(q, keys.double(), 2)
