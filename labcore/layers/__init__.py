"""labcore's layers, one mechanism per file; every layer is called as ``y, aux = layer(x)``.

===========  ==========================  ===========================================================
file         config / layer              mechanism
===========  ==========================  ===========================================================
ffn.py       FFNConfig / DenseFFN        SwiGLU MLP, the dense baseline (registered as "dense")
moe.py       MoEConfig / MoE             top-k routed SwiGLU experts (3 router conventions)
pkm.py       PKMConfig / PKM             product-key memory (Lample et al. 2019)
ultramem.py  UltraMemConfig / UltraMem   TDQKR, multi-core scoring, IVE and every Table 2 switch
ultramem_v2  UltraMemV2Config /          UltraMemV2: one value projection, pre-value weights, key
  .py        UltraMemV2                  balance loss, ring-shared value pools (arXiv 2508.18756)
memory_plus  MemoryPlusConfig /          Memory Layers at Scale: PKM read, SiLU-gated output
  .py        MemoryPlus                  projection, optional qk-norm (arXiv 2412.09764)
peer.py      PEERConfig / PEER           single-neuron experts chosen by product keys (arXiv 2407.04153)
tucker.py    SearchGrid, TuckerRetrieval what UltraMem and UltraMemV2 share: the search grid's config
                                         rules, W_q, keys, Tucker cores and their rank-1 proxy
base.py      LayerAux, LayerCost,        the shared contract: the aux record, costs, parameter
             tag_param                   roles for optimiser groups (validation: labcore.config)
registry.py  LayerSpec, register, ...    the one registry: each layer file ends with its
                                         ``register(LayerSpec(...))``; everything else iterates it
===========  ==========================  ===========================================================

Importing this package registers the layers above, in that order. :func:`build` turns any
registered config into its layer; :func:`spec_for` / :func:`get` give a layer's spec.
"""

from __future__ import annotations

# isort: off
# Each file registers its layer when imported; this order is the order of tables, legends and families.
from labcore.layers import ffn, moe, pkm, ultramem, ultramem_v2, memory_plus, peer  # noqa: F401
# isort: on
from labcore.config import ConfigError
from labcore.layers.base import LayerAux, LayerCost
from labcore.layers.ffn import DenseFFN, FFNConfig
from labcore.layers.memory_plus import MemoryPlus, MemoryPlusConfig
from labcore.layers.moe import MoE, MoEConfig
from labcore.layers.peer import PEER, PEERConfig
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
from labcore.layers.ultramem_v2 import UltraMemV2, UltraMemV2Config

__all__ = ["ConfigError", "LayerAux", "LayerCost", "DenseFFN", "FFNConfig", "MoE", "MoEConfig", "PKM",
           "PKMConfig", "UltraMem", "UltraMemConfig", "UltraMemV2", "UltraMemV2Config", "MemoryPlus", "MemoryPlusConfig",
           "PEER", "PEERConfig", "LAYERS", "LayerSpec", "build", "get", "memory_spec",
           "names", "register", "spec_for", "specs", "unregister"]
