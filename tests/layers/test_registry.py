"""labcore.layers.build_layer maps each config to its layer, and every layer honours the contract."""

import pytest
import torch

from labcore.layers import (
    FFNConfig,
    LayerAux,
    MoEConfig,
    PKMConfig,
    UltraMemConfig,
    build_layer,
)
from labcore.layers.base import ConfigError

CONFIGS = [
    FFNConfig(d_model=16, d_hidden=32),
    MoEConfig(d_model=16, d_expert=8, n_experts=4, top_k=2),
    PKMConfig(d_model=16, n_keys=8, heads=2, k_dim=8, top_k=4),
    UltraMemConfig(d_model=16, n_keys=8, heads=2, k_dim=8, top_k=4, d_value=8, expansion=4),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_build_layer_and_contract(cfg):
    torch.manual_seed(0)
    layer = build_layer(cfg).eval()
    x = torch.randn(2, 3, 16)
    y, aux = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert isinstance(aux, LayerAux) and aux.aux_loss.dim() == 0
    # (N, D) input gives the same rows as (B, T, D).
    y2, _ = layer(x.reshape(6, 16))
    torch.testing.assert_close(y2, y.reshape(6, 16))
    # cost() counts the built layer's parameters exactly.
    assert cfg.cost().total_params == sum(p.numel() for p in layer.parameters())


def test_build_layer_rejects_unknown_configs():
    with pytest.raises(ConfigError, match="dict"):
        build_layer({"d_model": 16})
