"""UltraMemV2: the fast path against the per-token reference (forward and gradients, every switch),
the reduction to UltraMem v1, the single projection, pre-values, the key balance loss, ring windows
of a shared pool, init modes, costs, config validation, determinism, registration. Tiny sizes,
float64 where outputs are compared."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from labcore.config import ConfigError
from labcore.layers import registry
from labcore.layers.base import param_role
from labcore.layers.fast import search as fast_search
from labcore.layers.ultramem import UltraMem, UltraMemConfig
from labcore.layers.ultramem_v2 import (
    RingWindow,
    UltraMemV2,
    UltraMemV2Aux,
    UltraMemV2Config,
    ring_window,
    ultramem_v2_reference,
    value_pool,
)
from labcore.lm.optim import build_param_groups

TINY = dict(d_model=12, n_keys=3, heads=1, k_dim=6, top_k=3, d_value=8, d_pre=4)
F64 = torch.float64


def make(seed: int = 0, dtype=F64, pool=None, pre_pool=None, window_start=0, **kw) -> UltraMemV2:
    torch.manual_seed(seed)
    layer = UltraMemV2(UltraMemV2Config(**{**TINY, **kw}), values=pool, pre_values=pre_pool,
                       window_start=window_start).to(dtype)
    layer.refresh_retrieval()                                                # proxy in the new dtype
    return layer


def inputs(n_tok: int = 7, d: int = 12, seed: int = 1, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_tok, d, generator=g, dtype=dtype)


def grads(layer: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    layer.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------
# the fast path against the per-token reference, every switch
# ---------------------------------------------------------------------------------------------

SWITCHES = {
    "v2-default": dict(),
    "E4-single-2heads": dict(expansion=4, heads=2),
    "E4-per_block-own-queries-gelu": dict(expansion=4, heads=2, share_query=False, projection="per_block",
                                          pre_gelu=True),
    "v1-query-no-pre": dict(query_per_rank=False, pre_values=False, d_pre=None, expansion=4),
    "rank3-1core-m5": dict(rank=3, n_cores=1, candidate_m=5, top_k=4, expansion=4),
    "rmsnorm-balance": dict(norm_type="rmsnorm", balance_loss=True, balance_coef=0.5, expansion=4),
    "no-qk-norm": dict(qk_norm=False, heads=2, expansion=9),
    "two-sided-search": dict(proxy_search="two_sided", expansion=4, heads=2, balance_loss=True),
}


@pytest.mark.parametrize("kw", SWITCHES.values(), ids=SWITCHES.keys())
def test_fast_path_equals_per_token_reference_forward_and_gradients(kw):
    layer = make(**kw)
    x = inputs()
    r = torch.randn(7, 12, generator=torch.Generator().manual_seed(5), dtype=F64)
    y, aux = layer(x)
    y_ref, slots, weights, balance = ultramem_v2_reference(layer, x)
    assert torch.equal(aux.indices, slots)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux.core_scores, weights.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux.losses["balance"], balance, rtol=1e-10, atol=1e-12)
    g_fast = grads(layer, (y * r).sum() + aux.losses["balance"])
    g_ref = grads(layer, (y_ref * r).sum() + balance)
    assert g_fast.keys() == g_ref.keys() == {n for n, p in layer.named_parameters()}
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-9, atol=1e-12, msg=name)


def test_reference_search_is_exact_when_candidates_cover_the_grid():
    # m = n_s: every cell is a candidate, so the K slots are the exact top-K of the dense grid
    layer = make(candidate_m=6, expansion=4, top_k=5)
    x = inputs()
    _, aux = layer(x)
    s_row, s_col = layer.side_scores(x)                                     # (N_tok, H, R, n_s)
    grid = torch.einsum("thai,hab,thbj->thij", s_row, layer.cores.sum(0), s_col).flatten(2)
    exact = grid.topk(5, dim=-1).indices.flatten(1)
    assert torch.equal(aux.indices, exact)


def test_query_per_rank_scores_each_component_with_its_own_query():
    layer = make(heads=2, share_query=False)
    x = inputs(3)
    s_row, s_col = layer.side_scores(x)                                     # (N_tok, H, R, n_s)
    q = (x @ layer.query.weight.T).view(3, 2, 2, 2, 6)                      # (t, head, side, rank, d)
    q = F.layer_norm(q, (6,), weight=layer.query_gain, eps=1e-5)
    keys = F.layer_norm(layer.keys, (6,), weight=layer.key_gain, eps=1e-5)  # (H, 2, R, n_s, D_k)
    for a in range(2):
        torch.testing.assert_close(s_row[:, :, a], torch.einsum("thd,hnd->thn", q[:, :, 0, a], keys[:, 0, a]))
        torch.testing.assert_close(s_col[:, :, a], torch.einsum("thd,hnd->thn", q[:, :, 1, a], keys[:, 1, a]))
    assert layer.query.weight.shape == (2 * 2 * 2 * 6, 12)                    # (H * 2 sides * R * D_k, D)
    assert make(query_per_rank=False).query.weight.shape == (2 * 6, 12)


# ---------------------------------------------------------------------------------------------
# the reduction to UltraMem v1
# ---------------------------------------------------------------------------------------------

V1_CASES = {
    "E1": dict(expansion=1),
    "E1-2heads-own-queries": dict(expansion=1, heads=2, share_query=False),
    "E4-per_block": dict(expansion=4, projection="per_block"),
    "E4-per_block-1core-rmsnorm-m4": dict(expansion=4, projection="per_block", n_cores=1, norm_type="rmsnorm",
                                          candidate_m=4, heads=2),
    "E4-per_block-two-sided": dict(expansion=4, projection="per_block", proxy_search="two_sided"),
}


@pytest.mark.parametrize("kw", V1_CASES.values(), ids=V1_CASES.keys())
def test_v1_settings_compute_what_ultramem_computes(kw):
    """pre-values off, one query for all ranks, E = 1 or per-block projection: UltraMem, on copied
    weights, forward and gradients (float64)."""
    v2 = make(query_per_rank=False, pre_values=False, d_pre=None, **kw)
    c = v2.cfg
    v1_cfg = UltraMemConfig(d_model=c.d_model, n_keys=c.n_keys, heads=c.heads, k_dim=c.k_dim, top_k=c.top_k,
                            d_value=c.d_value, rank=c.rank, n_cores=c.n_cores, expansion=c.expansion,
                            share_query=c.share_query, candidate_m=c.candidate_m, norm_type=c.norm_type,
                            proxy_search=c.proxy_search, seed=c.seed)
    torch.manual_seed(3)
    v1 = UltraMem(v1_cfg).to(F64)
    with torch.no_grad():
        for name in ("query.weight", "query_gain", "key_gain", "keys", "cores", "values.weight",
                     "value_proj.weight"):
            v1.get_parameter(name).copy_(v2.get_parameter(name))
        v1.refresh_retrieval()
    if c.expansion > 1:
        assert torch.equal(v1.perm, v2.perm)                                 # same seed, same shuffle
    assert torch.equal(v1.u, v2.u) and torch.equal(v1.t, v2.t)
    x = inputs()
    r = torch.randn(7, 12, generator=torch.Generator().manual_seed(5), dtype=F64)
    y1, a1 = v1(x)
    y2, a2 = v2(x)
    assert torch.equal(a1.indices, a2.indices)
    torch.testing.assert_close(y2, y1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a2.core_scores, a1.core_scores, rtol=1e-12, atol=1e-14)
    g1, g2 = grads(v1, (y1 * r).sum()), grads(v2, (y2 * r).sum())
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-10, atol=1e-14, msg=name)


def test_single_projection_is_per_block_with_tied_projectors():
    """o = W^T sum_p pooled_p (U2 eq. 12) equals sum_p W_p^T pooled_p (eq. 9) with every W_p = W."""
    single = make(expansion=4, heads=2)
    per_block = make(expansion=4, heads=2, projection="per_block")
    per_block.load_state_dict(single.state_dict() | {"value_proj.weight": single.value_proj.weight.repeat(1, 4)})
    assert per_block.value_proj.weight.shape == (12, 4 * 8)
    x = inputs()
    torch.testing.assert_close(single(x)[0], per_block(x)[0], rtol=1e-12, atol=1e-14)
    untied = per_block.value_proj.weight.detach().clone()
    untied[:, 8:] *= 2.0                                                      # blocks 1..3 differ from block 0
    with torch.no_grad():
        per_block.value_proj.weight.copy_(untied)
    assert not torch.allclose(single(x)[0], per_block(x)[0])


# ---------------------------------------------------------------------------------------------
# pre-values
# ---------------------------------------------------------------------------------------------


def test_pre_values_weight_each_slot_by_inner_product_with_projected_input():
    layer = make(expansion=4, heads=2)
    x = inputs()
    y, aux = layer(x)
    z = x @ layer.pre_proj.weight.T                                           # W_pre x
    g = (layer.pre_values.weight[aux.rows] * z.unsqueeze(1)).sum(-1)          # <P_pre[row], W_pre x>
    torch.testing.assert_close(aux.pre_scores, g.detach())
    assert torch.equal(aux.rows, layer.slot_rows[aux.indices])
    torch.testing.assert_close(aux.scores, aux.core_scores.sum(-1))
    # linear in g without GELU: scaling W_pre by 3 scales y by 3; GELU breaks the linearity
    with torch.no_grad():
        layer.pre_proj.weight.mul_(3.0)
    torch.testing.assert_close(layer(x)[0], 3.0 * y)
    gelu = make(expansion=4, heads=2, pre_gelu=True)
    y_g, aux_g = gelu(x)
    torch.testing.assert_close(aux_g.pre_scores, F.gelu(g).detach())
    with torch.no_grad():
        gelu.pre_proj.weight.mul_(3.0)
    assert not torch.allclose(gelu(x)[0], 3.0 * y_g)


def test_without_pre_values_there_is_no_pre_table_or_projection():
    layer = make(pre_values=False, d_pre=None)
    assert layer.pre_values is None and layer.pre_proj is None and layer.cfg.d_p == 0
    _, aux = layer(inputs())
    assert aux.pre_scores is None and "pre_score_std" not in aux.stats
    assert UltraMemV2Config(d_model=48, n_keys=32, d_value=24).d_p == 8       # default D_p = D_v / 3 (U2 §4.2)
    assert UltraMemV2Config(d_model=48, n_keys=32).d_v == 12                  # default D_v = D / 4 (U2 Table 10)


# ---------------------------------------------------------------------------------------------
# key balance loss
# ---------------------------------------------------------------------------------------------


def test_balance_loss_switch_weight_and_report():
    x = inputs()
    off = make(expansion=4)
    y, aux = off(x)
    assert float(aux.aux_loss) == 0.0 and aux.losses["balance"] > 0          # reported, not added
    on = make(expansion=4, balance_loss=True, balance_coef=0.25)
    _, aux_on = on(x)
    torch.testing.assert_close(aux_on.aux_loss, 0.25 * aux_on.losses["balance"])
    torch.testing.assert_close(aux_on.losses["balance"], aux.losses["balance"])
    assert aux_on.stats["balance"] == pytest.approx(float(aux.losses["balance"].detach()))
    # the balance loss trains the keys and queries (through the proxies), not the values
    g = grads(on, aux_on.aux_loss)
    assert g["keys"].abs().sum() > 0 and g["query.weight"].abs().sum() > 0
    assert "values.weight" not in g and "cores" not in g                     # u, t are detached buffers
    off.detailed_aux = False
    _, aux_quiet = off(x)
    assert "balance" not in aux_quiet.losses and aux_quiet.counts is None


def test_balance_loss_is_two_for_uniform_use_and_larger_when_skewed():
    """L = sum_side n_s sum_j f_j p_j: 1 per side when picks and softmax mass are uniform."""
    layer = make(expansion=4)
    n_s = layer.cfg.n_side
    p_sum = torch.full((1, 2, n_s), 4.0 / n_s)                                 # 4 tokens, uniform softmax
    hits = torch.full((1, 2, n_s), 3.0)                                        # every key picked equally
    assert float(layer._balance(p_sum, hits, 4)) == pytest.approx(2.0)
    skew = torch.zeros(1, 2, n_s)
    skew[..., 0] = 1.0
    assert float(layer._balance(skew, skew, 1)) == pytest.approx(2.0 * n_s)


def test_token_chunks_change_nothing(monkeypatch):
    layer = make(expansion=4, heads=2, balance_loss=True)
    x = inputs(11)
    y, aux = layer(x)
    monkeypatch.setattr(fast_search, "SEARCH_CHUNK_BYTES", 1)                 # one token per chunk
    y_c, aux_c = layer(x)
    assert torch.equal(aux.indices, aux_c.indices)
    torch.testing.assert_close(y_c, y, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(aux_c.aux_loss, aux.aux_loss, rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# shared pool and ring windows
# ---------------------------------------------------------------------------------------------


def test_ring_window_release_rule():
    # pool of L = 4 home segments of 9 rows (n = 3 per layer unshared)
    assert ring_window(0, 4, 36, 0.25) == RingWindow(start=0, n_keys=3, pool_size=36)
    assert ring_window(3, 4, 36, 0.25) == RingWindow(start=27, n_keys=3, pool_size=36)
    assert ring_window(2, 4, 36, 1.0) == RingWindow(start=18, n_keys=6, pool_size=36)
    assert ring_window(1, 4, 36, 0.5).n_keys == 4                              # floor(sqrt(18))
    # the release's int(sqrt(P * share_ratio)) on a grid of sizes and ratios
    for P, L in ((36, 4), (400, 4), (20 * 360 * 360, 20), (24 * 964 * 964, 24)):
        for ratio in (1 / L, 2 / L, 4 / L, 9 / L, 0.1, 0.5, 1.0):
            if ratio <= 1:
                assert ring_window(L - 1, L, P, ratio).n_keys == int((P * ratio) ** 0.5)
    # ratio g / L with g a square: each window covers g home segments, sqrt(g) x the keys (U2 §4.2)
    w = ring_window(3, 4, 4 * 100, 4 / 4)
    assert w.n_keys == 20 and w.size == 400
    w = ring_window(6, 8, 8 * 100, 4 / 8)
    assert w.n_keys == 20
    assert torch.equal(w.rows(), (600 + torch.arange(400)) % 800)              # segments 6, 7, 0, 1: wraps


@pytest.mark.parametrize("args,needle", [
    ((4, 4, 36, 0.25), "ring_window.layer_index=4"),
    ((0, 0, 36, 0.25), "ring_window.n_layers=0"),
    ((0, 4, 38, 0.25), "ring_window.pool_size=38"),
    ((0, 4, 36, 0.0), "ring_window.share_ratio=0.0"),
    ((0, 4, 36, 1.5), "ring_window.share_ratio=1.5"),
    ((0, 4, 36, 0.01), "ring_window.share_ratio=0.01"),
])
def test_ring_window_rejects_bad_arguments(args, needle):
    with pytest.raises(ConfigError, match="must be") as err:
        ring_window(*args)
    assert needle in str(err.value)


def test_window_of_a_pool_reads_the_same_rows_as_an_own_table_holding_them():
    """A layer reading rows start.. (wrapping) of a pool computes what a layer with its own table
    holding exactly those rows computes; gradients reach only the window's rows of the pool."""
    cfg = UltraMemV2Config(**{**TINY, "heads": 2}, expansion=4)
    pool, pre_pool = value_pool(cfg, 20)
    pool, pre_pool = pool.to(F64), pre_pool.to(F64)
    shared = make(expansion=4, heads=2, pool=pool, pre_pool=pre_pool, window_start=15)
    assert shared.pool_size == 20 and shared.values is pool
    own = make(expansion=4, heads=2)
    rows = RingWindow(15, 3, 20).rows()                                       # 15..19, 0..3
    own.load_state_dict({**shared.state_dict(), "values.weight": pool.weight[rows],
                         "pre_values.weight": pre_pool.weight[rows]})
    x = inputs()
    y_s, aux_s = shared(x)
    y_o, aux_o = own(x)
    torch.testing.assert_close(y_s, y_o, rtol=1e-12, atol=1e-15)
    assert torch.equal(aux_s.rows, rows[aux_o.rows])
    y_ref = ultramem_v2_reference(shared, x)[0]
    torch.testing.assert_close(y_s, y_ref, rtol=1e-10, atol=1e-14)
    y_s.sum().backward()
    touched = pool.weight.grad.abs().sum(-1) > 0
    assert touched[rows].any() and not touched[4:15].any()                    # rows 4..14 are outside


def test_two_layers_share_one_pool_and_overlap():
    cfg = UltraMemV2Config(**{**TINY, "n_keys": 4}, expansion=1)
    windows = [ring_window(i, 4, 4 * 9, 16 / 36) for i in range(4)]           # n = 4: 16 of 36 rows each
    pool, pre_pool = value_pool(cfg, 36)
    layers = [UltraMemV2(cfg, values=pool, pre_values=pre_pool, window_start=w.start) for w in windows]
    assert all(layer.values is pool and layer.pre_values is pre_pool for layer in layers)
    sets = [set(w.rows().tolist()) for w in windows]
    assert len(sets[0] & sets[1]) == 7 and len(sets[3] & sets[0]) == 7        # neighbours overlap (ring)
    params = {id(p) for layer in layers for p in layer.parameters()}
    assert id(pool.weight) in params
    model = nn.ModuleList(layers)
    assert sum(p.numel() for p in model.parameters()) == (
        4 * (layers[0].cost().total_params - cfg.cost().params["values"]) + 36 * (cfg.d_v + cfg.d_p))


def test_pool_arguments_are_checked():
    cfg = UltraMemV2Config(**TINY)
    pool, pre_pool = value_pool(cfg, 12)
    with pytest.raises(ConfigError, match="pre_values=None"):
        UltraMemV2(cfg, values=pool)
    with pytest.raises(ConfigError, match="without values"):
        UltraMemV2(cfg, pre_values=pre_pool)
    with pytest.raises(ConfigError, match=r"values.weight has shape \(5, 8\)"):
        UltraMemV2(cfg, values=nn.Embedding(5, 8), pre_values=nn.Embedding(5, 4))
    with pytest.raises(ConfigError, match="pre_values.weight has shape"):
        UltraMemV2(cfg, values=pool, pre_values=nn.Embedding(13, 4))
    with pytest.raises(ConfigError, match=r"UltraMemV2.window_start=12 is not allowed: must be an integer in \[0, 11\]"):
        UltraMemV2(cfg, values=pool, pre_values=pre_pool, window_start=12)
    with pytest.raises(TypeError, match="nn.Embedding"):
        UltraMemV2(cfg, values=pool.weight, pre_values=pre_pool)
    no_pre = cfg.replace(pre_values=False, d_pre=None)
    with pytest.raises(ConfigError, match="pre_values=False"):
        UltraMemV2(no_pre, values=nn.Embedding(12, 8), pre_values=pre_pool)


# ---------------------------------------------------------------------------------------------
# init, roles, value learning rate
# ---------------------------------------------------------------------------------------------


def test_release_init_statistics():
    torch.manual_seed(0)
    layer = UltraMemV2(UltraMemV2Config(d_model=256, n_keys=64, k_dim=64, d_value=96, d_pre=32, expansion=4))
    Dk = 64
    assert torch.allclose(layer.query_gain, torch.full((Dk,), Dk ** -0.4))
    assert torch.allclose(layer.key_gain, torch.full((Dk,), Dk ** -0.4))
    for t, std in ((layer.values.weight, 0.02), (layer.pre_values.weight, 0.02),
                   (layer.query.weight, Dk ** -0.5), (layer.keys, Dk ** -0.5),
                   (layer.value_proj.weight, 96 ** -0.5), (layer.pre_proj.weight, 256 ** -0.5)):
        assert float(t.detach().std()) == pytest.approx(std, rel=0.05)
    assert float(layer.cores.detach().min()) >= 0 and float(layer.cores.detach().max()) < 1
    U, _, Vh = torch.linalg.svd(layer.cores.detach().sum(0))
    torch.testing.assert_close(layer.u.abs(), U[..., :, 0].abs())
    torch.testing.assert_close(layer.t.abs(), Vh[..., 0, :].abs())


def test_paper_init_eq26_and_mean_selected_score_near_one():
    cfg = UltraMemV2Config(d_model=128, n_keys=24, k_dim=48, top_k=8, d_value=48, d_pre=16, init="paper",
                           n_model_layers=6, ffn_ratio=3.0)
    gain, var_s = cfg.paper_calibration()
    assert 0 < var_s < 1
    by_hand = (0.2 * 3.0 * 128 / (8 * 1 * (1 + var_s) * 16 * 48 * 6)) ** 0.25  # U2 eq. 26, sigma_V^4
    assert cfg.value_init_std() == pytest.approx(by_hand)
    no_pre = cfg.replace(pre_values=False, d_pre=None)
    var0 = no_pre.paper_calibration()[1]
    assert no_pre.value_init_std() == pytest.approx((0.08 * 3.0 * 128 / (8 * (1 + var0) * 48 * 6)) ** 0.5)
    torch.manual_seed(0)
    layer = UltraMemV2(cfg)
    small = math.sqrt(2 / (5 * 128))                                          # U2 App. A small init
    assert float(layer.value_proj.weight.detach().std()) == pytest.approx(small, rel=0.05)
    assert float(layer.pre_proj.weight.detach().std()) == pytest.approx(small, rel=0.1)
    assert float(layer.values.weight.detach().std()) == pytest.approx(by_hand, rel=0.05)
    own_gain = layer.calibrated_gain()                                        # the layer's own cores
    assert float(layer.query_gain[0].detach()) == pytest.approx(own_gain) == float(layer.key_gain[-1].detach())
    assert own_gain == pytest.approx(gain, rel=0.3)                           # vs cores drawn from the init law
    _, aux = layer(torch.randn(512, 128))
    assert 0.85 < aux.stats["mean_score"] < 1.15                              # the calibration target is 1
    with pytest.raises(ConfigError, match="init='paper'"):
        cfg.replace(qk_norm=False)


def test_param_roles_and_value_lr_group():
    layer = make(expansion=4)
    roles = {n: param_role(p) for n, p in layer.named_parameters()}
    assert roles["values.weight"] == roles["pre_values.weight"] == "memory_values"
    assert roles["keys"] == roles["cores"] == roles["query_gain"] == roles["key_gain"] == "no_decay"
    assert roles["query.weight"] == roles["value_proj.weight"] == roles["pre_proj.weight"] == "default"
    cfg = layer.cfg.replace(value_lr_multiplier=1.5)
    assert cfg.value_lr_schedule == "constant"                                  # U2: constant value LR
    groups = build_param_groups(layer, lr=1e-3, weight_decay=0.1, value_lr=1e-3 * cfg.value_lr_multiplier)
    value_group = next(g for g in groups if g["lr_role"] == "memory_values")
    assert value_group["lr"] == pytest.approx(1.5e-3)
    assert {id(p) for p in value_group["params"]} == {id(layer.values.weight), id(layer.pre_values.weight)}


# ---------------------------------------------------------------------------------------------
# determinism, shapes, caches, aux
# ---------------------------------------------------------------------------------------------


def test_same_seed_bitwise_identical_and_perm_from_config_seed():
    a, b = make(expansion=4, dtype=torch.float32), make(expansion=4, dtype=torch.float32)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    x = inputs(dtype=torch.float32)
    ya, aux_a = a(x)
    yb, aux_b = b(x)
    assert torch.equal(ya, yb) and torch.equal(aux_a.indices, aux_b.indices)
    torch.manual_seed(123)                                                    # global RNG does not move perm
    c = UltraMemV2(a.cfg)
    assert torch.equal(c.perm, a.perm)
    assert not torch.equal(UltraMemV2(a.cfg.replace(seed=1)).perm, a.perm)


def test_shapes_btd_and_nd_agree():
    layer = make(expansion=4, heads=2)
    x = inputs(6)
    y2, aux2 = layer(x)
    y3, aux3 = layer(x.view(2, 3, 12))
    assert y2.shape == (6, 12) and y3.shape == (2, 3, 12)
    torch.testing.assert_close(y3.view(6, 12), y2)
    assert isinstance(aux3, UltraMemV2Aux)
    assert aux3.indices.shape == aux3.scores.shape == aux3.rows.shape == (6, 2 * 3)
    assert aux3.core_scores.shape == (6, 6, 2) and aux3.counts.shape == (4 * 9,)
    assert int(aux3.counts.sum()) == 6 * 6
    assert {"top1_score", "mth_score", "mean_score", "output_std", "lambda1", "lambda2", "pre_score_std",
            "balance", "coverage"} <= set(aux3.stats)
    with pytest.raises(ValueError, match=r"\(B, T, 12\)"):
        layer(torch.zeros(2, 3, 11, dtype=F64))


def test_inference_caches_follow_parameter_updates():
    layer = make(expansion=4, heads=2, projection="per_block", dtype=torch.float32)
    x = inputs(dtype=torch.float32)
    y_train = layer(x)[0].detach()
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], y_train)
        torch.testing.assert_close(layer(x)[0], y_train)                     # served from the caches
        layer.keys.mul_(1.5)
        layer.value_proj.weight.mul_(2.0)
        fresh = copy.deepcopy(layer)
        torch.testing.assert_close(layer(x)[0], fresh(x)[0])
        assert not torch.allclose(layer(x)[0], y_train)


def test_refresh_retrieval_is_ultramems():
    layer = make(heads=2)
    with torch.no_grad():
        layer.cores.copy_(torch.randn_like(layer.cores))
    layer.refresh_retrieval()
    U, _, Vh = torch.linalg.svd(layer.cores.detach().sum(0))
    torch.testing.assert_close(layer.u.abs(), U[..., :, 0].abs())
    torch.testing.assert_close(layer.t.abs(), Vh[..., 0, :].abs())


# ---------------------------------------------------------------------------------------------
# cost
# ---------------------------------------------------------------------------------------------

COST_CASES = [dict(), dict(expansion=4, heads=2, share_query=False, projection="per_block", proxy_search="two_sided"),
              dict(pre_values=False, d_pre=None, query_per_rank=False, n_cores=1, qk_norm=False)]


@pytest.mark.parametrize("kw", COST_CASES)
def test_cost_params_exact_by_part(kw):
    layer = make(**kw)
    numel = {n: p.numel() for n, p in layer.named_parameters()}
    part = {"query": numel["query.weight"], "norms": numel.get("query_gain", 0) + numel.get("key_gain", 0),
            "keys": numel["keys"], "cores": numel["cores"],
            "values": numel["values.weight"] + numel.get("pre_values.weight", 0),
            "pre_proj": numel.get("pre_proj.weight", 0), "value_proj": numel["value_proj.weight"]}
    cost = layer.cost()
    assert dict(cost.params) == part and cost.total_params == sum(numel.values())
    c = layer.cfg
    assert cost.sparse_part == "values" and cost.n_units == c.n_slots and cost.unit_params == c.d_v + c.d_p
    assert cost.units_per_token == c.heads * c.top_k
    assert c.bytes_per_token(2) == 2 * (cost.total_params - c.n_slots * (c.d_v + c.d_p)
                                        + c.heads * c.top_k * (c.d_v + c.d_p))


@pytest.mark.parametrize("kw", COST_CASES + [dict(balance_loss=True, expansion=4)])
def test_cost_flops_match_flop_counter(kw):
    """FlopCounterMode counts the matrix products; cost adds the gather and the element-wise parts."""
    layer = make(dtype=torch.float32, **kw)
    layer.detailed_aux = False
    n_tok = 5
    with FlopCounterMode(display=False) as counter:
        layer(inputs(n_tok, dtype=torch.float32))
    parts = layer.cfg.flops_by_part()
    not_matmul = parts["gather"] + parts["mcs_dot"] + parts["pre_weight"]
    assert counter.get_total_flops() == n_tok * (sum(parts.values()) - not_matmul)
    assert layer.cost().flops_per_token == sum(parts.values())


def test_cost_flops_hand_count():
    # D=12, H=1, D_k=6, R=2 (per-rank queries), h=2, E=1 (n_s=3), D_v=8, D_p=4, K=3, m=3
    cfg = UltraMemV2Config(**TINY)
    by_hand = (2 * 12 * (2 * 2 * 6)          # query 12 -> 2 sides * 2 ranks * 6
               + 2 * 2 * 2 * 3 * 6           # key scores: 2 sides * R * n_s * D_k
               + 2 * 2 * 2 * 3               # proxies
               + 2 * (3 * 4 + 9 * 2)         # candidates m R^2 + m^2 R
               + 2 * 3 * 2 * 4 + 2 * 3 * 2 * 2  # MCS per-core rescoring: K h R^2 + K h R
               + 2 * 12 * 4 + 2 * 3 * 4 + 3 * 2  # W_pre x, <P_pre, z> per slot, s * g per slot and core
               + 2 * 3 * 8                   # gather-sum K * D_v
               + 2 * 8 * 12)                 # one projection D_v -> D
    assert cfg.cost().flops_per_token == by_hand
    assert cfg.replace(projection="per_block", expansion=4).cost().flops_per_token > by_hand


# ---------------------------------------------------------------------------------------------
# config validation and registration
# ---------------------------------------------------------------------------------------------

BAD = [
    (dict(expansion=3), "expansion=3"),
    (dict(top_k=4), "top_k=4"),
    (dict(candidate_m=4), "candidate_m=4"),
    (dict(candidate_m=2, top_k=5), "top_k=5"),
    (dict(d_value=7), "d_value=7"),
    (dict(rank=0), "rank=0"),
    (dict(n_keys=0), "n_keys=0"),
    (dict(d_model=-4), "d_model=-4"),
    (dict(projection="shared"), "projection='shared'"),
    (dict(proxy_search="both"), "proxy_search='both'"),
    (dict(init="xavier"), "init='xavier'"),
    (dict(norm_type="batchnorm"), "norm_type='batchnorm'"),
    (dict(pre_values=False), "d_pre=4"),
    (dict(pre_values=False, d_pre=None, pre_gelu=True), "pre_gelu=True"),
    (dict(init="paper", qk_norm=False), "init='paper'"),
    (dict(query_per_rank=1), "query_per_rank=1"),
    (dict(balance_coef=-0.1), "balance_coef=-0.1"),
    (dict(value_lr_multiplier=0.0), "value_lr_multiplier=0.0"),
    (dict(value_lr_schedule="decay", value_lr_multiplier=0.5), "value_lr_multiplier=0.5"),
    (dict(value_lr_schedule="cosine"), "value_lr_schedule='cosine'"),
    (dict(ffn_ratio=0), "ffn_ratio=0"),
    (dict(k_dim=2.5), "k_dim=2.5"),
    (dict(d_pre=0), "d_pre=0"),
]


@pytest.mark.parametrize("kw,needle", BAD, ids=[b[1] for b in BAD])
def test_bad_config_raises_naming_field_and_value(kw, needle):
    with pytest.raises(ConfigError) as err:
        UltraMemV2Config(**{**TINY, **kw})
    msg = str(err.value)
    assert "UltraMemV2Config." + needle in msg and "must be" in msg


def test_unknown_config_key_raises_and_from_dict_round_trip():
    with pytest.raises(ConfigError, match="unknown key"):
        UltraMemV2Config.from_dict({**TINY, "share_ratio": 0.5})
    assert UltraMemV2Config.from_dict(TINY) == UltraMemV2Config(**TINY)
    with pytest.raises(TypeError, match="UltraMemV2Config"):
        UltraMemV2(UltraMemConfig(d_model=12, n_keys=16))


def test_registered_once_as_a_memory():
    spec = registry.get("ultramem_v2")
    assert spec.role == "memory" and spec.config is UltraMemV2Config and spec.layer is UltraMemV2
    assert spec.size_field == "n_keys" and spec.label == "UltraMemV2"
    assert registry.spec_for(UltraMemV2Config(**TINY)) is spec
    assert isinstance(registry.build(UltraMemV2Config(**TINY)), UltraMemV2)
    others = [s.color.lower() for s in registry.LAYERS.values() if s.name != "ultramem_v2"]
    assert spec.color.lower() not in others
    for kw in (dict(top_k=32), dict(top_k=32, expansion=4), dict(top_k=8, candidate_m=11, expansion=9)):
        n = spec.min_size(kw)
        UltraMemV2Config(d_model=16, n_keys=n, **kw)
        with pytest.raises(ConfigError):
            UltraMemV2Config(d_model=16, n_keys=n - 1, **kw) if n > 1 else UltraMemV2Config(d_model=16, n_keys=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_reference():
    layer = make(expansion=4, heads=2, projection="per_block", balance_loss=True)
    x = inputs()
    y_cpu, aux_cpu = layer(x)
    gpu = copy.deepcopy(layer).cuda()
    y_gpu, aux_gpu = gpu(x.cuda())
    assert torch.equal(aux_gpu.indices.cpu(), aux_cpu.indices)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux_gpu.aux_loss.cpu(), aux_cpu.aux_loss, rtol=1e-10, atol=1e-12)
    grads(gpu, y_gpu.sum() + aux_gpu.aux_loss)
    g_cpu = grads(layer, y_cpu.sum() + aux_cpu.aux_loss)
    for n, p in gpu.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), g_cpu[n], rtol=1e-9, atol=1e-12, msg=n)
