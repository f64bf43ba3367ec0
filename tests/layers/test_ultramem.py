"""UltraMem: fast path vs brute force, the PKM special case, IVE, MCS, the search proxy, aux loss,
init modes, costs and config validation. Tiny sizes, float64 where outputs are compared."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from labcore.config import ConfigError
from labcore.layers.base import LayerAux, param_role
from labcore.layers.pkm import PKM, PKMConfig
from labcore.layers.ultramem import (
    UltraMem,
    UltraMemAux,
    UltraMemConfig,
    ultramem_from_pkm,
    ultramem_reference,
)

TINY = dict(d_model=12, n_keys=3, heads=2, k_dim=6, top_k=3, d_value=8)


def make(seed: int = 0, dtype=torch.float64, **kw) -> UltraMem:
    torch.manual_seed(seed)
    layer = UltraMem(UltraMemConfig(**{**TINY, **kw})).to(dtype)
    layer.refresh_retrieval()                                                # proxy in the new dtype
    return layer


def dense_grids(layer: UltraMem, x2d: torch.Tensor) -> torch.Tensor:
    """Summed-core score of every virtual slot: (N_tok, H, n_s^2), computed independently of search()."""
    s_row, s_col = layer.side_scores(x2d)                                    # (N_tok, H, R, n_s)
    if layer.cfg.scoring == "additive":
        g = s_row[:, :, 0, :, None] + s_col[:, :, 0, None, :]
    else:
        g = torch.einsum("thai,hab,thbj->thij", s_row, layer.cores.sum(0), s_col)
    return g.flatten(2)


# ---------------------------------------------------------------------------------------------
# fast path == brute-force reference when the candidate set covers the grid
# ---------------------------------------------------------------------------------------------

CASES = [
    dict(scoring="tucker", n_cores=h, expansion=E, share_query=sq)
    for h in (1, 2) for E in (1, 4) for sq in (True, False)
] + [
    dict(scoring="additive", rank=1, n_cores=1, expansion=E, share_query=sq)
    for E in (1, 4) for sq in (True, False)
] + [
    dict(scoring="additive", rank=1, n_cores=1, expansion=1, score_activation="softmax", value_proj=False,
         d_value=12, qk_norm=False, query_bias=True),
    dict(scoring="tucker", rank=3, n_cores=2, expansion=4, norm_type="rmsnorm"),
    dict(scoring="tucker", rank=2, n_cores=1, expansion=1, score_activation="softmax"),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_fast_equals_reference_when_candidates_cover_grid(kw):
    n_side = math.isqrt(kw["expansion"]) * TINY["n_keys"]
    layer = make(**kw, candidate_m=n_side).eval()
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    y, aux = layer(x)
    y_ref, slots_ref, scores_ref = ultramem_reference(layer, x)
    assert isinstance(aux, UltraMemAux)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(aux.indices, slots_ref)
    torch.testing.assert_close(aux.scores, scores_ref, rtol=1e-10, atol=1e-12)
    assert y.abs().max() > 1e-3                                              # not trivially zero


def test_approximate_search_rescoring_is_exact_and_recall_measured():
    """candidate_m < n_s: rows come from the proxy top-m, scores are exact, recall is reported."""
    torch.manual_seed(1)
    cfg = UltraMemConfig(d_model=16, n_keys=16, heads=2, k_dim=8, top_k=8, d_value=8, expansion=1)
    layer = UltraMem(cfg).double().eval()
    x = torch.randn(64, 16, dtype=torch.float64)
    with torch.no_grad():
        _, aux = layer(x)
        _, slots_ref, _ = ultramem_reference(layer, x)
        grid = dense_grids(layer, x)                                         # (N_tok, H, n^2)
        s_row, s_col = layer.side_scores(x)
    n_tok, H, K, m, ns = 64, 2, 8, cfg.m, cfg.n_side
    slots = aux.indices.view(n_tok, H, K)
    # the scores applied are the exact summed-core grid values at the chosen slots
    torch.testing.assert_close(aux.scores.view(n_tok, H, K), grid.gather(-1, slots))
    # every chosen row/column is among the top-m of its proxy u^T S_row / t^T S_col
    proxy_r = torch.einsum("thrn,hr->thn", s_row, layer.u)
    proxy_c = torch.einsum("thrn,hr->thn", s_col, layer.t)
    top_r = proxy_r.topk(m, -1).indices
    top_c = proxy_c.topk(m, -1).indices
    assert (slots // ns).unsqueeze(-1).eq(top_r.unsqueeze(-2)).any(-1).all()
    assert (slots % ns).unsqueeze(-1).eq(top_c.unsqueeze(-2)).any(-1).all()
    # recall against the exact top-K of all n^2 slots (measured, loosely bounded). The release
    # keeps only the LARGEST proxies, so exact cells in the (negative, negative) proxy quadrant are
    # missed: at init (symmetric scores) that is about half of them.
    ref = slots_ref.view(n_tok, H, K)
    hits = (slots.unsqueeze(-1) == ref.unsqueeze(-2)).any(-1).float().mean().item()
    pos = ((proxy_r.gather(-1, ref // ns) > 0) & (proxy_c.gather(-1, ref % ns) > 0)).float().mean().item()
    print(f"TDQKR rank-1 proxy recall (m={m}, n_s={ns}, K={K}): {hits:.3f}; "
          f"exact cells with both proxies > 0: {pos:.3f}")
    assert 0.3 < hits < 1.0
    assert hits <= pos + 0.05                                                # misses the negative quadrant


# ---------------------------------------------------------------------------------------------
# IVE: E virtual blocks == an E=1 memory holding the projected copies
# ---------------------------------------------------------------------------------------------


def _copy_retrieval(dst: UltraMem, src: UltraMem) -> None:
    with torch.no_grad():
        dst.query.weight.copy_(src.query.weight)
        dst.keys.copy_(src.keys)
        dst.cores.copy_(src.cores)
        dst.query_gain.copy_(src.query_gain)
        dst.key_gain.copy_(src.key_gain)
    dst.refresh_retrieval()


def _virtual_rows(layer: UltraMem) -> tuple[torch.Tensor, torch.Tensor]:
    N = layer.cfg.n_slots
    return layer.perm % N, layer.perm // N                                   # (E*N,) row, block


def test_ive_equals_expanded_table_general_projectors():
    """E=4 with projectors W_p == E=1 with n_s keys and table V'[v] = W_{p(v)} V[r(v)] (h = 1)."""
    a = make(seed=2, n_cores=1, expansion=4, d_value=5)
    b = make(seed=3, n_cores=1, expansion=1, n_keys=6, value_proj=False, d_value=12)
    _copy_retrieval(b, a)
    row, block = _virtual_rows(a)
    Dv = 5
    W = a.value_proj.weight.view(12, 4, Dv)                                  # (D, E, D_v): W_p = W[:, p]
    with torch.no_grad():
        b.values.weight.copy_(torch.einsum("vd,vod->vo", a.values.weight[row], W[:, block].permute(1, 0, 2)))
    x = torch.randn(7, 12, dtype=torch.float64)
    ya, aux_a = a(x)
    yb, aux_b = b(x)
    assert torch.equal(aux_a.indices, aux_b.indices)                         # same search, same slots
    # pigeonhole: 6 selections in 4 blocks -> some token has two in one block (summing matters)
    blocks = block[aux_a.indices]
    assert any(len(set(r.tolist())) < r.numel() for r in blocks)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)


def test_ive_identity_projectors_and_copies_equal_single_table_with_mcs():
    """h = 2, D_v = D, W = [I I I I]: E=4 == E=1 whose table holds V[r(v)] for every virtual v."""
    a = make(seed=4, n_cores=2, expansion=4, d_value=12)
    b = make(seed=5, n_cores=2, expansion=1, n_keys=6, value_proj=False, d_value=12)
    _copy_retrieval(b, a)
    row, _ = _virtual_rows(a)
    with torch.no_grad():
        a.value_proj.weight.copy_(torch.eye(12, dtype=torch.float64).repeat(1, 4))  # (D, E*D)
        b.values.weight.copy_(a.values.weight[row])                           # E shuffled copies
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    ya, aux_a = a(x)
    yb, aux_b = b(x)
    assert torch.equal(aux_a.indices, aux_b.indices)
    torch.testing.assert_close(aux_a.core_scores, aux_b.core_scores)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)


def test_mcs_core_scores_sum_to_selection_score_and_weight_their_chunk():
    layer = make(seed=6, n_cores=2, expansion=1, value_proj=False, d_value=12)
    x = torch.randn(5, 12, dtype=torch.float64)
    y, aux = layer(x)
    torch.testing.assert_close(aux.core_scores.sum(-1), aux.scores)
    V = layer.values.weight
    manual = torch.cat([(aux.core_scores[..., c, None] * V[aux.indices][..., 6 * c:6 * (c + 1)]).sum(1)
                        for c in range(2)], dim=-1)                          # chunk c by core c
    torch.testing.assert_close(y, manual)
    assert not torch.allclose(aux.core_scores[..., 0], aux.core_scores[..., 1])


# ---------------------------------------------------------------------------------------------
# PKM is a special case
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d_value", [None, 6])
def test_pkm_through_ultramem_equals_pkm(d_value):
    # float32: PKM takes its softmax in float32 (XLM's .float()), so float64 would differ by rounding
    torch.manual_seed(7)
    pkm = PKM(PKMConfig(d_model=10, n_keys=8, heads=3, k_dim=8, top_k=5, query_norm="none",
                        d_value=d_value)).eval()
    um = ultramem_from_pkm(pkm).eval()
    assert um.cfg.scoring == "additive" and um.cfg.score_activation == "softmax" and um.cfg.expansion == 1
    assert um.cfg.k_dim == 4 and um.cfg.candidate_m == 5
    x = torch.randn(2, 9, 10)
    y_p, aux_p = pkm(x)
    y_u, aux_u = um(x)
    # PKM leaves each head's K unordered: compare per head as sets of (slot, weight), slot-sorted
    def per_head(aux):
        slots, order = aux.indices.view(18, 3, 5).sort(dim=-1)
        return slots, aux.scores.view(18, 3, 5).gather(-1, order)
    (s_u, w_u), (s_p, w_p) = per_head(aux_u), per_head(aux_p)
    assert torch.equal(s_u, s_p)
    torch.testing.assert_close(w_u, w_p, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y_u, y_p, rtol=1e-6, atol=1e-7)
    assert y_p.abs().max() > 1e-2


def test_ultramem_from_pkm_refuses_what_it_cannot_represent():
    pkm = PKM(PKMConfig(d_model=10, n_keys=8, heads=2, k_dim=8, top_k=4, query_norm="layernorm"))
    with pytest.raises(ValueError, match="query_norm"):
        ultramem_from_pkm(pkm)


# ---------------------------------------------------------------------------------------------
# refresh_retrieval: rank-1 proxy of the summed core with sign smoothing
# ---------------------------------------------------------------------------------------------


def test_refresh_gives_leading_singular_vectors_of_summed_core():
    layer = make(seed=8, n_cores=2, rank=3, expansion=1)
    C = layer.cores.detach().sum(0)                                          # (H, R, R)
    for h in range(2):
        U, S, Vh = torch.linalg.svd(C[h])
        u, t = layer.u[h], layer.t[h]
        assert abs(float(u @ U[:, 0])) == pytest.approx(1.0, abs=1e-10)
        assert abs(float(t @ Vh[0])) == pytest.approx(1.0, abs=1e-10)
        assert float(u @ C[h] @ t) == pytest.approx(float(S[0]), rel=1e-10)  # same sign on u and t


def test_refresh_sign_follows_previous_vectors():
    layer = make(seed=9, n_cores=2, expansion=1)
    u0, t0 = layer.u.clone(), layer.t.clone()
    layer.u.neg_()                                                           # pretend last step had -u, -t
    layer.t.neg_()
    layer.refresh_retrieval()
    torch.testing.assert_close(layer.u, -u0)
    torch.testing.assert_close(layer.t, -t0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):                                                      # small optimiser-like steps
        prev_u, prev_t = layer.u.clone(), layer.t.clone()
        with torch.no_grad():
            layer.cores.add_(0.02 * torch.randn(layer.cores.shape, generator=gen, dtype=torch.float64))
        layer.refresh_retrieval()
        assert ((layer.u * prev_u).sum(-1) > 0).all() and ((layer.t * prev_t).sum(-1) > 0).all()


def test_refresh_is_noop_for_additive():
    layer = make(scoring="additive", rank=1, n_cores=1)
    layer.refresh_retrieval()
    assert layer.cores is None and not hasattr(layer, "u")


# ---------------------------------------------------------------------------------------------
# Tucker aux loss
# ---------------------------------------------------------------------------------------------


def test_tucker_aux_loss_value_switch_and_gradient():
    layer = make(seed=10, n_cores=2, expansion=1, tucker_aux=True, tucker_aux_coef=0.01)
    with torch.no_grad():
        layer.cores.zero_()
        layer.cores[0, 0] = torch.tensor([[1.5, 0.0], [0.0, 0.25]])          # head 0: sum diag(2, .5)
        layer.cores[1, 0] = torch.tensor([[0.5, 0.0], [0.0, 0.25]])
        layer.cores[0, 1] = torch.tensor([[0.0, 1.0], [0.1, 0.0]])           # head 1: lambda = (1, .1)
    x = torch.randn(3, 12, dtype=torch.float64)
    _, aux = layer(x)
    expected = ((0.5 - 0.15) ** 2 + 0.0) / 2                                 # mean over heads, R-1 = 1
    assert float(aux.losses["tucker"].detach()) == pytest.approx(expected, rel=1e-12)
    assert float(aux.aux_loss.detach()) == pytest.approx(0.01 * expected, rel=1e-12)
    assert aux.stats["lambda1"] == pytest.approx(1.5) and aux.stats["lambda2"] == pytest.approx(0.3)
    aux.aux_loss.backward()
    # d/dC[1,1] of 0.01 * 1/2 * (lambda2 - tau)^2 with lambda2 = C[1,1] for both cores of head 0
    g = layer.cores.grad
    assert float(g[0, 0, 1, 1]) == pytest.approx(0.01 * 0.5 * 2 * 0.35, rel=1e-9)
    assert float(g[1, 0, 1, 1]) == pytest.approx(0.01 * 0.5 * 2 * 0.35, rel=1e-9)
    assert float(g[:, 1].abs().max()) == 0.0                                 # head 1 under the margin
    # switch off: reported, not added
    off = make(seed=10, n_cores=2, expansion=1, tucker_aux=False)
    off.load_state_dict(layer.state_dict())
    _, aux_off = off(x)
    assert float(aux_off.aux_loss) == 0.0
    assert float(aux_off.losses["tucker"].detach()) == pytest.approx(expected, rel=1e-12)


def test_tucker_aux_rank3_and_absent_for_additive():
    layer = make(seed=11, rank=3, n_cores=1, expansion=1)
    with torch.no_grad():
        layer.cores[0, 0] = torch.diag(torch.tensor([3.0, 1.0, 0.2], dtype=torch.float64))
        layer.cores[0, 1] = torch.diag(torch.tensor([1.0, 0.1, 0.1], dtype=torch.float64))
    _, aux = layer(torch.randn(2, 12, dtype=torch.float64))
    expected = (((1.0 - 0.15) ** 2 + (0.2 - 0.15) ** 2) / 2 + 0.0) / 2
    assert float(aux.losses["tucker"].detach()) == pytest.approx(expected, rel=1e-12)
    _, aux_add = make(scoring="additive", rank=1, n_cores=1)(torch.randn(2, 12, dtype=torch.float64))
    assert "tucker" not in aux_add.losses and float(aux_add.aux_loss) == 0.0


# ---------------------------------------------------------------------------------------------
# gradients, determinism, roles, aux record
# ---------------------------------------------------------------------------------------------


def test_gradients_reach_every_trainable_parameter():
    layer = make(seed=12, n_cores=2, expansion=4, tucker_aux=True, query_bias=True).train()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    ((y ** 2).sum() + aux.aux_loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_same_seed_bitwise_identical_and_perm_from_config_seed():
    x = torch.randn(3, 4, 12)
    a, b = make(seed=13, dtype=torch.float32), make(seed=13, dtype=torch.float32)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    ya, _ = a(x)
    yb, _ = b(x)
    assert torch.equal(ya, yb)
    assert torch.equal(make(seed=1).perm, make(seed=2).perm)                 # perm: cfg.seed only
    other = UltraMem(UltraMemConfig(**TINY, seed=5))
    assert not torch.equal(other.perm, a.perm)
    assert sorted(a.perm.tolist()) == list(range(a.cfg.n_virtual))          # a permutation


def test_param_roles_and_aux_record():
    layer = make(seed=14, query_bias=True)
    roles = {name: param_role(p) for name, p in layer.named_parameters()}
    assert roles["values.weight"] == "memory_values"
    for name in ("keys", "cores", "query_gain", "key_gain", "query.bias"):
        assert roles[name] == "no_decay", name
    assert roles["query.weight"] == "default" and roles["value_proj.weight"] == "default"
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    y, aux = layer(x)
    assert isinstance(aux, LayerAux)
    assert aux.indices.shape == (6, 6) and aux.scores.shape == (6, 6) and aux.core_scores.shape == (6, 6, 2)
    assert aux.counts.shape == (layer.cfg.n_virtual,) and int(aux.counts.sum()) == 36
    assert torch.equal(aux.counts, torch.bincount(aux.indices.flatten(), minlength=layer.cfg.n_virtual))
    s = aux.scores.view(6, 2, 3)
    assert (s[..., :-1] >= s[..., 1:]).all()                                 # descending per head
    assert aux.stats["top1_score"] == pytest.approx(float(s[..., 0].mean()), rel=1e-6)
    assert aux.stats["mth_score"] == pytest.approx(float(s[..., -1].mean()), rel=1e-6)
    assert aux.stats["output_std"] == pytest.approx(float(y.detach().std()), rel=1e-6)
    assert {"lambda1", "lambda2", "coverage", "mean_score"} <= set(aux.stats)


def test_external_value_table_is_used_and_checked():
    torch.manual_seed(15)
    table = torch.nn.Embedding(9, 8)
    layer = UltraMem(UltraMemConfig(**TINY, expansion=1), values=table)
    assert layer.values is table
    with pytest.raises(ConfigError, match="values.weight"):
        UltraMem(UltraMemConfig(**TINY, expansion=1), values=torch.nn.Embedding(10, 8))
    with pytest.raises(ValueError, match="input x"):
        layer(torch.randn(3, 11))


# ---------------------------------------------------------------------------------------------
# initialisation modes
# ---------------------------------------------------------------------------------------------


def test_release_init_statistics():
    torch.manual_seed(16)
    cfg = UltraMemConfig(d_model=32, n_keys=32, heads=2, k_dim=32, top_k=8, d_value=32)
    layer = UltraMem(cfg)
    assert float(layer.values.weight.detach().std()) == pytest.approx(0.02, rel=0.03)
    assert float(layer.keys.detach().std()) == pytest.approx(32 ** -0.5, rel=0.03)
    assert float(layer.query.weight.detach().std()) == pytest.approx(32 ** -0.5, rel=0.05)
    assert float(layer.value_proj.weight.detach().std()) == pytest.approx((4 * 32) ** -0.5, rel=0.05)
    assert torch.all(layer.query_gain == 32 ** -0.33) and torch.all(layer.key_gain == 32 ** -0.33)
    assert float(layer.cores.detach().min()) >= 0.0 and float(layer.cores.detach().max()) < 1.0


@pytest.mark.parametrize("kw", [dict(), dict(scoring="additive", rank=1, n_cores=1),
                                dict(norm_type="rmsnorm", share_query=False, expansion=1)])
def test_paper_init_values_std_and_mean_selected_score_near_one(kw):
    torch.manual_seed(17)
    cfg = UltraMemConfig(d_model=32, n_keys=16, heads=2, k_dim=32, top_k=8, d_value=16, init="paper",
                         n_model_layers=3, **kw)
    layer = UltraMem(cfg).eval()
    want = math.sqrt(cfg.expansion / (2 * 8 * 2 * 3))
    assert float(layer.values.weight.detach().std()) == pytest.approx(want, rel=0.08)
    _, aux = layer(torch.randn(512, 32))
    assert 0.75 < aux.stats["mean_score"] < 1.33
    # the switch changes the value scale
    release = UltraMem(cfg.replace(init="release"))
    assert float(release.values.weight.detach().std()) == pytest.approx(0.02, rel=0.08)


# ---------------------------------------------------------------------------------------------
# cost
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(), dict(share_query=False, query_bias=True, expansion=1),
                                dict(scoring="additive", rank=1, n_cores=1, value_proj=False, d_value=12,
                                     expansion=1, qk_norm=False, score_activation="softmax")])
def test_cost_params_exact_by_part(kw):
    layer = make(**kw)
    cost = layer.cost()
    numel = {n: p.numel() for n, p in layer.named_parameters()}
    part = {"query": numel.get("query.weight", 0) + numel.get("query.bias", 0),
            "norms": numel.get("query_gain", 0) + numel.get("key_gain", 0),
            "keys": numel["keys"], "cores": numel.get("cores", 0), "values": numel["values.weight"],
            "value_proj": numel.get("value_proj.weight", 0)}
    assert dict(cost.params) == part
    assert cost.total_params == sum(numel.values())
    assert cost.sparse_part == "values" and cost.n_units == layer.cfg.n_slots
    assert cost.units_per_token == layer.cfg.heads * layer.cfg.top_k and cost.unit_params == layer.cfg.d_v


def test_cost_flops_hand_count():
    # D=12, H=2 shared query, D_k=6, R=2, h=2, E=4 (n_s=6), D_v=8, K=3, m=3
    cfg = UltraMemConfig(**TINY)
    by_hand = (2 * 12 * 12                    # query 12 -> 2*6
               + 2 * 2 * 2 * 6 * 6 * 2        # key scores: H * 2 sides * n_s * D_k * R
               + 2 * 2 * 2 * 6 * 2            # proxies
               + 2 * 2 * (3 * 4 + 9 * 2)      # candidates: m R^2 + m^2 R per head
               + 2 * 2 * 3 * 2 * (4 + 2)      # per-core rescoring of H*K cells
               + 2 * 2 * 3 * 8                # gather-sum H*K*D_v
               + 2 * 32 * 12)                 # projection E*D_v -> D
    assert cfg.cost().flops_per_token == by_hand


# ---------------------------------------------------------------------------------------------
# config validation
# ---------------------------------------------------------------------------------------------

BAD = [
    (dict(expansion=3), "expansion=3"),
    (dict(top_k=4), "top_k=4"),
    (dict(candidate_m=7), "candidate_m=7"),
    (dict(candidate_m=2, top_k=5), "top_k=5"),
    (dict(d_value=7), "d_value=7"),
    (dict(rank=0), "rank=0"),
    (dict(n_keys=0), "n_keys=0"),
    (dict(d_model=-4), "d_model=-4"),
    (dict(scoring="multiplicative"), "scoring='multiplicative'"),
    (dict(score_activation="relu"), "score_activation='relu'"),
    (dict(init="xavier"), "init='xavier'"),
    (dict(norm_type="batchnorm"), "norm_type='batchnorm'"),
    (dict(value_proj=False, expansion=1, d_value=8), "d_value=8"),
    (dict(value_proj=False, expansion=4, d_value=12), "value_proj=False"),
    (dict(scoring="additive", rank=2, n_cores=1), "rank=2"),
    (dict(scoring="additive", rank=1, n_cores=2), "n_cores=2"),
    (dict(score_activation="softmax", n_cores=2), "n_cores=2"),
    (dict(scoring="additive", rank=1, n_cores=1, tucker_aux=True), "tucker_aux=True"),
    (dict(init="paper", qk_norm=False), "init='paper'"),
    (dict(qk_norm="yes"), "qk_norm='yes'"),
    (dict(tucker_aux_coef=-0.1), "tucker_aux_coef=-0.1"),
    (dict(k_dim=2.5), "k_dim=2.5"),
]


@pytest.mark.parametrize("kw,needle", BAD, ids=[b[1] for b in BAD])
def test_bad_config_raises_naming_field_and_value(kw, needle):
    with pytest.raises(ConfigError) as err:
        UltraMemConfig(**{**TINY, "expansion": 1, **kw})
    msg = str(err.value)
    assert "UltraMemConfig." + needle in msg and "must be" in msg


def test_unknown_config_key_raises():
    with pytest.raises(ConfigError, match="tucker_rank"):
        UltraMemConfig.from_dict({**TINY, "tucker_rank": 2})
    assert UltraMemConfig.from_dict(TINY) == UltraMemConfig(**TINY)


# ---------------------------------------------------------------------------------------------
# inference paths: float32 int-key top-k, caches of parameter-derived tensors, lean aux
# ---------------------------------------------------------------------------------------------

F32_CASES = [
    dict(d_model=32, n_keys=8, heads=2, k_dim=16, top_k=8, d_value=16, n_cores=2, expansion=4, candidate_m=16),
    dict(d_model=32, n_keys=8, heads=2, k_dim=16, top_k=8, d_value=16, n_cores=1, expansion=1, candidate_m=8,
         share_query=False),
    dict(**TINY, rank=3, n_cores=2, expansion=4, candidate_m=6, norm_type="rmsnorm"),
]


@pytest.mark.parametrize("kw", F32_CASES, ids=["E4-h2", "E1-h1-noshare", "R3-rms"])
def test_float32_inference_matches_reference(kw):
    """float32 in inference mode (int-key top-k, cached keys/core/proxy/projection): same slots as
    brute force over every virtual slot, same output up to float32 rounding, on repeated calls."""
    torch.manual_seed(19)
    layer = UltraMem(UltraMemConfig(**kw)).eval()
    x = torch.randn(2, 3, kw["d_model"])
    with torch.no_grad():
        y_ref, slots_ref, scores_ref = ultramem_reference(layer, x)
    for _ in range(2):                                                       # second call: cache hits
        with torch.inference_mode():
            y, aux = layer(x)
        assert torch.equal(aux.indices, slots_ref)
        torch.testing.assert_close(aux.scores, scores_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)


def test_search_in_token_chunks_changes_nothing(monkeypatch):
    import labcore.layers.fast.search as search_mod

    layer = make(seed=24, n_cores=2, expansion=4, candidate_m=6).eval()
    x = torch.randn(7, 12, dtype=torch.float64)
    y0, aux0 = layer(x)
    per_token = 2 * 2 * 2 * 6 * 8                                            # S: 2 sides x H x R x n_s, float64
    monkeypatch.setattr(search_mod, "SEARCH_CHUNK_BYTES", 3 * per_token)       # chunks of 3, 3, 1 tokens
    y1, aux1 = layer(x)
    assert torch.equal(aux0.indices, aux1.indices)
    torch.testing.assert_close(aux0.core_scores, aux1.core_scores, rtol=1e-12, atol=1e-14)  # matmul blocking
    torch.testing.assert_close(y0, y1, rtol=1e-12, atol=1e-14)
    y_ref, slots_ref, _ = ultramem_reference(layer, x)
    assert torch.equal(aux1.indices, slots_ref)


def test_caches_follow_parameter_updates_and_never_serve_grad_mode():
    layer = make(seed=20, n_cores=2, expansion=4, candidate_m=6, dtype=torch.float32).eval()
    x = torch.randn(5, 12)
    with torch.inference_mode():
        y0 = layer(x)[0]
    with torch.no_grad():                                                    # an "optimiser step"
        layer.keys.add_(0.3 * torch.randn_like(layer.keys))
        layer.key_gain.mul_(1.5)
        layer.cores.add_(0.2)
        layer.value_proj.weight.mul_(-2.0)
    layer.refresh_retrieval()
    fresh = copy.deepcopy(layer)                                             # no cache travels
    with torch.inference_mode():
        y1, aux1 = layer(x)
    y_fresh, aux_fresh = fresh(x)                                            # grad mode: nothing cached
    assert not torch.allclose(y0, y1)
    assert torch.equal(aux1.indices, aux_fresh.indices)
    torch.testing.assert_close(y1, y_fresh.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(aux1.losses["tucker"], aux_fresh.losses["tucker"].detach())
    # load_state_dict writes in place: the next inference call sees the loaded weights
    other = make(seed=21, n_cores=2, expansion=4, candidate_m=6, dtype=torch.float32).eval()
    layer.load_state_dict(other.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(layer(x)[0], other(x)[0].detach(), rtol=1e-6, atol=1e-7)
    # a dtype change replaces the tensors: recomputed in float64
    layer.double()
    layer.refresh_retrieval()
    with torch.inference_mode():
        y64 = layer(x.double())[0]
    assert y64.dtype == torch.float64
    # eval mode WITH grad: the parameters get gradients (no cached, detached tensors in the graph)
    layer.zero_grad()
    layer(x.double())[0].square().sum().backward()
    for name in ("keys", "key_gain", "query_gain", "cores", "value_proj.weight", "values.weight"):
        assert layer.get_parameter(name).grad.abs().sum() > 0, name


@pytest.mark.parametrize("kw", [dict(n_cores=2, expansion=4), dict(scoring="additive", rank=1, n_cores=1)])
def test_detailed_aux_off_drops_only_the_slot_wide_diagnostics(kw):
    layer = make(seed=22, **kw).eval()
    x = torch.randn(7, 12, dtype=torch.float64)
    y, aux = layer(x)
    layer.detailed_aux = False
    y_lean, lean = layer(x)
    assert torch.equal(y, y_lean) and torch.equal(aux.indices, lean.indices)
    assert torch.equal(aux.core_scores, lean.core_scores)
    assert aux.counts is not None and lean.counts is None
    assert set(aux.stats) - set(lean.stats) == {"coverage"}
    for name, value in lean.stats.items():
        assert value == aux.stats[name], name


def test_value_bags_are_the_gather_of_read():
    layer = make(seed=23, n_cores=2, expansion=4)
    x = torch.randn(6, 12, dtype=torch.float64)
    _, aux = layer(x)
    idx, offsets, w = layer.value_bags(aux.indices, aux.core_scores)
    pooled = torch.nn.functional.embedding_bag(idx, layer.value_chunks(), offsets, mode="sum",
                                               per_sample_weights=w)         # (N_tok*h*E, D_v/h)
    assert pooled.shape == (6 * 2 * 4, 4)
    # bag (t, c, p) by hand: sum over t's slots in block p of score^(c) * V[row, chunk c]
    N = layer.cfg.n_slots
    row, block = layer.perm[aux.indices] % N, layer.perm[aux.indices] // N
    V = layer.values.weight.detach().view(N, 2, 4)
    manual = torch.zeros(6, 2, 4, 4, dtype=torch.float64)
    for t in range(6):
        for s in range(aux.indices.shape[1]):
            for c in range(2):
                manual[t, c, block[t, s]] += aux.core_scores[t, s, c] * V[row[t, s], c]
    torch.testing.assert_close(pooled.view(6, 2, 4, 4), manual)
    torch.testing.assert_close(layer.read(aux.indices, aux.core_scores),
                               manual.transpose(1, 2).reshape(6, -1) @ layer.value_proj.weight.detach().T)


@pytest.mark.gpu
def test_cuda_fast_path_matches_reference_and_cpu():
    layer = make(seed=18, n_cores=2, expansion=4, candidate_m=6)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    y_cpu, aux_cpu = layer(x)
    gpu = layer.to("cuda")
    y, aux = gpu(x.cuda())
    y_ref, slots_ref, _ = ultramem_reference(gpu, x.cuda())
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(aux.indices, slots_ref)
    torch.testing.assert_close(y.cpu(), y_cpu, rtol=1e-10, atol=1e-12)
