"""DenseFFN: SwiGLU values against a hand-written formula, shapes, aux, cost, init and config errors."""

import math

import pytest
import torch

from labcore.config import ConfigError
from labcore.layers.base import LayerAux
from labcore.layers.ffn import DenseFFN, FFNConfig


def _swiglu_by_hand(ffn: DenseFFN, x: torch.Tensor) -> torch.Tensor:
    """y = W_out (silu(W_gate x) * W_up x) (+ biases), silu written out as z * sigmoid(z), in float64."""
    x = x.double()
    def lin(m, v):
        out = v @ m.weight.double().T
        return out if m.bias is None else out + m.bias.double()
    g = lin(ffn.w_gate, x)
    return lin(ffn.w_out, g * torch.sigmoid(g) * lin(ffn.w_up, x))


@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_formula(bias):
    ffn = DenseFFN(FFNConfig(d_model=12, d_hidden=20, bias=bias, init_std=0.2))
    if bias:
        with torch.no_grad():  # biases start at zero; make them matter
            for m in (ffn.w_gate, ffn.w_up, ffn.w_out):
                m.bias.normal_(0, 0.3)
    x = torch.randn(3, 5, 12)
    y, aux = ffn(x)
    assert y.shape == (3, 5, 12)
    torch.testing.assert_close(y.double(), _swiglu_by_hand(ffn, x), rtol=1e-5, atol=1e-6)
    assert isinstance(aux, LayerAux)
    assert aux.aux_loss.shape == () and aux.aux_loss.item() == 0.0 and aux.aux_loss.dtype == x.dtype
    assert aux.indices is None and aux.scores is None and dict(aux.losses) == {}


def test_token_layouts_agree():
    ffn = DenseFFN(FFNConfig(d_model=8, d_hidden=16, init_std=0.3))
    x = torch.randn(2, 7, 8)
    y3, _ = ffn(x)
    y2, _ = ffn(x.reshape(14, 8))
    assert y2.shape == (14, 8)
    torch.testing.assert_close(y3.reshape(14, 8), y2, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="DenseFFN"):
        ffn(torch.randn(2, 7, 9))
    with pytest.raises(ValueError, match="DenseFFN"):
        ffn(torch.randn(8))


def test_gradients_reach_every_parameter():
    ffn = DenseFFN(FFNConfig(d_model=8, d_hidden=16, bias=True, init_std=0.3))
    x = torch.randn(10, 8, requires_grad=True)
    y, aux = ffn(x)
    (y.square().mean() + aux.aux_loss).backward()
    for name, p in ffn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_cost_and_init():
    for bias in (False, True):
        cfg = FFNConfig(d_model=64, d_hidden=96, bias=bias)
        ffn = DenseFFN(cfg)
        c = cfg.cost()
        assert c.total_params == sum(p.numel() for p in ffn.parameters())
        assert c.total_params == 3 * 64 * 96 + (2 * 96 + 64 if bias else 0)
        assert c.flops_per_token == 6 * 64 * 96
        assert c.sparse_part is None and c.active_params_per_token == c.total_params
    ffn = DenseFFN(FFNConfig(d_model=128, d_hidden=256, bias=True, init_std=0.05))
    w = torch.cat([ffn.w_gate.weight.flatten(), ffn.w_up.weight.flatten(), ffn.w_out.weight.flatten()])
    assert abs(w.std().item() - 0.05) < 0.05 * 0.02  # 98k samples: std of the std estimate ~0.2%
    assert abs(w.mean().item()) < 0.05 * 0.02
    assert ffn.w_gate.bias.abs().sum() == 0 and ffn.w_out.bias.abs().sum() == 0


@pytest.mark.parametrize("field,value", [("d_model", 0), ("d_hidden", -4), ("d_hidden", 2.5),
                                         ("bias", "yes"), ("init_std", 0.0), ("init_std", math.nan)])
def test_bad_config(field, value):
    kwargs = dict(d_model=8, d_hidden=16)
    kwargs[field] = value
    with pytest.raises(ConfigError) as err:
        FFNConfig(**kwargs)
    assert f"FFNConfig.{field}={value!r}" in str(err.value)
    assert isinstance(err.value, ValueError)
