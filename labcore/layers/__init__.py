"""labcore's layers, one mechanism per file; every layer is called as ``y, aux = layer(x)``.

==========  ==========================  ===========================================================
file        config / layer              mechanism
==========  ==========================  ===========================================================
ffn.py      FFNConfig / DenseFFN        SwiGLU MLP, the dense baseline
moe.py      MoEConfig / MoE             top-k routed SwiGLU experts (3 router conventions)
pkm.py      PKMConfig / PKM             product-key memory (Lample et al. 2019)
ultramem.py UltraMemConfig / UltraMem   TDQKR, multi-core scoring, IVE and every Table 2 switch
base.py     ConfigError, LayerAux,      the shared contract: validation, the aux record, costs,
            LayerCost, tag_param        parameter roles for optimiser groups
==========  ==========================  ===========================================================

:func:`build_layer` turns any of these configs into its layer.
"""

from __future__ import annotations

from torch import nn

from labcore.layers.base import ConfigError, LayerAux, LayerCost
from labcore.layers.ffn import DenseFFN, FFNConfig
from labcore.layers.moe import MoE, MoEConfig
from labcore.layers.pkm import PKM, PKMConfig
from labcore.layers.ultramem import UltraMem, UltraMemConfig

LAYERS: dict[type, type[nn.Module]] = {FFNConfig: DenseFFN, MoEConfig: MoE, PKMConfig: PKM,
                                       UltraMemConfig: UltraMem}


def build_layer(cfg, **kwargs) -> nn.Module:
    """The layer for a config (``kwargs``, e.g. ``values=`` for memories, go to its constructor)."""
    try:
        cls = LAYERS[type(cfg)]
    except KeyError:
        raise ConfigError(f"build_layer: cfg of type {type(cfg).__name__} is not allowed: must be one of "
                          f"{[c.__name__ for c in LAYERS]}") from None
    return cls(cfg, **kwargs)


__all__ = ["ConfigError", "LayerAux", "LayerCost", "DenseFFN", "FFNConfig", "MoE", "MoEConfig", "PKM",
           "PKMConfig", "UltraMem", "UltraMemConfig", "LAYERS", "build_layer"]
