"""labcore's layers, one mechanism per file; every layer is called as ``y, aux = layer(x)``.

===========  ==========================  ===========================================================
file         config / layer              mechanism
===========  ==========================  ===========================================================
ffn.py       FFNConfig / DenseFFN        SwiGLU MLP, the dense baseline (registered as "dense")
moe.py       MoEConfig / MoE             top-k routed SwiGLU experts (3 router conventions)
pkm.py       PKMConfig / PKM             product-key memory (Lample et al. 2019)
ultramem.py  UltraMemConfig / UltraMem   TDQKR, multi-core scoring, IVE and every Table 2 switch
base.py      ConfigError, LayerAux,      the shared contract: validation, the aux record, costs,
             LayerCost, tag_param        parameter roles for optimiser groups
registry.py  LayerSpec, register, ...    the one registry: each layer file ends with its
                                         ``register(LayerSpec(...))``; everything else iterates it
===========  ==========================  ===========================================================

Importing this package registers the four layers above, in that order. :func:`build` turns any
registered config into its layer; :func:`spec_for` / :func:`get` give a layer's spec.
"""

from __future__ import annotations

from labcore.layers import ffn, moe, pkm, ultramem  # noqa: F401  (each registers itself, in this order)
from labcore.layers.base import ConfigError, LayerAux, LayerCost
from labcore.layers.ffn import DenseFFN, FFNConfig
from labcore.layers.moe import MoE, MoEConfig
from labcore.layers.pkm import PKM, PKMConfig
from labcore.layers.registry import (
    LAYERS,
    LayerSpec,
    build,
    get,
    memory_spec,
    names,
    register,
    spec_for,
    specs,
    unregister,
)
from labcore.layers.ultramem import UltraMem, UltraMemConfig

__all__ = ["ConfigError", "LayerAux", "LayerCost", "DenseFFN", "FFNConfig", "MoE", "MoEConfig", "PKM",
           "PKMConfig", "UltraMem", "UltraMemConfig", "LAYERS", "LayerSpec", "build", "get", "memory_spec",
           "names", "register", "spec_for", "specs", "unregister"]
