"""Memory+: PKM read + SiLU-gated output vs the brute-force reference; gate off == PKM; qk-norm; pool."""

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
from labcore.layers import registry
from labcore.layers.base import param_role, set_detailed_aux
from labcore.layers.memory_plus import (
    FIXED_LR_ATTR,
    MemoryPlus,
    MemoryPlusConfig,
    fixed_lr,
    memory_plus_reference,
)
from labcore.layers.pkm import PKM

D = 16
# PKM computes its softmax in float32 even for float64 inputs, so float64 comparisons through the
# read agree to ~1e-8, not to rounding.
TOL = 1e-7
GRAD_TOL = 1e-6


def small_cfg(**kw) -> MemoryPlusConfig:
    base = dict(d_model=D, n_keys=6, heads=3, k_dim=8, top_k=4)
    base.update(kw)
    return MemoryPlusConfig(**base)


def build(seed: int = 0, dtype=torch.float64, **kw) -> MemoryPlus:
    torch.manual_seed(seed)
    layer = MemoryPlus(small_cfg(**kw)).to(dtype)
    randomize_norm(layer.memory.norm)
    return layer


VARIANTS = [dict(), dict(qk_norm=True), dict(output_gate=True), dict(gate=False),
            dict(gate=False, d_value=8, output_gate=True), dict(query_norm="batchnorm"),
            dict(query_norm="none", query_bias=False)]


@pytest.mark.parametrize("kw", VARIANTS, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_forward_matches_reference(kw, training):
    layer = build(**kw).train(training)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    y, aux = layer(x)
    y_ref, slots_ref, w_ref = memory_plus_reference(layer, x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=TOL, rtol=0)
    s_fast, w_fast = per_head_sorted(aux.indices, aux.scores, 3)
    s_ref, w_ref = per_head_sorted(slots_ref, w_ref, 3)
    assert torch.equal(s_fast, s_ref)
    torch.testing.assert_close(w_fast, w_ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("kw", [dict(), dict(qk_norm=True, output_gate=True), dict(gate=False, d_value=8)],
                         ids=str)
def test_gradients_match_reference(kw):
    layer = build(**kw).train()
    x = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    r = torch.randn(7, D, dtype=torch.float64)
    fast, ref = grads_of(layer, x, r, lambda: layer(x)[0], lambda: memory_plus_reference(layer, x)[0])
    for name in fast:
        torch.testing.assert_close(fast[name], ref[name], atol=GRAD_TOL, rtol=GRAD_TOL, msg=name)
    assert fast["memory.values.weight"].abs().sum() > 0 and fast["memory.keys"].abs().sum() > 0
    if kw.get("gate", True):
        assert fast["gate.weight"].abs().sum() > 0 and fast["w_out.weight"].abs().sum() > 0


def test_gate_formula_by_hand():
    """y = W_o (m ⊙ SiLU(W_s x)) with m the PKM read of the same weights."""
    layer = build(dtype=torch.float32).eval()
    pkm = PKM(layer.cfg.pkm_config()).eval()
    pkm.load_state_dict(layer.memory.state_dict())
    x = torch.randn(6, D)
    m, _ = pkm(x)
    s = x @ layer.gate.weight.T
    expected = (m * s * torch.sigmoid(s)) @ layer.w_out.weight.T
    torch.testing.assert_close(layer(x)[0], expected, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# gate off == PKM on copied weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pkm_kw", [dict(), dict(d_value=8), dict(query_norm="batchnorm")], ids=str)
def test_gate_off_equals_pkm_exactly(pkm_kw):
    torch.manual_seed(1)
    cfg = small_cfg(gate=False, **pkm_kw)
    pkm = PKM(cfg.pkm_config())
    torch.manual_seed(2)                                     # different init: the copy must do it
    layer = MemoryPlus(cfg)
    assert not torch.equal(layer.values.weight, pkm.values.weight)
    layer.memory.load_state_dict(pkm.state_dict())
    for training in (True, False):
        pkm.train(training)
        layer.train(training)
        x = torch.randn(3, 4, D)
        y_pkm, aux_pkm = pkm(x)
        y, aux = layer(x)
        assert torch.equal(y, y_pkm)
        assert torch.equal(aux.indices, aux_pkm.indices) and torch.equal(aux.scores, aux_pkm.scores)
        assert aux.stats == aux_pkm.stats
    assert layer.cost() == layer.cfg.pkm_config().cost()
    if "d_value" not in pkm_kw:                              # the gate is what makes the difference
        gated = MemoryPlus(small_cfg(**pkm_kw)).train(False)
        gated.memory.load_state_dict(pkm.state_dict())
        assert not torch.allclose(gated(x)[0], pkm(x)[0])


# ---------------------------------------------------------------------------------------------
# qk-norm
# ---------------------------------------------------------------------------------------------


def test_qk_norm_scores_read_normalised_keys():
    layer = build(qk_norm=True, norm_eps=1e-12).eval()         # tiny eps: exact scale invariance
    raw = layer.memory.raw_keys
    half = 4
    mu = raw.mean(-1, keepdim=True)
    var = ((raw - mu) ** 2).mean(-1, keepdim=True)
    expected = (raw - mu) / torch.sqrt(var + 1e-12) * layer.memory.key_norm.gain
    torch.testing.assert_close(layer.memory.keys, expected, atol=1e-12, rtol=0)
    assert torch.allclose(layer.memory.key_norm.gain, torch.full_like(layer.memory.key_norm.gain, half ** -0.5))
    # the raw keys' scale no longer matters (it does without qk-norm)
    x = torch.randn(9, D, dtype=torch.float64)
    y0 = layer(x)[0]
    with torch.no_grad():
        raw.mul_(5.0)
    torch.testing.assert_close(layer(x)[0], y0, atol=1e-9, rtol=0)
    plain = build()
    y1 = plain(x)[0]
    with torch.no_grad():
        plain.memory.keys.mul_(5.0)
    assert not torch.allclose(plain(x)[0], y1, atol=1e-3)
    # roles: raw keys and gains are no_decay, saved under PKM's names
    roles = {n: param_role(p) for n, p in layer.named_parameters()}
    assert roles["memory.keys"] == roles["memory.key_norm.gain"] == "no_decay"
    assert "memory.keys" in layer.state_dict()


# ---------------------------------------------------------------------------------------------
# shared value pool, fixed value learning rate
# ---------------------------------------------------------------------------------------------


def test_shared_value_pool_and_fixed_value_lr():
    pool = nn.Embedding(36, D)
    a = MemoryPlus(small_cfg(value_lr=1e-3), values=pool)
    b = MemoryPlus(small_cfg(value_lr=1e-3, qk_norm=True), values=pool)
    assert a.values is pool and b.values is pool
    assert param_role(pool.weight) == "memory_values" and fixed_lr(pool.weight) == 1e-3
    assert getattr(pool.weight, FIXED_LR_ATTR) == 1e-3
    model = nn.ModuleList([a, b])
    assert sum(p is pool.weight for p in model.parameters()) == 1
    x = torch.randn(5, D)
    (a(x)[0].sum() + b(x)[0].sum()).backward()
    grad_both = pool.weight.grad.clone()
    pool.weight.grad = None
    a(x)[0].sum().backward()
    assert not torch.equal(grad_both, pool.weight.grad)           # both layers write into the pool
    with pytest.raises(ConfigError, match=r"value_lr=0\.01.*must be 0\.001"):
        MemoryPlus(small_cfg(value_lr=1e-2), values=pool)
    with pytest.raises(ConfigError, match=r"\(36, 16\)"):
        MemoryPlus(small_cfg(), values=nn.Embedding(35, D))
    assert fixed_lr(MemoryPlus(small_cfg()).values.weight) is None


# ---------------------------------------------------------------------------------------------
# determinism, shapes, aux
# ---------------------------------------------------------------------------------------------


def test_bitwise_deterministic_on_cpu():
    def make():
        return build(seed=5, dtype=torch.float32, qk_norm=True, output_gate=True).train()

    assert_bitwise_deterministic(make, torch.randn(4, 6, D))


def test_shapes_and_aux():
    layer = build().eval().requires_grad_(False)
    x = torch.randn(2, 3, D, dtype=torch.float64)
    y3, aux3 = layer(x)
    y2, aux2 = layer(x.reshape(6, D))
    assert y3.shape == (2, 3, D) and y2.shape == (6, D)
    torch.testing.assert_close(y2, y3.reshape(6, D), atol=1e-14, rtol=0)
    assert aux3.indices.shape == (6, 12) and aux3.counts.sum() == 6 * 12
    assert aux3.stats["output_std"] == pytest.approx(float(y3.std()), rel=1e-5)
    m, _ = layer.memory(x.reshape(6, D))
    assert aux3.stats["memory_std"] == pytest.approx(float(m.std()), rel=1e-5)
    assert set_detailed_aux(layer, False) == 1                       # the inner PKM
    assert layer(x)[1].counts is None
    for bad in (torch.randn(D), torch.randn(2, D + 1)):
        with pytest.raises(ValueError, match="expected"):
            layer(bad.double())


# ---------------------------------------------------------------------------------------------
# config validation, cost, registry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,field,value,allowed", [
    (dict(d_model=0), "d_model", 0, r"integer in \[1"),
    (dict(top_k=7), "top_k", 7, r"\[1, 6\]"),
    (dict(k_dim=7), "k_dim", 7, "even"),
    (dict(query_norm="rms"), "query_norm", "rms", "'layernorm', 'batchnorm', 'none'"),
    (dict(gate=1), "gate", 1, "True or False"),
    (dict(output_gate="no"), "output_gate", "no", "True or False"),
    (dict(qk_norm=None), "qk_norm", None, "True or False"),
    (dict(value_lr=0.0), "value_lr", 0.0, r"\(0"),
    (dict(value_lr=float("nan")), "value_lr", float("nan"), "finite"),
    (dict(value_dropout=1.0), "value_dropout", 1.0, r"\[0, 1\)"),
    (dict(d_value=8), "d_value", 8, "None or d_model"),                 # gate=True needs D_v = D
    (dict(qk_norm=True, query_norm="batchnorm"), "query_norm", "batchnorm", "'layernorm'"),
])
def test_bad_config_names_field_value_and_allowed(kw, field, value, allowed):
    with pytest.raises(ConfigError, match=rf"MemoryPlusConfig\.{field}={re.escape(repr(value))}.*must be.*{allowed}"):
        small_cfg(**kw)


@pytest.mark.parametrize("kw", [dict(), dict(qk_norm=True, output_gate=True), dict(gate=False, d_value=8),
                                dict(query_norm="batchnorm", query_bias=False)], ids=str)
def test_cost_matches_module_and_flop_counter(kw):
    cfg = small_cfg(**kw)
    layer = MemoryPlus(cfg).eval()
    cost = cfg.cost()
    assert cost.total_params == sum(p.numel() for p in layer.parameters())
    params = dict(layer.named_parameters())
    for part in ("gate", "w_out", "output_gate"):
        assert cost.params.get(part, 0) == (params[f"{part}.weight"].numel() if f"{part}.weight" in params else 0)
    assert cost.params["norms"] == sum(p.numel() for n, p in params.items() if "norm" in n)
    assert cost.params["values"] == 36 * cfg.d_v and cost.sparse_part == "values"
    pkm_cost = cfg.pkm_config().cost()
    assert cost.units_per_token == pkm_cost.units_per_token and cost.n_units == pkm_cost.n_units
    # FLOPs beyond the read: torch counts Memory+ minus its own PKM alone
    x = torch.randn(10, D)
    counts = []
    for module in (layer, layer.memory):
        with FlopCounterMode(display=False) as counter:
            module(x)
        counts.append(counter.get_total_flops())
    parts = cfg.flops_by_part()
    assert counts[0] - counts[1] == 10 * (parts["gate"] + parts["w_out"] + (2 * D * D if cfg.output_gate else 0))
    assert parts["memory"] == pkm_cost.flops_per_token
    assert parts["gating"] == (D if cfg.gate else 0)
    assert cost.flops_per_token == sum(parts.values())


def test_registered_once():
    spec = registry.get("memory_plus")
    assert spec.config is MemoryPlusConfig and spec.layer is MemoryPlus and spec.role == "memory"
    assert spec.size_field == "n_keys" and spec.label == "Memory+"
    assert spec.min_size({"top_k": 9}) == 9 and spec.min_size({}) == MemoryPlusConfig.top_k
    pool = nn.Embedding(36, D)
    built = registry.build(small_cfg(), values=pool)
    assert isinstance(built, MemoryPlus) and built.values is pool


@pytest.mark.gpu
def test_cuda_matches_cpu():
    layer = build(dtype=torch.float32, qk_norm=True, output_gate=True).train()
    assert_cuda_matches_cpu(layer, torch.randn(4, 8, D, requires_grad=True), heads=3)
