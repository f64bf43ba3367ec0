"""TDQKR's two-sided proxy search (``proxy_search="two_sided"``, docs/mechanisms.md §1.3).

With a rank-1 summed core every cell scores lambda * p_i * q_j (p, q the row / column proxies), so
the candidates (I+ x J+) U (I- x J-) of the m largest and m most negative proxies per side hold the
whole top-K whenever m >= K and the top-K scores are positive: the two-sided search is exact there,
the release's signed search (I+ x J+ only) is not. Checked on the search function and on the layer,
against a brute-force scan of the full grid; the fast path is checked against the readable
reference (``ultramem_reference(exact=False)``) on general cores, forward and gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

from labcore.config import ConfigError
from labcore.layers.fast.search import topk_recall, tucker_exact_topk, tucker_search, two_sided_tucker_search
from labcore.layers.fast.topk import exact_topk
from labcore.layers.ultramem import UltraMem, UltraMemConfig, search_candidates, ultramem_reference

# ---------------------------------------------------------------------------------------------
# the search function on random side scores with a rank-1 core
# ---------------------------------------------------------------------------------------------


def rank1_case(seed: int, lead: tuple[int, ...], H: int, R: int, n_s: int, dtype=torch.float64):
    """Side scores s (2, *lead, H, R, n_s), a rank-1 core (H, R, R) and its leading singular
    vectors uv (2, H, R), flipped in sign for odd heads (the search must not depend on the sign)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(2, *lead, H, R, n_s, generator=gen, dtype=torch.float64)
    a = torch.randn(H, R, 1, generator=gen, dtype=torch.float64)
    b = torch.randn(H, 1, R, generator=gen, dtype=torch.float64)
    core = a @ b                                                            # rank 1: (H, R, R)
    U, lam, Vh = torch.linalg.svd(core)
    assert bool((lam[:, 1:] < 1e-12 * lam[:, :1]).all())                    # really rank 1
    sign = torch.tensor([1.0 if h % 2 == 0 else -1.0 for h in range(H)], dtype=torch.float64)[:, None]
    uv = torch.stack((U[..., :, 0] * sign, Vh[..., 0, :] * sign))          # (2, H, R)
    return s.to(dtype), uv.to(dtype), core.to(dtype)


# (lead token dims, H, R, n_s, K, m): odd n_s, one token, m > K, 2m > n_s (overlapping I+ / I-)
SHAPES = [
    ((1,), 1, 2, 7, 3, 3),
    ((6,), 2, 2, 9, 4, 4),
    ((2, 3), 2, 3, 15, 5, 5),
    ((8,), 3, 2, 16, 8, 8),
    ((8,), 2, 4, 11, 3, 5),
    ((8,), 2, 2, 5, 3, 3),
]


def _sets_equal(cells: torch.Tensor, want: torch.Tensor, n_s: int) -> bool:
    a = (cells[0] * n_s + cells[1]).sort(-1).values
    b = (want[0] * n_s + want[1]).sort(-1).values
    return torch.equal(a, b)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"lead={s[0]}-H={s[1]}-R={s[2]}-n_s={s[3]}-K={s[4]}-m={s[5]}")
def test_two_sided_is_exact_for_rank1_core_and_positive_topk(shape):
    lead, H, R, n_s, K, m = shape
    s, uv, core = rank1_case(sum(lead) + H + n_s, lead, H, R, n_s)
    want, want_scores = tucker_exact_topk(s, core, K)                       # brute force, all n_s^2 cells
    assert bool((want_scores > 0).all())                                    # the precondition
    cells, scores, vecs = tucker_search(s, uv, core, m, K, proxy_search="two_sided")
    assert _sets_equal(cells, want, n_s)
    torch.testing.assert_close(scores, want_scores, rtol=1e-12, atol=1e-12)  # descending, exact values
    R_ = s.shape[-2]
    for side in (0, 1):                                                     # vecs = the selected columns
        idx = cells[side].unsqueeze(-2).expand(*cells.shape[1:-1], R_, K)
        assert torch.equal(vecs[side], s[side].gather(-1, idx))
    # the same set with (u, t) -> (-u, -t): the two-sided search does not depend on the sign
    flipped = tucker_search(s, -uv, core, m, K, proxy_search="two_sided")[0]
    assert _sets_equal(flipped, want, n_s)


def test_signed_is_not_exact_on_the_same_cases():
    """The release's search misses the (-, -) quadrant: recall < 1 where the two-sided search has 1."""
    for shape in SHAPES:
        lead, H, R, n_s, K, m = shape
        s, uv, core = rank1_case(sum(lead) + H + n_s, lead, H, R, n_s)
        want = tucker_exact_topk(s, core, K)[0]
        exact = want[0] * n_s + want[1]
        signed = tucker_search(s, uv, core, m, K)[0]
        two = tucker_search(s, uv, core, m, K, proxy_search="two_sided")[0]
        r_signed = topk_recall(signed[0] * n_s + signed[1], exact).mean().item()
        r_two = topk_recall(two[0] * n_s + two[1], exact).mean().item()
        assert r_two == 1.0
        if math.prod(lead) * H >= 6:                                        # enough (token, head) rows to miss
            assert r_signed < 0.9, shape


def test_two_sided_float32_block_topk_path_is_exact():
    """float32 on CPU: the integer / block-maxima top-k (fast.topk) sees the -inf masked cells."""
    lead, H, R, n_s, K, m = (300,), 1, 2, 32, 8, 8                          # 300 rows x 2m^2 = 128: block path
    s, uv, core = rank1_case(3, lead, H, R, n_s, dtype=torch.float32)
    want_scores = tucker_exact_topk(s.double(), core.double(), K)[1]
    assert bool((want_scores > 0).all())
    cells, scores, _ = tucker_search(s, uv, core, m, K, proxy_search="two_sided")
    torch.testing.assert_close(scores.double(), want_scores, rtol=1e-5, atol=1e-5)  # exact up to rounding
    assert bool((scores.diff(dim=-1) <= 0).all())


def test_overlapping_quadrants_never_select_a_cell_twice():
    """2m > n_s: I+ and I- share rows, so some cells lie in both quadrants; each is selected once,
    and the result is the top-K of the readable union of the two quadrants."""
    gen = torch.Generator().manual_seed(5)
    H, R, n_s, K, m = 2, 3, 6, 16, 5                                        # K close to m^2
    s = torch.randn(2, 10, H, R, n_s, generator=gen, dtype=torch.float64)
    core = torch.randn(H, R, R, generator=gen, dtype=torch.float64)        # general (rank 3) core
    U, _, Vh = torch.linalg.svd(core)
    uv = torch.stack((U[..., :, 0], Vh[..., 0, :]))
    cells, scores, _ = two_sided_tucker_search(s, uv, core, m, K)
    slots = cells[0] * n_s + cells[1]                                       # (10, H, K)
    assert bool((slots.sort(-1).values.diff(dim=-1) > 0).all())             # distinct within each row
    grid = torch.einsum("thai,hab,thbj->thij", s[0], core, s[1])            # (10, H, n_s, n_s)
    for tok in range(10):
        for h in range(H):
            p, q = uv[0, h] @ s[0, tok, h], uv[1, h] @ s[1, tok, h]
            keep = torch.zeros(n_s, n_s, dtype=torch.bool)
            keep[p.topk(m).indices[:, None], q.topk(m).indices] = True
            keep[(-p).topk(m).indices[:, None], (-q).topk(m).indices] = True
            want_scores, want_slots = grid[tok, h].masked_fill(~keep, float("-inf")).flatten().topk(K)
            assert torch.equal(slots[tok, h], want_slots)
            torch.testing.assert_close(scores[tok, h], want_scores)


def test_all_equal_proxies_select_distinct_cells():
    """Proxies that are all exactly 0 (side scores orthogonal to u and t, here C = diag(2, 1),
    u = t = e_1, S = [0; a]) make I+ and I- the same rows, so the two quadrants are the same cells;
    the search must still return K distinct cells, the top-K of the m x m grid (both top-k paths)."""
    for dtype in (torch.float32, torch.float64):
        gen = torch.Generator().manual_seed(0)
        n_s, m, K = 9, 3, 6
        s = torch.zeros(2, 5, 1, 2, n_s, dtype=dtype)
        s[:, :, :, 1] = torch.randn(2, 5, 1, n_s, generator=gen, dtype=dtype)  # component 2 only
        core = torch.diag(torch.tensor([2.0, 1.0], dtype=dtype)).unsqueeze(0)   # (1, 2, 2)
        uv = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]], dtype=dtype)         # (2, 1, 2): u = t = e_1
        cells, scores, _ = two_sided_tucker_search(s, uv, core, m, K)
        slots = cells[0] * n_s + cells[1]
        assert bool((slots.sort(-1).values.diff(dim=-1) > 0).all())         # distinct within each row
        proxy = torch.einsum("r,stnrj->stnj", uv[0, 0], s)
        assert bool((proxy == 0).all())
        rows, cols = exact_topk(proxy[0], m, False)[1], exact_topk(proxy[1], m, False)[1]  # I+ = I-, same ties
        sub = s[1, :, :, 1].gather(-1, cols)[..., None, :] * s[0, :, :, 1].gather(-1, rows)[..., :, None]
        torch.testing.assert_close(scores, sub.flatten(-2).topk(K).values)  # top-K of ONE m x m grid


def test_tucker_search_rejects_unknown_proxy_search():
    s, uv, core = rank1_case(0, (2,), 1, 2, 5)
    with pytest.raises(ValueError, match="proxy_search='both'"):
        tucker_search(s, uv, core, 3, 3, proxy_search="both")


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------


def make(seed: int = 0, **kw) -> UltraMem:
    torch.manual_seed(seed)
    cfg = dict(d_model=12, n_keys=3, heads=2, k_dim=6, top_k=3, d_value=8)
    layer = UltraMem(UltraMemConfig(**{**cfg, **kw})).double()
    layer.refresh_retrieval()
    return layer


def with_summed_core(layer: UltraMem, singular: list[float], seed: int) -> UltraMem:
    """Set the cores so that their SUM has the given singular values per head (random singular
    vectors; each of the h cores alone is a random matrix), then refresh the proxy."""
    gen = torch.Generator().manual_seed(seed)
    h, H, R, _ = layer.cores.shape
    Q = torch.linalg.qr(torch.randn(2, H, R, R, generator=gen, dtype=torch.float64)).Q
    lam = torch.tensor(singular + [0.0] * (R - len(singular)), dtype=torch.float64)
    target = Q[0] @ torch.diag(lam) @ Q[1].transpose(-1, -2)                # (H, R, R)
    other = torch.randn(h - 1, H, R, R, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        layer.cores.copy_(torch.cat((other, (target - other.sum(0)).unsqueeze(0))))
    layer.refresh_retrieval()
    return layer


def make_rank1(seed: int, **kw) -> UltraMem:
    """A layer whose SUMMED core is rank 1 per head (each of the h cores alone is not)."""
    return with_summed_core(make(seed, **kw), [2.0], seed + 100)


# odd n_s (n_keys 5 or 7, E = 1 or 9), B = 1, one core or two, shared query or not
LAYER_CASES = [
    dict(n_keys=5, expansion=1, top_k=3, n_cores=1),
    dict(n_keys=7, expansion=1, top_k=4, n_cores=2, share_query=False),
    dict(n_keys=3, expansion=9, top_k=4, n_cores=2, rank=3),
    dict(n_keys=4, expansion=4, top_k=5, n_cores=2, candidate_m=6),
]


@pytest.mark.parametrize("kw", LAYER_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_layer_two_sided_exact_and_signed_not_with_rank1_summed_core(kw):
    x = torch.randn(1, 24, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # B = 1
    two = make_rank1(3, proxy_search="two_sided", **kw).eval()
    signed = make_rank1(3, proxy_search="signed", **kw).eval()
    y_ref, slots_ref, scores_ref = ultramem_reference(two, x)               # exact top-K of the full grid
    assert bool((scores_ref > 0).all())                                     # the precondition
    y, aux = two(x)
    assert torch.equal(aux.indices, slots_ref)
    torch.testing.assert_close(aux.scores, scores_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert two.search_recall(x) == 1.0
    assert signed.search_recall(x) < 0.9                                    # misses the (-, -) quadrant


GENERAL_CASES = [                                                          # n_s = 6 > m everywhere
    dict(rank=2, n_cores=1, expansion=1, n_keys=6),
    dict(rank=2, n_cores=2, expansion=4, share_query=False),
    dict(rank=3, n_cores=2, expansion=4, norm_type="rmsnorm"),
    dict(rank=2, n_cores=2, expansion=4, candidate_m=4, top_k=7),          # 2m > n_s = 6: overlap
    dict(rank=2, n_cores=1, expansion=1, n_keys=6, score_activation="softmax"),
]


@pytest.mark.parametrize("proxy_search", ["two_sided", "signed"])
@pytest.mark.parametrize("kw", GENERAL_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_fast_equals_readable_search_forward_and_gradients(kw, proxy_search):
    """General (rank > 1) summed cores, m < n_s: the fast search selects what the readable one does
    (the masks of :func:`search_candidates`), and outputs and gradients agree."""
    R = kw["rank"]
    # far from rank 1 (lambda_2 = 0.6 lambda_1), so the proxy search is really approximate
    layer = with_summed_core(make(7, proxy_search=proxy_search, **kw), [2.0, 1.2, 0.7][:R], 2)
    x = torch.randn(2, 4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    w = torch.randn(2, 4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    params = [p for p in layer.parameters() if p.requires_grad]
    y, aux = layer(x)
    g_fast = torch.autograd.grad((y * w).sum(), params)
    y_ref, slots_ref, scores_ref = ultramem_reference(layer, x, exact=False)
    g_ref = torch.autograd.grad((y_ref * w).sum(), params)
    assert torch.equal(aux.indices, slots_ref)
    torch.testing.assert_close(aux.scores, scores_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for p, a, b in zip(params, g_fast, g_ref):
        assert b.abs().max() > 0 or p is layer.query_gain                   # every part is exercised
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert y.abs().max() > 1e-3
    if proxy_search == "signed":                                            # the cases are approximate
        assert layer.search_recall(x) < 1.0


def test_search_candidates_counts_and_two_sided_recall_not_below_signed():
    layer = make(4, proxy_search="two_sided", n_keys=5, expansion=1, top_k=4)  # n_s = 5, m = 4: overlap
    s_row, s_col = layer.side_scores(torch.randn(1, 12, dtype=torch.float64))
    keep = search_candidates(layer, 0, s_row[0, 0], s_col[0, 0])
    p, q = layer.u[0] @ s_row[0, 0], layer.t[0] @ s_col[0, 0]
    n_pos = (p.topk(4).indices[:, None] == p.neg().topk(4).indices).any(-1).sum()  # rows in I+ and I-
    n_col = (q.topk(4).indices[:, None] == q.neg().topk(4).indices).any(-1).sum()
    assert int(keep.sum()) == 2 * 16 - int(n_pos) * int(n_col)             # |union| = 2 m^2 - |overlap|
    # recall: the two-sided candidates contain the signed ones, so its recall is never lower
    x = torch.randn(40, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for kw in GENERAL_CASES[:3]:
        two, signed = make(9, proxy_search="two_sided", **kw), make(9, **kw)
        assert two.search_recall(x) >= signed.search_recall(x)


def test_search_recall_is_the_measured_overlap_with_the_exact_topk():
    """search_recall == |found ∩ exact| / K averaged over tokens and heads, by hand; 1.0 when the
    candidates cover the grid or the search is additive."""
    layer = make(1, n_keys=6, expansion=1, top_k=3)                         # signed, m = 3 < n_s = 6
    x = torch.randn(3, 5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, aux = layer(x)
    _, exact, _ = ultramem_reference(layer, x)
    found, want = aux.indices.view(15, 2, 3), exact.view(15, 2, 3)
    by_hand = sum(len(set(found[t, h].tolist()) & set(want[t, h].tolist())) for t in range(15)
                  for h in range(2)) / (15 * 2 * 3)
    assert by_hand < 1.0
    assert layer.search_recall(x) == pytest.approx(by_hand, abs=1e-7)
    assert make(1, n_keys=6, expansion=1, top_k=3, candidate_m=6).search_recall(x) == 1.0
    additive = make(1, n_keys=6, expansion=1, top_k=3, scoring="additive", rank=1, n_cores=1)
    assert additive.search_recall(x) == 1.0


def test_search_recall_in_token_chunks(monkeypatch):
    from labcore.layers.fast import search as search_mod
    layer = make(2, n_keys=6, expansion=1, top_k=3)
    x = torch.randn(50, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    whole = layer.search_recall(x)
    monkeypatch.setattr(search_mod, "SEARCH_CHUNK_BYTES", 2 * 36 * 8 * 7)  # 7 tokens per chunk
    assert layer.search_recall(x) == pytest.approx(whole, abs=1e-7)


def test_paper_init_calibrates_through_the_two_sided_search():
    """Paper init: the q/k gains make the mean selected score ~1 through THIS layer's search; the
    two-sided search finds higher scores, so its calibrated gain is smaller than the signed one."""
    kw = dict(d_model=32, n_keys=16, heads=2, k_dim=32, top_k=8, d_value=16, init="paper")
    gains = {}
    for mode in ("signed", "two_sided"):
        torch.manual_seed(17)
        layer = UltraMem(UltraMemConfig(**kw, proxy_search=mode)).eval()
        _, aux = layer(torch.randn(512, 32))
        assert 0.75 < aux.stats["mean_score"] < 1.33
        gains[mode] = float(layer.query_gain.detach()[0])
    assert gains["two_sided"] < gains["signed"]


# ---------------------------------------------------------------------------------------------
# config and cost
# ---------------------------------------------------------------------------------------------


def test_bad_proxy_search_rejected():
    base = dict(d_model=12, n_keys=3, heads=2, k_dim=6, top_k=3, d_value=8)
    with pytest.raises(ConfigError) as err:
        UltraMemConfig(**base, proxy_search="both")
    msg = str(err.value)
    assert "UltraMemConfig.proxy_search='both'" in msg and "must be" in msg and "'two_sided'" in msg
    with pytest.raises(ConfigError) as err:
        UltraMemConfig(**base, proxy_search="two_sided", scoring="additive", rank=1, n_cores=1)
    assert "UltraMemConfig.proxy_search='two_sided'" in str(err.value) and "additive" in str(err.value)
    assert UltraMemConfig(**base).proxy_search == "signed"                  # the release's search by default
    assert UltraMemConfig.from_dict({**base, "proxy_search": "two_sided"}).proxy_search == "two_sided"


def test_cost_counts_both_candidate_quadrants():
    # H=2, R=2, m=K=3 (TINY): the candidate scoring m R^2 + m^2 R MACs per head is done twice
    base = dict(d_model=12, n_keys=3, heads=2, k_dim=6, top_k=3, d_value=8)
    signed = UltraMemConfig(**base).cost().flops_per_token
    two = UltraMemConfig(**base, proxy_search="two_sided").cost().flops_per_token
    assert two - signed == 2 * 2 * (3 * 4 + 9 * 2)
    assert UltraMemConfig(**base, proxy_search="two_sided").cost().params == UltraMemConfig(**base).cost().params


@pytest.mark.gpu
def test_cuda_two_sided_matches_readable_and_cpu():
    layer = with_summed_core(make(11, proxy_search="two_sided", expansion=4, candidate_m=4, top_k=7),
                             [2.0, 1.2], 3)                                 # 2m > n_s = 6: overlapping quadrants
    x = torch.randn(3, 5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y_cpu, aux_cpu = layer(x)
    gpu = layer.to("cuda")
    y, aux = gpu(x.cuda())
    y_ref, slots_ref, _ = ultramem_reference(gpu, x.cuda(), exact=False)
    assert torch.equal(aux.indices, slots_ref)
    assert torch.equal(aux.indices.cpu(), aux_cpu.indices)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y.cpu(), y_cpu, rtol=1e-10, atol=1e-12)
    assert gpu.search_recall(x.cuda()) == pytest.approx(layer.to("cpu").search_recall(x), abs=1e-7)
