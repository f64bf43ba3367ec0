"""PKM: fast product-key path vs brute force over all n^2 slots, layout, sharing, init, config."""

import math

import pytest
import torch
from layerhelpers import grads_of, per_head_sorted, randomize_norm
from torch import nn

from labcore.config import ConfigError
from labcore.layers.base import param_role
from labcore.layers.pkm import PKM, PKMConfig, pkm_reference

D = 24


def small_cfg(**kw) -> PKMConfig:
    base = dict(d_model=D, n_keys=12, heads=3, k_dim=8, top_k=5)
    base.update(kw)
    return PKMConfig(**base)


# ---------------------------------------------------------------------------------------------
# fast == brute-force reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query_norm", ["layernorm", "batchnorm", "none"])
@pytest.mark.parametrize("shape", [(2, 5), (9,)])
@pytest.mark.parametrize("training", [True, False])
def test_fast_matches_reference(query_norm, shape, training):
    layer = PKM(small_cfg(query_norm=query_norm)).train(training)
    randomize_norm(layer.norm)
    x = torch.randn(*shape, D)
    y, aux = layer(x)
    y_ref, slots_ref, w_ref = pkm_reference(layer, x)
    assert y.shape == x.shape
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=0)
    n_tok = math.prod(shape)
    s_fast, w_fast = per_head_sorted(aux.indices, aux.scores, 3)
    s_ref, w_ref_sorted = per_head_sorted(slots_ref, w_ref, 3)
    assert aux.indices.shape == (n_tok, 3 * 5)
    assert torch.equal(s_fast, s_ref)                          # identical index sets per head
    assert torch.allclose(w_fast, w_ref_sorted, atol=1e-6)
    assert torch.allclose(aux.scores.view(n_tok, 3, 5).sum(-1), torch.ones(n_tok, 3), atol=1e-6)


@pytest.mark.parametrize("scores", ["mixed", "all_negative"])
def test_inference_mode_matches_reference(scores):
    """No-grad float32 path (raw-bits top-k, values read from the selected bits; rows whose top
    scores are negative are re-ranked) against brute force."""
    layer = PKM(small_cfg(query_norm="none")).eval()
    x = torch.randn(3, 5, D)
    if scores == "all_negative":                            # every sub-key score < 0
        with torch.no_grad():
            layer.keys.abs_().neg_().sub_(0.01)
            layer.query.bias.abs_().add_(0.1)
            layer.query.weight.mul_(0.01)
            x = x.abs()
            layer.query.weight.abs_()
    with torch.no_grad():
        y_ref, slots_ref, w_ref = pkm_reference(layer, x)
        if scores == "all_negative":
            q = layer.make_query(x.reshape(-1, D))
            assert (torch.einsum("thsd,hsnd->thsn", q, layer.keys) < 0).all()
    with torch.inference_mode():
        y, aux = layer(x)
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=0)
    s_fast, w_fast = per_head_sorted(aux.indices, aux.scores, 3)
    s_ref, w_ref_sorted = per_head_sorted(slots_ref, w_ref, 3)
    assert torch.equal(s_fast, s_ref)
    assert torch.allclose(w_fast, w_ref_sorted, atol=1e-6)


@pytest.mark.parametrize("query_norm", ["batchnorm", "layernorm"])
def test_search_in_token_chunks_changes_nothing(monkeypatch, query_norm):
    """Large batches are searched in token chunks; forcing 2-token chunks gives the same output,
    selections and gradients (BatchNorm in training mode still sees all tokens at once)."""
    import labcore.layers.fast.search as search_mod

    layer = PKM(small_cfg(query_norm=query_norm, d_value=10)).train()
    randomize_norm(layer.norm)
    x = torch.randn(3, 5, D)
    outs = []
    for chunk_bytes in (search_mod.SEARCH_CHUNK_BYTES, 2 * 3 * 2 * 12 * 4):   # whole batch; 2 tokens per chunk
        monkeypatch.setattr(search_mod, "SEARCH_CHUNK_BYTES", chunk_bytes)
        layer.zero_grad()
        y, aux = layer(x)
        y.square().sum().backward()
        outs.append((y.detach(), aux.indices, aux.scores, {n: p.grad.clone() for n, p in layer.named_parameters()}))
    assert search_mod.search_chunk(3 * 2 * 12, 4) == 2
    (y0, i0, w0, g0), (y1, i1, w1, g1) = outs
    assert torch.equal(i0, i1) and torch.allclose(y0, y1, atol=1e-6) and torch.allclose(w0, w1, atol=1e-7)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5), name


def test_gradients_match_reference():
    layer = PKM(small_cfg(query_norm="layernorm", d_value=10))
    randomize_norm(layer.norm)
    x = torch.randn(3, 4, D)
    g = torch.randn(3, 4, D)
    grads = grads_of(layer, x, g, lambda: layer(x)[0], lambda: pkm_reference(layer, x)[0])
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


def test_value_dim_with_output_projection():
    cfg = small_cfg(d_value=7, query_norm="none")
    layer = PKM(cfg)
    assert layer.values.weight.shape == (12 * 12, 7)
    assert layer.value_proj is not None and layer.value_proj.weight.shape == (D, 7)
    x = torch.randn(6, D)
    y, aux = layer(x)
    y_ref, _, _ = pkm_reference(layer, x)
    assert y.shape == (6, D)
    assert torch.allclose(y, y_ref, atol=1e-5)
    # y is exactly W_o applied to the weighted value sum
    o = (layer.values.weight[aux.indices] * aux.scores[..., None]).sum(1)
    assert torch.allclose(y, o @ layer.value_proj.weight.T, atol=1e-5)
    assert PKM(small_cfg()).value_proj is None


def test_product_key_layout_matches_xlm_convention():
    """Query rows (head, half, d); keys (H, 2, n, D_k/2); slot = i_row * n + i_col."""
    cfg = PKMConfig(d_model=2, n_keys=4, heads=2, k_dim=2, top_k=1, query_norm="none", query_bias=False)
    layer = PKM(cfg)
    with torch.no_grad():
        # head 0: row sub-query <- x0, column sub-query <- x1; head 1: row <- x1, column <- x0
        layer.query.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))
        layer.keys.copy_(torch.tensor([
            [[[-1.0], [2.0], [0.5], [1.0]], [[0.1], [0.2], [3.0], [0.3]]],   # head 0: rows, cols
            [[[0.0], [0.1], [0.2], [5.0]], [[4.0], [0.0], [1.0], [2.0]]],    # head 1: rows, cols
        ]))
    x = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    y, aux = layer(x)
    # token 0: head 0 best row 1 (2.0), best col 2 (3.0) -> 1*4+2 = 6; head 1 row 3, col 0 -> 12
    # token 1: head 0 row scores -x0*k -> best row 0, col 2 -> 2; head 1 row 3, col scores -k -> col 1 -> 13
    assert aux.indices.tolist() == [[6, 12], [2, 13]]
    assert torch.allclose(aux.scores, torch.ones(2, 2))       # softmax over K=1
    assert torch.allclose(y, layer.values.weight[[6, 2]] + layer.values.weight[[12, 13]])


def test_heads_summed_equals_sum_of_single_head_layers():
    cfg = small_cfg(query_norm="layernorm")
    big = PKM(cfg).eval()
    randomize_norm(big.norm)
    x = torch.randn(2, 4, D)
    y, aux = big(x)
    total = torch.zeros_like(y)
    rows = cfg.k_dim
    for h in range(cfg.heads):
        one = PKM(small_cfg(query_norm="layernorm", heads=1), values=big.values).eval()
        with torch.no_grad():
            one.query.weight.copy_(big.query.weight[h * rows:(h + 1) * rows])
            one.query.bias.copy_(big.query.bias[h * rows:(h + 1) * rows])
            one.keys.copy_(big.keys[h:h + 1])
            one.norm.weight.copy_(big.norm.weight[h:h + 1])
            one.norm.bias.copy_(big.norm.bias[h:h + 1])
        y_h, aux_h = one(x)
        total += y_h
        assert torch.equal(aux_h.indices.sort(-1).values,
                           aux.indices[:, h * 5:(h + 1) * 5].sort(-1).values)
    assert torch.allclose(y, total, atol=1e-5)


def test_shared_value_table_is_really_shared():
    cfg = small_cfg(d_value=6)
    table = nn.Embedding(cfg.n_slots, 6)
    before = table.weight.detach().clone()
    a, b = PKM(cfg, values=table), PKM(cfg, values=table)
    assert a.values.weight is b.values.weight is table.weight
    assert torch.equal(table.weight, before)                    # an external table is not re-initialised
    model = nn.ModuleList([a, b])
    assert sum(p is table.weight for p in model.parameters()) == 1
    x = torch.randn(8, D)
    grads = []
    for layers in ([a], [b], [a, b]):
        table.zero_grad()
        sum(m(x)[0].square().sum() for m in layers).backward()
        grads.append(table.weight.grad.clone())
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    assert torch.allclose(grads[2], grads[0] + grads[1], atol=1e-6)
    with torch.no_grad():
        table.weight[:] = 0.0                                   # both layers read the same storage
    assert a(x)[0].abs().max() == 0 and b(x)[0].abs().max() == 0


@pytest.mark.parametrize("query_norm,d_value,bias", [("layernorm", None, True), ("batchnorm", 9, True),
                                                     ("none", 9, False)])
def test_gradients_reach_every_parameter(query_norm, d_value, bias):
    layer = PKM(small_cfg(query_norm=query_norm, d_value=d_value, query_bias=bias)).train()
    x = torch.randn(2, 6, D)
    y, _ = layer(x)
    (y * torch.randn_like(y)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_same_seed_is_bitwise_identical():
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        layer = PKM(small_cfg(query_norm="batchnorm", d_value=5)).train()
        x = torch.randn(3, 4, D)
        y, aux = layer(x)
        outs.append((y, aux.indices, aux.scores, layer.norm.running_mean.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# init, roles, aux record, BatchNorm semantics
# ---------------------------------------------------------------------------------------------


def test_init_statistics():
    cfg = PKMConfig(d_model=64, n_keys=48, heads=2, k_dim=32, top_k=4)
    layer = PKM(cfg)
    v = layer.values.weight.detach()
    assert abs(v.std().item() - 64 ** -0.5) < 0.02 * 64 ** -0.5     # PKM notebook: std D_v^-1/2
    assert abs(v.mean().item()) < 5 * 64 ** -0.5 / math.sqrt(v.numel())
    k = layer.keys.detach()
    bound = 1 / math.sqrt(16)                                       # XLM: uniform, 1/sqrt(D_k/2)
    assert k.abs().max().item() <= bound
    assert k.abs().max().item() > 0.98 * bound
    assert abs(k.std().item() - bound / math.sqrt(3)) < 0.03 * bound / math.sqrt(3)
    custom = PKM(PKMConfig(d_model=64, n_keys=48, heads=2, k_dim=32, top_k=4, value_init_std=0.02))
    assert abs(custom.values.weight.std().item() - 0.02) < 0.02 * 0.02


def test_parameter_roles():
    for norm in ("layernorm", "batchnorm"):
        layer = PKM(small_cfg(query_norm=norm, d_value=5))
        roles = {name: param_role(p) for name, p in layer.named_parameters()}
        assert roles["values.weight"] == "memory_values"
        assert roles["keys"] == "no_decay"
        assert roles["norm.weight"] == roles["norm.bias"] == "no_decay"
        assert roles["query.bias"] == "no_decay"
        assert roles["query.weight"] == roles["value_proj.weight"] == "default"


def test_aux_record():
    cfg = small_cfg(n_keys=6, top_k=3)
    layer = PKM(cfg)
    x = torch.randn(2, 7, D)
    y, aux = layer(x)
    _, slots_ref, w_ref = pkm_reference(layer, x)
    assert aux.aux_loss.shape == () and aux.aux_loss.item() == 0.0
    assert aux.counts.shape == (36,)
    expected = torch.zeros(36, dtype=torch.long)
    for s in slots_ref.reshape(-1).tolist():
        expected[s] += 1
    assert torch.equal(aux.counts, expected)
    assert aux.stats["coverage"] == pytest.approx((expected > 0).float().mean().item())
    # best raw score per head: brute force over the grid
    q = layer.norm(layer.query(x.reshape(-1, D))).view(-1, 3, 2, 4)
    best = [(q[:, h, 0] @ layer.keys[h, 0].T).amax(-1) + (q[:, h, 1] @ layer.keys[h, 1].T).amax(-1)
            for h in range(3)]
    assert aux.stats["top1_score"] == pytest.approx(torch.stack(best).mean().item(), abs=1e-5)
    assert aux.stats["top1_weight"] == pytest.approx(w_ref.view(-1, 3, 3).amax(-1).mean().item(), abs=1e-6)
    p = expected.float() / expected.sum()
    kl = sum(pi * math.log(pi * 36) for pi in p.tolist() if pi > 0)
    assert aux.stats["kl_uniform"] == pytest.approx(kl, abs=1e-5)
    assert aux.stats["output_std"] == pytest.approx(y.std().item(), rel=1e-5)
    assert all(isinstance(v, float) for v in aux.stats.values())


def test_detailed_aux_off_keeps_outputs_and_token_stats():
    layer = PKM(small_cfg()).eval()
    x = torch.randn(2, 7, D)
    y, aux = layer(x)
    layer.detailed_aux = False
    y_lean, lean = layer(x)
    assert torch.equal(y, y_lean) and torch.equal(aux.indices, lean.indices) and torch.equal(aux.scores, lean.scores)
    assert lean.counts is None and aux.counts is not None
    assert set(lean.stats) == {"top1_score", "top1_weight", "output_std"}
    assert set(aux.stats) == set(lean.stats) | {"coverage", "kl_uniform"}
    for name, value in lean.stats.items():
        assert value == aux.stats[name], name


def test_set_detailed_aux_reaches_every_memory_layer():
    from labcore.layers.base import set_detailed_aux
    from labcore.layers.ultramem import UltraMem, UltraMemConfig

    model = nn.ModuleDict({"a": PKM(small_cfg()), "b": nn.Sequential(nn.Linear(D, D), PKM(small_cfg())),
                           "c": UltraMem(UltraMemConfig(d_model=D, n_keys=3, heads=2, k_dim=6, top_k=3, d_value=8))})
    assert set_detailed_aux(model, False) == 3
    assert [m.detailed_aux for m in model.modules() if hasattr(m, "detailed_aux")] == [False] * 3
    assert model["a"](torch.randn(4, D))[1].counts is None
    assert set_detailed_aux(model["b"], True) == 1 and model["b"][1].detailed_aux and not model["a"].detailed_aux
    with pytest.raises(TypeError, match="flag=1"):
        set_detailed_aux(model, 1)


def test_batchnorm_normalises_each_feature_over_tokens():
    cfg = small_cfg(query_norm="batchnorm")
    layer = PKM(cfg).train()
    x = torch.randn(4, 6, D) * 3 + 1
    x2d = x.reshape(-1, D)                                                  # (N_tok, D)
    q = layer.make_query(x2d).reshape(24, -1)                               # (N_tok, H*D_k)
    assert torch.allclose(q.mean(0), torch.zeros(q.shape[1]), atol=1e-5)
    assert torch.allclose(q.var(0, unbiased=False), torch.ones(q.shape[1]), atol=1e-3)
    raw = layer.query(x2d).detach()
    assert torch.allclose(layer.norm.running_mean, 0.1 * raw.mean(0), atol=1e-6)
    assert not torch.allclose(q.mean(1), torch.zeros(24), atol=1e-3)       # not normalised per token


def test_layernorm_is_per_sub_query_and_causal():
    layer = PKM(small_cfg(query_norm="layernorm"))
    x = torch.randn(10, D)
    q = layer.make_query(x)                                                 # (N_tok, H, 2, D_k/2)
    assert torch.allclose(q.mean(-1), torch.zeros(10, 3, 2), atol=1e-5)
    y_all, _ = layer(x)
    y_first, _ = layer(x[:4])
    assert torch.allclose(y_all[:4], y_first, atol=1e-6)                    # no coupling between tokens


# ---------------------------------------------------------------------------------------------
# config validation and cost
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("k_dim", 7), ("top_k", 13), ("n_keys", 0), ("heads", 0), ("query_norm", "rmsnorm"),
    ("d_value", 0), ("value_init_std", -0.1), ("query_dropout", 1.0), ("input_dropout", -0.5),
    ("d_model", 2.5), ("norm_eps", 0.0),
])
def test_bad_config_names_field_and_value(field, value):
    with pytest.raises(ConfigError) as err:
        small_cfg(**{field: value})
    assert f"PKMConfig.{field}={value!r}" in str(err.value)


def test_bad_external_values_and_inputs():
    cfg = small_cfg()
    with pytest.raises(ConfigError, match=r"\(144, 24\)"):
        PKM(cfg, values=nn.Embedding(100, D))
    with pytest.raises(TypeError, match="nn.Embedding"):
        PKM(cfg, values=nn.Linear(2, 2))
    layer = PKM(cfg)
    with pytest.raises(ValueError, match="expected"):
        layer(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match="expected"):
        layer(torch.randn(D))


@pytest.mark.parametrize("kw", [dict(), dict(query_norm="batchnorm", d_value=7),
                                dict(query_norm="none", query_bias=False, d_value=30)])
def test_cost_params_match_module(kw):
    cfg = small_cfg(**kw)
    layer = PKM(cfg)
    cost = cfg.cost()
    assert cost.total_params == sum(p.numel() for p in layer.parameters())
    by_part = {"query": layer.query, "values": layer.values, "value_proj": layer.value_proj,
               "norms": layer.norm}
    for part, mod in by_part.items():
        expected = sum(p.numel() for p in mod.parameters()) if mod is not None else 0
        assert cost.params[part] == expected, part
    assert cost.params["keys"] == layer.keys.numel()
    assert (cost.sparse_part, cost.n_units, cost.unit_params, cost.units_per_token) == \
        ("values", 144, cfg.d_v, 15)
    assert cost.active_params_per_token == cost.total_params - 144 * cfg.d_v + 15 * cfg.d_v


def test_cost_flops_by_hand():
    # D=24, H=3, D_k=8, n=12, K=5, D_v=D: pruned pairs for K=5: (i+1)(j+1)<=5 -> 5+2+1+1+1 = 10
    cfg = small_cfg()
    assert cfg.n_candidates == 10
    assert cfg.n_candidates == sum((i + 1) * (j + 1) <= 5 for i in range(5) for j in range(5))
    query = 2 * 24 * 24 + 24
    keys = 2 * 3 * 2 * 12 * 4
    cand, softmax, gather = 3 * 10, 3 * 3 * 5, 2 * 15 * 24
    assert cfg.cost().flops_per_token == query + keys + cand + softmax + gather
    assert PKMConfig(d_model=8, n_keys=64, top_k=32).n_candidates == 119
    proj = small_cfg(d_value=6)
    assert proj.cost().flops_per_token == (query + keys + cand + softmax + 2 * 15 * 6 + 2 * 6 * 24)
