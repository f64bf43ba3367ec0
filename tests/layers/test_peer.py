"""PEER: fast product-key path vs the per-token, per-expert reference; PEER-pytorch; config; cost."""

import math
import re

import pytest
import torch
from layerhelpers import (
    assert_bitwise_deterministic,
    assert_cuda_matches_cpu,
    grads_of,
    per_head_sorted,
    randomize_norm,
)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from labcore.config import ConfigError
from labcore.layers import peer as peer_module
from labcore.layers import registry
from labcore.layers.base import param_role, set_detailed_aux
from labcore.layers.fast import search as fast_search
from labcore.layers.peer import PEER, PEERConfig, expert_down, expert_up, peer_reference

D = 16


def small_cfg(**kw) -> PEERConfig:
    base = dict(d_model=D, n_keys=6, heads=3, top_k=4, k_dim=8)
    base.update(kw)
    return PEERConfig(**base)


def build(seed: int = 0, dtype=torch.float64, **kw) -> PEER:
    torch.manual_seed(seed)
    layer = PEER(small_cfg(**kw)).to(dtype)
    randomize_norm(layer.norm)
    return layer


# ---------------------------------------------------------------------------------------------
# fast == per-expert reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query_norm", ["layernorm", "batchnorm", "none"])
@pytest.mark.parametrize("shared_keys", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_matches_reference(query_norm, shared_keys, activation, training):
    layer = build(query_norm=query_norm, shared_keys=shared_keys, activation=activation).train(training)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    y, aux = layer(x)
    y_ref, experts_ref, w_ref = peer_reference(layer, x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    assert aux.indices.shape == (10, 3 * 4)
    e_fast, w_fast = per_head_sorted(aux.indices, aux.scores, 3)
    e_ref, w_ref = per_head_sorted(experts_ref, w_ref, 3)
    assert torch.equal(e_fast, e_ref)                             # same experts per head
    torch.testing.assert_close(w_fast, w_ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("query_norm", ["layernorm", "batchnorm", "none"])
@pytest.mark.parametrize("shared_keys", [True, False])
def test_gradients_match_reference(query_norm, shared_keys):
    layer = build(query_norm=query_norm, shared_keys=shared_keys, query_bias=True).train()
    x = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    r = torch.randn(7, D, dtype=torch.float64)
    fast, ref = grads_of(layer, x, r, lambda: layer(x)[0], lambda: peer_reference(layer, x)[0])
    assert set(fast) == set(ref)
    for name in fast:
        torch.testing.assert_close(fast[name], ref[name], atol=1e-11, rtol=0, msg=name)
    # every trainable tensor takes part: the selected experts' u and v rows get gradient
    assert fast["down.weight"].abs().sum() > 0 and fast["up.weight"].abs().sum() > 0
    assert fast["keys"].abs().sum() > 0


def gather_operands(seed: int, in_width: int, out_width: int, repeat_row: int, repeat: list[int]):
    """Float64 operands of expert_down / expert_up: the input (7, in_width) and a table (9, 5), both
    requiring grad, experts (7, 3) with token ``repeat_row``'s set to ``repeat`` (repeated experts
    within a token), and an upstream gradient r (7, out_width)."""
    torch.manual_seed(seed)
    a = torch.randn(7, in_width, dtype=torch.float64, requires_grad=True)
    table = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    experts = torch.randint(0, 9, (7, 3))
    experts[repeat_row] = torch.tensor(repeat)
    r = torch.randn(7, out_width, dtype=torch.float64)
    return a, table, experts, r


def check_against_plain(op, plain, a, table, experts, r) -> None:
    """``op(a, experts, table)`` equals ``plain`` (autograd through table[experts]): values, the
    gradients for a and the table, and a gradcheck."""
    out_plain = plain(a, experts, table)
    ga_plain, gt_plain = torch.autograd.grad((out_plain * r).sum(), (a, table))
    out = op(a, experts, table)
    ga, gt = torch.autograd.grad((out * r).sum(), (a, table))
    torch.testing.assert_close(out, out_plain, atol=1e-14, rtol=0)
    torch.testing.assert_close(ga, ga_plain, atol=1e-13, rtol=0)
    torch.testing.assert_close(gt, gt_plain, atol=1e-13, rtol=0)
    assert torch.autograd.gradcheck(lambda a_, t_: op(a_, experts, t_), (a, table))


@pytest.mark.parametrize("chunk_bytes", [8 << 20, 3 * 5 * 8])        # one chunk; 1 token per chunk
def test_expert_down_matches_plain_gather(monkeypatch, chunk_bytes):
    """The chunked, gather-free-backward u_i^T x equals autograd through table[experts] @ x."""
    monkeypatch.setattr(peer_module, "EXPERT_CHUNK_BYTES", chunk_bytes)
    x, table, experts, r = gather_operands(seed=0, in_width=5, out_width=3, repeat_row=0, repeat=[4, 4, 2])
    check_against_plain(expert_down, lambda x_, e, t: torch.bmm(t[e], x_[:, :, None]).squeeze(-1),
                        x, table, experts, r)
    # only what needs a gradient gets one
    h = expert_down(x.detach(), experts, table)
    (gt_only,) = torch.autograd.grad(h.sum(), (table,))
    assert gt_only.shape == table.shape


@pytest.mark.parametrize("chunk_bytes", [8 << 20, 3 * 5 * 8])
def test_expert_up_matches_plain_gather(monkeypatch, chunk_bytes):
    """Σ_s w[t, s] table[experts[t, s]] equals autograd through the plain weighted gather."""
    monkeypatch.setattr(peer_module, "EXPERT_CHUNK_BYTES", chunk_bytes)
    w, table, experts, r = gather_operands(seed=1, in_width=3, out_width=5, repeat_row=2, repeat=[1, 1, 1])
    check_against_plain(expert_up, lambda w_, e, t: (w_[:, :, None] * t[e]).sum(1), w, table, experts, r)


def test_token_chunked_search_is_per_token(monkeypatch):
    """Large batches are searched in chunks of tokens; a 1-token chunk gives the same result."""
    layer = build(dtype=torch.float32).eval()
    x = torch.randn(33, D)
    y, aux = layer(x)
    monkeypatch.setattr(fast_search, "SEARCH_CHUNK_BYTES", 1)               # one token per chunk
    y1, aux1 = layer(x)
    assert torch.equal(y1, y) and torch.equal(aux1.indices, aux.indices)


def test_float32_matches_reference():
    layer = build(dtype=torch.float32).eval()
    x = torch.randn(3, 4, D)
    torch.testing.assert_close(layer(x)[0], peer_reference(layer, x)[0], atol=2e-6, rtol=1e-5)


def test_batchnorm_statistics_couple_tokens_only_in_training():
    layer = build(query_norm="batchnorm")
    x = torch.randn(6, D, dtype=torch.float64)
    x2 = x.clone()
    x2[5] += 3.0                                                   # change one token
    layer.train()
    assert not torch.equal(layer(x)[0][:5], layer(x2)[0][:5])      # batch statistics move
    layer.eval()
    assert torch.equal(layer(x)[0][:5], layer(x2)[0][:5])          # running statistics do not


def test_shapes_and_rows_agree():
    layer = build().eval()
    x = torch.randn(2, 3, D, dtype=torch.float64)
    y3, aux3 = layer(x)
    y2, aux2 = layer(x.reshape(6, D))
    assert y3.shape == (2, 3, D) and y2.shape == (6, D)
    torch.testing.assert_close(y2, y3.reshape(6, D), atol=1e-14, rtol=0)
    assert torch.equal(aux2.indices, aux3.indices)
    for bad in (torch.randn(D), torch.randn(2, 3, D + 1), torch.randn(1, 2, 3, D)):
        with pytest.raises(ValueError, match="expected"):
            layer(bad.double())


def test_bitwise_deterministic_on_cpu():
    assert_bitwise_deterministic(lambda: build(seed=3, dtype=torch.float32, query_norm="batchnorm").train(),
                                 torch.randn(4, 6, D))


# ---------------------------------------------------------------------------------------------
# aux record
# ---------------------------------------------------------------------------------------------


def test_aux_record():
    layer = build().eval().requires_grad_(False)
    x = torch.randn(5, 4, D, dtype=torch.float64)
    y, aux = layer(x)
    n_tok, S, N = 20, 3 * 4, 36
    assert aux.aux_loss.item() == 0.0 and aux.aux_loss.dim() == 0
    assert aux.indices.shape == aux.scores.shape == (n_tok, S)
    torch.testing.assert_close(aux.scores.view(n_tok, 3, 4).sum(-1), torch.ones(n_tok, 3, dtype=torch.float64))
    assert torch.equal(aux.counts, torch.bincount(aux.indices.flatten(), minlength=N))
    usage = aux.counts.double() / (n_tok * S)
    kl = sum(float(u * math.log(u * N)) for u in usage if u > 0)
    assert aux.stats["kl_uniform"] == pytest.approx(kl, rel=1e-5)
    assert aux.stats["coverage"] == pytest.approx(float((aux.counts > 0).double().mean()))
    assert aux.stats["output_std"] == pytest.approx(float(y.std()), rel=1e-5)
    assert aux.stats["top1_weight"] == pytest.approx(float(aux.scores.view(n_tok, 3, 4).amax(-1).mean()),
                                                     rel=1e-5)
    u = layer.down.weight[aux.indices]                                   # (N_tok, S, D)
    pre = torch.einsum("tsd,td->ts", u, x.reshape(n_tok, D))
    assert aux.stats["active_fraction"] == pytest.approx(float((pre > 0).double().mean()))
    assert 0.0 < aux.stats["active_fraction"] < 1.0
    assert set_detailed_aux(layer, False) == 1
    _, lean = layer(x)
    assert lean.counts is None and "coverage" not in lean.stats and "kl_uniform" not in lean.stats
    assert torch.equal(lean.indices, aux.indices)


def test_parameter_roles_and_layout():
    layer = PEER(small_cfg(query_norm="batchnorm", query_bias=True))
    roles = {n: param_role(p) for n, p in layer.named_parameters()}
    assert roles["down.weight"] == roles["up.weight"] == "memory_values"
    assert roles["keys"] == roles["query.bias"] == roles["norm.weight"] == "no_decay"
    assert roles["query.weight"] == "default"
    assert layer.keys.shape == (1, 2, 6, 4)
    assert PEER(small_cfg(shared_keys=False)).keys.shape == (3, 2, 6, 4)
    assert layer.down.weight.shape == layer.up.weight.shape == (36, D)
    torch.manual_seed(0)
    big = PEER(PEERConfig(d_model=64, n_keys=32, heads=1, top_k=4, k_dim=8))
    assert big.down.weight.std().item() == pytest.approx(64 ** -0.5, rel=0.02)
    assert big.keys.abs().max().item() <= 0.5                            # Uniform(+-1/sqrt(D_k/2))
    with pytest.raises(ConfigError, match="values"):
        PEER(small_cfg(), values=nn.Embedding(36, D))


# ---------------------------------------------------------------------------------------------
# config validation, cost, registry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,allowed", [
    ("d_model", 0, r"integer in \[1"),
    ("n_keys", 2.5, "integer"),
    ("heads", True, "integer"),
    ("top_k", 7, r"\[1, 6\]"),                                            # > n_keys
    ("top_k", 0, r"\[1, 6\]"),
    ("k_dim", 7, "even"),
    ("query_norm", "rmsnorm", "'layernorm', 'batchnorm', 'none'"),
    ("activation", "silu", "'gelu', 'relu'"),
    ("shared_keys", 1, "True or False"),
    ("query_bias", "yes", "True or False"),
    ("expert_init_std", 0.0, r"\(0"),
    ("norm_eps", -1e-5, r"\(0"),
])
def test_bad_config_names_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ConfigError, match=rf"PEERConfig\.{field}={re.escape(repr(value))}.*must be.*{allowed}"):
        small_cfg(**{field: value})


@pytest.mark.parametrize("kw", [dict(), dict(shared_keys=False, query_bias=True),
                                dict(query_norm="none"), dict(query_norm="batchnorm", top_k=6)])
def test_cost_matches_module_and_flop_counter(kw):
    cfg = small_cfg(**kw)
    layer = PEER(cfg).eval()
    cost = cfg.cost()
    by_name = {"query": ["query.weight", "query.bias"], "keys": ["keys"],
               "norms": ["norm.weight", "norm.bias"], "experts": ["down.weight", "up.weight"]}
    params = dict(layer.named_parameters())
    for part, names in by_name.items():
        assert cost.params[part] == sum(params[n].numel() for n in names if n in params), part
    assert cost.total_params == sum(p.numel() for p in layer.parameters())
    H, K = cfg.heads, cfg.top_k
    assert cost.sparse_part == "experts" and cost.n_units == 36 and cost.unit_params == 2 * D
    assert cost.units_per_token == H * K
    assert cost.active_params_per_token == cost.total_params - (36 - H * K) * 2 * D
    # FLOPs: the matrix products, counted by torch, equal the config's matmul parts
    parts = cfg.flops_by_part()
    n_tok = 10
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(n_tok, D))
    bias = H * cfg.k_dim if cfg.query_bias else 0            # addmm: torch counts the product only
    assert counter.get_total_flops() == n_tok * (parts["query"] - bias + parts["keys"] + parts["expert_down"])
    # the rest by hand
    C = sum(1 for i in range(K) for j in range(K) if (i + 1) * (j + 1) <= K)
    assert parts["candidates"] == H * C and parts["softmax"] == 3 * H * K and parts["weighting"] == H * K
    assert parts["expert_up"] == parts["expert_down"] == 2 * H * K * D
    assert cost.flops_per_token == sum(parts.values())


def test_registered_once():
    spec = registry.get("peer")
    assert spec.config is PEERConfig and spec.layer is PEER and spec.role == "memory"
    assert spec.size_field == "n_keys" and spec.label == "PEER"
    assert spec.min_size({"top_k": 9}) == 9 and spec.min_size({}) == PEERConfig.top_k
    assert registry.spec_for(small_cfg()) is spec
    assert isinstance(registry.build(small_cfg()), PEER)


# ---------------------------------------------------------------------------------------------
# PyPI PEER-pytorch on copied weights
# ---------------------------------------------------------------------------------------------


def peer_pytorch_state(layer: PEER) -> dict[str, torch.Tensor]:
    """labcore PEER weights in PEER-pytorch's layout: query rows (half, head, d), keys (H, n, 2, d)."""
    c = layer.cfg
    H, n, half = c.heads, c.n_keys, c.half
    w = layer.query.weight.detach().view(H, 2, half, c.d_model).transpose(0, 1).reshape(2 * H * half, c.d_model)
    keys = layer.keys.detach().expand(H, 2, n, half).permute(0, 2, 1, 3).contiguous()   # (H, n, 2, D_k/2)
    return {"to_queries.0.weight": w, "keys": keys,
            "weight_down_embed.weight": layer.down.weight.detach(),
            "weight_up_embed.weight": layer.up.weight.detach()}


@pytest.mark.parametrize("shared_keys", [True, False])
def test_matches_peer_pytorch_on_copied_weights(shared_keys):
    lucid_module = pytest.importorskip("PEER_pytorch", reason="PyPI PEER-pytorch (bench extra) is not installed")
    cfg = small_cfg(query_norm="none", activation="gelu", shared_keys=shared_keys, query_bias=False)
    torch.manual_seed(0)
    ours = PEER(cfg).double()
    theirs = lucid_module.PEER(D, heads=3, num_experts=36, num_experts_per_head=4, dim_key=4,
                               non_competing_scores=False).double()
    theirs.load_state_dict(peer_pytorch_state(ours))
    x = torch.randn(2, 5, D, dtype=torch.float64)
    x_ours, x_theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours, _ = ours(x_ours)
    y_theirs = theirs(x_theirs)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-12, rtol=0)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, atol=1e-12, rtol=0)
    # parameter gradients, PEER-pytorch's mapped to labcore's layout (shared keys: summed over heads)
    H, n, half = 3, 6, 4
    g = dict(theirs.named_parameters())
    query = g["to_queries.0.weight"].grad.view(2, H, half, D).transpose(0, 1).reshape(H * 2 * half, D)
    keys = g["keys"].grad.permute(0, 2, 1, 3)                                 # (H, 2, n, D_k/2)
    keys = keys.sum(0, keepdim=True) if shared_keys else keys
    torch.testing.assert_close(ours.query.weight.grad, query, atol=1e-12, rtol=0)
    torch.testing.assert_close(ours.keys.grad, keys, atol=1e-12, rtol=0)
    torch.testing.assert_close(ours.down.weight.grad, g["weight_down_embed.weight"].grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(ours.up.weight.grad, g["weight_up_embed.weight"].grad, atol=1e-12, rtol=0)
    assert ours.keys.grad.shape == (1 if shared_keys else H, 2, n, half)
    # its default keeps the top-1 expert per head with a ReLU weight: a different layer
    default = lucid_module.PEER(D, heads=3, num_experts=36, num_experts_per_head=4, dim_key=4).double()
    default.load_state_dict(peer_pytorch_state(ours))
    assert not torch.allclose(default(x), y_ours)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    layer = build(dtype=torch.float32, query_norm="batchnorm").train()
    aux_cpu, aux_gpu = assert_cuda_matches_cpu(layer, torch.randn(4, 8, D, requires_grad=True), heads=3)
    assert torch.equal(aux_gpu.counts.cpu(), aux_cpu.counts)
