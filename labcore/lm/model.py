"""A small decoder-only language model whose FFNs can be swapped for MoE or joined by memory layers.

The trunk is a plain pre-norm transformer (nanoGPT shape, RMSNorm, rotary positions). What makes it a
lab instrument is the *sparse-layer plan* (:class:`SparsePlan`): the same trunk runs as a dense
model, as an MoE model (MoE replaces the FFN of chosen blocks), or as a memory model (PKM or
UltraMem layers wired in with the UltraMem paper's skip-layer placements).

Data flow of one block (pre-norm; ``x`` is the residual stream, shape ``(B, T, D)``)
-----------------------------------------------------------------------------------

::

    h   = x + Attn(RMSNorm(x))          causal self-attention, rotary positions on q and k
    u   = RMSNorm(h)                    the block's FFN INPUT (what a memory placed at this block reads)
    x'  = h + FFN(u)                    FFN is a DenseFFN, or an MoE in MoE blocks
    x'  = x' + sum of the outputs of the memories whose placement ends at this block

The model: ``x_0 = Embed(idx)``; ``x_{i+1} = Block_i(x_i)`` for i = 0..L-1; ``logits = Head(RMSNorm(x_L))``
with the head tied to the embedding matrix by default (``logits = RMSNorm(x_L) @ W_embᵀ``).

Memory placements "k:v": the skip-layer (docs/mechanisms.md §1.2)
-------------------------------------------------------

A placement ``"k:v"`` (0 <= k <= v < L) means: the memory reads ``u_k``, the normalized tensor fed to
block k's FFN, and its output is added to the residual stream *after* block v. For ``"2:5"``::

    x_2 ─► [ block 2: h = x + Attn(Norm x); u_2 = Norm h; x = h + FFN(u_2) ] ─► [block 3] ─► [block 4] ─► [block 5] ─(+)─► x_6
                                                 │                                                        ▲
                                                 └──────────────────────► Memory(u_2) ────────────────────┘
                                               reads block 2's FFN input            added after block 5

``"k:k"`` is a memory in parallel to block k's FFN (``x' = h + FFN(u) + Mem(u)``), and ``"full"`` means
one such memory in every block (the UltraMemV2 layout). By default memory layers never replace the
FFN: each block keeps its own FFN, so a memory model has the dense model's trunk plus the memories.
With ``SparsePlan(memory_replaces_ffn=True)`` ("k:k" placements or "full" only) a memory takes the
place of block k's FFN, ``x' = h + Mem(u)`` (PKM, arXiv 1907.05242 §3.2; Memory Layers at Scale,
arXiv 2412.09764 §3; docs/mechanisms.md §4, §5); the budget then has no FFN in those blocks.

The paper's layout (docs/mechanisms.md §1.2). PKM puts one big memory in parallel with (or instead of) one FFN.
UltraMem splits the big memory into several smaller ones spread over the depth, each connected by a
skip-layer link, so the memory-bound lookup of memory j can run while the compute-bound blocks k..v
run ("asynchronous execution"). The released 227M/1.2B UltraMem (20 blocks, d = 768) uses
``2:5/6:9/10:13/14:17``: four memories, each skipping three blocks; :func:`split_memory` produces such
layouts for any depth. Table 2 row "+split big mem & skip": val loss -0.015, FLOPs 346.96M -> 323.32M.

Shared value pool (Memory Layers at Scale, docs/mechanisms.md §5): with ``shared_values=True`` all memory
layers read ONE value table (each keeps its own query network and keys). The plan carries a single
memory config, so every memory has identical sizes; the first memory's table is built (with that
layer's own init) and handed to the others through the layers' ``values=`` argument. Memories
whose layer reads a window of a pool (UltraMemV2's ring sharing, docs/mechanisms.md §3) get one
pool of N / ``share_ratio`` rows from ``labcore.layers.ultramem_v2.value_pool`` (values and
pre-values) and memory j reads ``ring_window(j, S, N_pool, share_ratio)``; the budget counts the
pool once.

Choices made here (documented, not from a paper)
------------------------------------------------
- Initialisation: token embedding, attention q/k/v and an untied head ~ N(0, init_std); the attention
  output projection ~ N(0, init_std / sqrt(2L)) (GPT-2's residual scaling); the dense FFNs get
  ``FFNConfig(init_std=init_std)``. MoE and memory layers keep their own initialisation (their
  configs own it). For memory configs with a ``n_model_layers`` field (UltraMem's paper init,
  values ~ N(0, E / (2 m H L))), the LM sets L to the number of MEMORY layers in the plan (see
  :meth:`ModelConfig.memory_layer_config`): the variances of all memory outputs add up in the
  residual stream, so with L = number of memories the summed memory variance stays the same when
  one big memory is split into several (the layer-splitting ablation compares them at equal total
  output variance). The paper's own L is not readable (docs/mechanisms.md §1.6, secondary sources).
- Parameter roles (for ``labcore.lm.optim.build_param_groups``): norm gains are 1-D, hence "no_decay"
  (the trunk has no biases); the token embedding is tagged "default" (decayed). It is tied to the LM
  head, a linear map, so it is decayed like the other matrices (nanoGPT's convention; OLMo does not
  decay embeddings). Layers tag their own parameters (value tables "memory_values", keys "no_decay").
- ``aux`` holds the records of the *sparse* layers only (MoE blocks and memories); dense FFNs are not
  listed. ``aux_loss`` combines their (already weighted) ``aux_loss``: the MoE layers' mean by
  default (``SparsePlan.moe_aux_reduction``, "sum" available), plus every memory's.
- Causality: attention is causal and every FFN / MoE / memory acts on each token separately, so a
  token's logits never depend on later tokens (tested for every plan kind). Two layer options
  couple the tokens of a batch and break this in training mode: an MoE ``capacity_factor`` (which
  tokens are dropped depends on the whole batch) and PKM's ``query_norm="batchnorm"``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labcore.config import (
    ConfigError,
    check_choice,
    check_float,
    check_int,
    is_perfect_square,
)
from labcore.config import (
    from_dict as config_from_dict,
)
from labcore.layers.base import LayerAux, tag_param
from labcore.layers.ffn import DenseFFN, FFNConfig
from labcore.layers.moe import MoE, MoEConfig
from labcore.layers.registry import memory_spec
from labcore.layers.ultramem_v2 import ring_window, value_pool

PLAN_KINDS = ("dense", "moe", "memory")
AUX_REDUCTIONS = ("mean", "sum")


def _takes_window(memory_cfg: Any) -> bool:
    """Whether the memory's layer reads a window of a shared pool (constructor ``window_start=``)."""
    return "window_start" in inspect.signature(memory_spec(memory_cfg).layer).parameters


# ----------------------------------------------------------------------------------------------
# The sparse-layer plan.
# ----------------------------------------------------------------------------------------------


def parse_placement(text: Any, owner: str = "SparsePlan.placements") -> tuple[int, int]:
    """``"k:v"`` -> ``(k, v)`` with 0 <= k <= v; anything else raises ConfigError naming ``text``."""
    allowed = "'k:v' with integers 0 <= k <= v (memory reads block k's FFN input, adds after block v)"
    if not isinstance(text, str) or text.count(":") != 1:
        raise ConfigError(f"{owner}: placement {text!r} is not allowed: must be {allowed}")
    left, right = (s.strip() for s in text.split(":"))
    if not (left.isdecimal() and right.isdecimal()):
        raise ConfigError(f"{owner}: placement {text!r} is not allowed: must be {allowed}")
    k, v = int(left), int(right)
    if k > v:
        raise ConfigError(f"{owner}: placement {text!r} has k={k} > v={v}: a memory's output can only "
                          f"be added at or after the block it reads (must be {allowed})")
    return k, v


@dataclass(frozen=True)
class SparsePlan:
    """Which sparse layers the LM has and where they sit.

    kind: "dense" (every block has a DenseFFN), "moe" (an MoE replaces the FFN of ``moe_blocks``),
        or "memory" (memory layers of type ``memory`` wired in by ``placements``; FFNs are kept
        unless ``memory_replaces_ffn``).
    moe: the MoE config (kind "moe" only). ``moe_blocks``: block indices with an MoE; None = all.
    memory: the config of any memory layer in the registry (``labcore.layers.registry``, role
        "memory": PKMConfig, UltraMemConfig, ...; kind "memory" only); one config for every memory.
    placements: a tuple of "k:v" strings (also accepted: one string "2:5/6:9", the release's
        ``mem_insert_way`` format, or a list), or ("full",) / "full" for one memory per block in
        parallel to its FFN (UltraMemV2). Normalised to a tuple of strings.
    shared_values: all memory layers share ONE value table (Memory Layers at Scale); sizes are
        identical by construction (one config).
    share_ratio: with ``shared_values``, the fraction of the pool each memory reads, for memories
        whose layer reads a window of a pool (UltraMemV2's ring sharing, release ``share_ratio``,
        docs/mechanisms.md §3): the pool has N_pool = N / share_ratio rows (N = n_keys**2, the
        window) and memory j reads the window ``ring_window(j, S, N_pool, share_ratio)``. 1.0 (the
        default): every memory reads the whole pool (rotated by j * N_pool / S for UltraMemV2).
        Other memories (PKM, UltraMem, Memory+) take the pool as is and allow only 1.0.
    memory_replaces_ffn: memories placed "k:k" (or "full") REPLACE block k's FFN instead of running
        in parallel to it: the block computes ``x' = h + Mem(u)`` (PKM, arXiv 1907.05242 §3.2 and
        Memory Layers at Scale / Memory+, arXiv 2412.09764 §3, swap the FFN of chosen layers for the
        memory; docs/mechanisms.md §4, §5). Only "k:k" placements, each block at most once.
        False (the default): every block keeps its FFN (UltraMem's placement, docs/mechanisms.md §1.2).
    moe_aux_reduction: how the MoE blocks' aux losses (balance and router z-loss, each already
        weighted by its coefficient) combine into ``LMOutput.aux_loss``: "mean" over the MoE layers
        (the default: the OLMoE / HF transformers ``load_balancing_loss_func`` convention and
        megablocks' ``batched_load_balancing_loss``, both divide by the number of MoE layers, so a
        coefficient means the same at any depth; docs/mechanisms.md §7.1) or "sum" (the effective
        coefficient grows with the number of MoE layers). Memory aux losses are always summed
        (each memory layer's loss is its own term, as in the UltraMem release).
    """

    kind: str = "dense"
    moe: MoEConfig | None = None
    moe_blocks: tuple[int, ...] | None = None
    memory: Any = None                          # a registered memory config (PKMConfig, UltraMemConfig, ...)
    placements: tuple[str, ...] = ()
    shared_values: bool = False
    share_ratio: float = 1.0
    memory_replaces_ffn: bool = False
    moe_aux_reduction: str = "mean"

    def __post_init__(self) -> None:
        own = "SparsePlan"
        check_choice(own, "kind", self.kind, PLAN_KINDS)
        placements = self.placements
        if isinstance(placements, str):
            placements = tuple(s.strip() for s in placements.split("/") if s.strip())
        elif isinstance(placements, list | tuple):
            placements = tuple(placements)
        else:
            raise ConfigError(f"{own}.placements={placements!r} is not allowed: must be a tuple of 'k:v' "
                              f"strings, a string 'k:v/k:v', or 'full'")
        object.__setattr__(self, "placements", placements)
        if self.moe_blocks is not None:
            if not isinstance(self.moe_blocks, list | tuple):
                raise ConfigError(f"{own}.moe_blocks={self.moe_blocks!r} is not allowed: must be None "
                                  f"(all blocks) or a tuple of block indices")
            object.__setattr__(self, "moe_blocks", tuple(self.moe_blocks))
        for name in ("shared_values", "memory_replaces_ffn"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{own}.{name}={getattr(self, name)!r} is not allowed: must be a bool")
        check_choice(own, "moe_aux_reduction", self.moe_aux_reduction, AUX_REDUCTIONS)
        check_float(own, "share_ratio", self.share_ratio, min_value=0.0, max_value=1.0, min_inclusive=False)
        if self.share_ratio != 1.0 and not self.shared_values:
            raise ConfigError(f"{own}.share_ratio={self.share_ratio!r} is not allowed with shared_values=False: "
                              f"must be 1.0 unless the memories share one pool")
        if self.memory_replaces_ffn and self.kind != "memory":
            raise ConfigError(f"{own}.memory_replaces_ffn=True is not allowed with kind={self.kind!r}: must be "
                              f"False unless kind='memory'")

        if self.kind != "moe" and (self.moe is not None or self.moe_blocks is not None):
            raise ConfigError(f"{own}.moe={self.moe!r}, moe_blocks={self.moe_blocks!r} are not allowed with "
                              f"kind={self.kind!r}: must be None unless kind='moe'")
        if self.kind != "memory" and (self.memory is not None or placements or self.shared_values):
            raise ConfigError(f"{own}.memory/placements/shared_values are not allowed with kind={self.kind!r}"
                              f": must be unset unless kind='memory' (got placements={placements!r}, "
                              f"shared_values={self.shared_values!r})")
        if self.kind == "moe":
            if not isinstance(self.moe, MoEConfig):
                raise ConfigError(f"{own}.moe={self.moe!r} is not allowed: kind='moe' needs a MoEConfig")
            if self.moe_blocks is not None:
                if not self.moe_blocks:
                    raise ConfigError(f"{own}.moe_blocks=() is not allowed: must be None (all blocks) or "
                                      f"a non-empty tuple of block indices")
                for b in self.moe_blocks:
                    check_int(own, "moe_blocks[]", b, min_value=0)
                if len(set(self.moe_blocks)) != len(self.moe_blocks):
                    raise ConfigError(f"{own}.moe_blocks={self.moe_blocks!r} is not allowed: must not "
                                      f"repeat a block")
        if self.kind == "memory":
            spec = memory_spec(self.memory, owner=f"{own}.memory")  # a registered memory config, else ConfigError
            if self.shared_values and not spec.shares_values:
                raise ConfigError(f"{own}.shared_values=True is not allowed with memory type {spec.name!r}: "
                                  f"it has no single value table to share (must be False)")
            if not placements:
                raise ConfigError(f"{own}.placements=() is not allowed: kind='memory' needs at least one "
                                  f"'k:v' placement or 'full'")
            if "full" in placements:
                if placements != ("full",):
                    raise ConfigError(f"{own}.placements={placements!r} is not allowed: 'full' (one memory "
                                      f"per block) cannot be combined with other placements")
            else:
                for p in placements:
                    parse_placement(p)
            if self.memory_replaces_ffn and placements != ("full",):
                pairs = [parse_placement(p) for p in placements]
                if any(k != v for k, v in pairs):
                    raise ConfigError(f"{own}.memory_replaces_ffn=True is not allowed with placements="
                                      f"{placements!r}: must be 'k:k' placements (a memory that replaces "
                                      f"block k's FFN reads its input and adds at the same block) or 'full'")
                if len({k for k, _ in pairs}) != len(pairs):
                    raise ConfigError(f"{own}.memory_replaces_ffn=True is not allowed with placements="
                                      f"{placements!r}: must name each block at most once")
            if self.share_ratio != 1.0 and not _takes_window(self.memory):
                raise ConfigError(f"{own}.share_ratio={self.share_ratio!r} is not allowed for memory "
                                  f"{self.memory_type!r}: must be 1.0 (its layer reads the whole pool; "
                                  f"ring windows need a layer with window_start=, e.g. 'ultramem_v2')")

    @property
    def memory_type(self) -> str | None:
        """The registered name of the memory ("pkm", "ultramem", ...; kind "memory"), else None."""
        if self.memory is None:
            return None
        return memory_spec(self.memory).name

    def memory_pairs(self, n_layers: int) -> tuple[tuple[int, int], ...]:
        """The placements as ``(k, v)`` pairs; "full" expands to ``(i, i)`` for every block."""
        if self.kind != "memory":
            return ()
        if self.placements == ("full",):
            return tuple((i, i) for i in range(n_layers))
        return tuple(parse_placement(p) for p in self.placements)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], d_model: int | None = None) -> SparsePlan:
        """Build from plain data (YAML / notebook parameters).

        ``{"kind": "moe", "moe": {...MoEConfig fields...}, "moe_blocks": [1, 3]}`` or
        ``{"kind": "memory", "memory": {"type": "ultramem", ...UltraMemConfig fields...},
        "placements": "2:5/6:9", "shared_values": false}``; ``type`` is any registered memory name. ``d_model`` (the model's) fills the layer
        configs' ``d_model`` when they omit it. Unknown keys raise ConfigError naming them.
        """
        data = dict(data)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"SparsePlan: unknown key(s) {unknown}; allowed keys: {sorted(names)}")
        if isinstance(data.get("moe"), Mapping):
            moe = dict(data["moe"])
            if d_model is not None:
                moe.setdefault("d_model", d_model)
            data["moe"] = config_from_dict(MoEConfig, moe)
        if isinstance(data.get("memory"), Mapping):
            mem = dict(data["memory"])
            spec = memory_spec(mem.pop("type", None), owner="SparsePlan.memory.type")
            if d_model is not None:
                mem.setdefault("d_model", d_model)
            data["memory"] = config_from_dict(spec.config, mem)
        if isinstance(data.get("moe_blocks"), list):
            data["moe_blocks"] = tuple(data["moe_blocks"])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :meth:`from_dict` turns back into an equal plan (for run.json / YAML)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.moe is not None:
            out["moe"] = dataclasses.asdict(self.moe)
            out["moe_blocks"] = None if self.moe_blocks is None else list(self.moe_blocks)
        if self.memory is not None:
            out["memory"] = {"type": self.memory_type, **dataclasses.asdict(self.memory)}
            out["placements"] = list(self.placements)
            out["shared_values"] = self.shared_values
            out["share_ratio"] = self.share_ratio
            out["memory_replaces_ffn"] = self.memory_replaces_ffn
        if self.kind == "moe":
            out["moe_aux_reduction"] = self.moe_aux_reduction
        return out


# ----------------------------------------------------------------------------------------------
# Model config.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """The LM's shape and its sparse-layer plan.

    vocab_size V, d_model D, n_layers L, n_heads (attention heads; D divisible, head dim even for
    rotary), d_ff (hidden size I of the DenseFFNs), max_seq_len (longest T accepted), tie_embeddings
    (head weight = embedding matrix), rope_base, init_std, dropout (attention probabilities and every
    residual branch; 0 = off), plan (:class:`SparsePlan`).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    init_std: float = 0.02
    dropout: float = 0.0
    plan: SparsePlan = field(default_factory=SparsePlan)

    def __post_init__(self) -> None:
        own = "ModelConfig"
        check_int(own, "vocab_size", self.vocab_size, min_value=2)
        check_int(own, "d_model", self.d_model, min_value=2)
        check_int(own, "n_layers", self.n_layers, min_value=1)
        check_int(own, "n_heads", self.n_heads, min_value=1)
        if self.d_model % self.n_heads != 0 or (self.d_model // self.n_heads) % 2 != 0:
            raise ConfigError(f"{own}.n_heads={self.n_heads} is not allowed with d_model={self.d_model}: "
                              f"must divide d_model into an even head dimension (rotary pairs)")
        check_int(own, "d_ff", self.d_ff, min_value=1)
        check_int(own, "max_seq_len", self.max_seq_len, min_value=1)
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"{own}.tie_embeddings={self.tie_embeddings!r} is not allowed: must be a bool")
        check_float(own, "rope_base", self.rope_base, min_value=1.0, min_inclusive=False)
        check_float(own, "init_std", self.init_std, min_value=0.0, min_inclusive=False)
        check_float(own, "dropout", self.dropout, min_value=0.0, max_value=0.99)
        if not isinstance(self.plan, SparsePlan):
            raise ConfigError(f"{own}.plan={self.plan!r} is not allowed: must be a SparsePlan")
        plan = self.plan
        if plan.kind == "moe":
            if plan.moe.d_model != self.d_model:
                raise ConfigError(f"{own}.plan.moe.d_model={plan.moe.d_model} is not allowed: must equal "
                                  f"the model's d_model={self.d_model}")
            for b in plan.moe_blocks or ():
                if b >= self.n_layers:
                    raise ConfigError(f"{own}.plan.moe_blocks={plan.moe_blocks!r} is not allowed: block {b} "
                                      f"does not exist (blocks are 0..{self.n_layers - 1})")
        if plan.kind == "memory":
            if plan.memory.d_model != self.d_model:
                raise ConfigError(f"{own}.plan.memory.d_model={plan.memory.d_model} is not allowed: must "
                                  f"equal the model's d_model={self.d_model}")
            for p, (k, v) in zip(plan.placements, plan.memory_pairs(self.n_layers)):
                if v >= self.n_layers:
                    raise ConfigError(f"{own}.plan.placements: placement {p!r} is not allowed with "
                                      f"n_layers={self.n_layers}: must have 0 <= k <= v <= "
                                      f"{self.n_layers - 1} (got k={k}, v={v})")
            if plan.shared_values and _takes_window(plan.memory):
                self.ring_windows()                              # pool size / windows valid, else ConfigError

    def pool_rows(self) -> int | None:
        """Rows N_pool of the shared value pool (``plan.shared_values``), else None: N = n_keys**2
        for memories that read the whole pool; N / share_ratio (rounded) for ring windows."""
        plan = self.plan
        if plan.kind != "memory" or not plan.shared_values:
            return None
        n_rows = self.memory_layer_config().cost().n_units               # N rows per memory
        if not _takes_window(plan.memory):
            return n_rows
        return round(n_rows / plan.share_ratio)

    def ring_windows(self) -> tuple[Any, ...]:
        """The ``RingWindow`` of every memory (``labcore.layers.ultramem_v2.ring_window``) when the
        memories read windows of a shared pool; () otherwise. ConfigError when N_pool is not a
        multiple of the number of memories or a window is not the layer's N = n_keys**2 rows."""
        plan = self.plan
        if plan.kind != "memory" or not plan.shared_values or not _takes_window(plan.memory):
            return ()
        S, pool, n = len(self.memory_pairs()), self.pool_rows(), plan.memory.n_keys
        if pool % S:
            raise ConfigError(f"ModelConfig.plan.share_ratio={plan.share_ratio!r} is not allowed: the pool of "
                              f"N_pool = n_keys**2 / share_ratio = {pool} rows must split into {S} equal home "
                              f"segments (one per memory); choose share_ratio = n_keys**2 / N_pool with N_pool "
                              f"a multiple of {S}")
        windows = tuple(ring_window(j, S, pool, plan.share_ratio) for j in range(S))
        if windows[0].n_keys != n:
            raise ConfigError(f"ModelConfig.plan.share_ratio={plan.share_ratio!r} is not allowed: a window of "
                              f"floor(sqrt(N_pool * share_ratio))**2 = {windows[0].size} rows of the pool "
                              f"({pool} rows) must equal the layer's n_keys**2 = {n * n}")
        return windows

    def replaced_ffn_blocks(self) -> tuple[int, ...]:
        """Blocks without an FFN: those a memory replaces (``plan.memory_replaces_ffn``), sorted."""
        if self.plan.kind != "memory" or not self.plan.memory_replaces_ffn:
            return ()
        return tuple(sorted(k for k, _ in self.memory_pairs()))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def moe_block_ids(self) -> tuple[int, ...]:
        """Blocks whose FFN is an MoE (sorted)."""
        if self.plan.kind != "moe":
            return ()
        return tuple(sorted(self.plan.moe_blocks)) if self.plan.moe_blocks else tuple(range(self.n_layers))

    def memory_pairs(self) -> tuple[tuple[int, int], ...]:
        """``(k, v)`` of every memory layer, in plan order (memory j is named ``mem{j}(k:v)``)."""
        return self.plan.memory_pairs(self.n_layers)

    def memory_names(self) -> tuple[str, ...]:
        return tuple(f"mem{j}({k}:{v})" for j, (k, v) in enumerate(self.memory_pairs()))

    def ffn_config(self) -> FFNConfig:
        """The DenseFFN config of the non-MoE blocks."""
        return FFNConfig(d_model=self.d_model, d_hidden=self.d_ff, init_std=self.init_std)

    def memory_layer_config(self) -> Any:
        """The config each memory layer is built with: the plan's, with ``n_model_layers`` (if the
        config has that field, as UltraMemConfig does for the paper init N(0, E / (2 m H L))) set to
        the number of memory layers in the plan, so L counts memories, whose outputs all add to the
        residual stream."""
        mem = self.plan.memory
        if mem is None:
            return None
        if "n_model_layers" in {f.name for f in dataclasses.fields(mem)}:
            mem = dataclasses.replace(mem, n_model_layers=len(self.memory_pairs()))
        return mem

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build from plain data; ``plan`` may be a mapping (see :meth:`SparsePlan.from_dict`)."""
        data = dict(data)
        if isinstance(data.get("plan"), Mapping):
            data["plan"] = SparsePlan.from_dict(data["plan"], d_model=data.get("d_model"))
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "plan"}
        out["plan"] = self.plan.to_dict()
        return out


# ----------------------------------------------------------------------------------------------
# Layer splitting.
# ----------------------------------------------------------------------------------------------


def spread_placements(n_memories: int, n_layers: int, span: int) -> tuple[str, ...]:
    """Spread ``n_memories`` skip-layer placements ``"k:k+span"`` over ``n_layers`` blocks.

    Rule: each memory covers ``span + 1`` blocks (it reads block k, adds after block k + span). If
    the memories fit end to end (``n_memories * (span + 1) <= n_layers``) they are laid end to end,
    the next one reading the block right after the previous one's output lands, and the group is
    centred in the depth (spare blocks split evenly, the odd one at the end): 20 blocks, 4 memories,
    span 3 -> 2:5/6:9/10:13/14:17, the release's layout. Otherwise their start blocks are spread
    evenly over ``0 .. n_layers - 1 - span`` (rounded) and spans overlap.
    """
    check_int("split_memory", "n_memories", n_memories, min_value=1)
    check_int("split_memory", "n_layers", n_layers, min_value=1)
    check_int("split_memory", "span", span, min_value=0, max_value=n_layers - 1)
    width = span + 1
    if n_memories * width <= n_layers:
        offset = (n_layers - n_memories * width) // 2
        starts = [offset + j * width for j in range(n_memories)]
    else:
        last = n_layers - 1 - span
        starts = [round(j * last / (n_memories - 1)) if n_memories > 1 else 0 for j in range(n_memories)]
    return tuple(f"{k}:{k + span}" for k in starts)


def split_memory(total_values: int, n_memories: int, n_layers: int, span: int) -> tuple[int, tuple[str, ...]]:
    """One big memory of ``total_values`` value rows, or ``n_memories`` smaller ones with the same total.

    Returns ``(n_keys, placements)``: each memory has ``N_i = n_keys**2 = total_values / n_memories``
    physical values (product keys need a square grid), and the placements come from
    :func:`spread_placements`. A total that does not split into equal perfect squares raises
    ConfigError naming the two nearest totals that do. This splits the values only; for the
    splitting ablation at equal activated values per token too (top-K divided over the memories)
    use :func:`split_memory_plan`.

    >>> split_memory(4 * 808**2, 4, 20, 3)
    (808, ('2:5', '6:9', '10:13', '14:17'))
    """
    check_int("split_memory", "total_values", total_values, min_value=1)
    check_int("split_memory", "n_memories", n_memories, min_value=1)
    placements = spread_placements(n_memories, n_layers, span)
    per, rem = divmod(total_values, n_memories)
    if rem == 0 and is_perfect_square(per):
        return math.isqrt(per), placements
    lo = max(1, math.isqrt(total_values // n_memories))
    hi = lo + 1
    raise ConfigError(
        f"split_memory: total_values={total_values} split over n_memories={n_memories} gives "
        f"{total_values / n_memories:g} values per memory, which is not a perfect square n**2 "
        f"(product keys need n row keys x n column keys); nearest totals that work: "
        f"{n_memories * lo * lo} (n_keys={lo}) or {n_memories * hi * hi} (n_keys={hi})")


def split_memory_plan(memory: Any, n_memories: int, n_layers: int, span: int, *,
                      shared_values: bool = False) -> SparsePlan:
    """Split one big memory (config ``memory``) into ``n_memories`` = S smaller ones at equal TOTAL
    values and equal ACTIVATED values per token (the layer-splitting ablation, docs/mechanisms.md §1.2).

    The rule: each memory gets N_s = N / S value rows (``n_keys`` n_s = sqrt(N / S); N / S must be
    a perfect square) and top-K_s = K / S slots per head (K must be divisible by S); heads H, key
    and value widths are unchanged. Hence S * N_s = N values in total and S * H * K_s = H * K
    value rows read per token, before and after. The candidate count m (``candidate_m``, rows /
    columns kept per side before the exact scoring) follows K when it is None (m_s = K_s); an explicit
    ``candidate_m`` is divided by S too (each memory searches m / S rows per side, so the candidates
    over all memories stay m per side), requiring divisibility. Placements come from
    :func:`spread_placements` (span ``span``). With S = 1 the config comes back unchanged.

    Memories without ``top_k`` / the spec's ``size_field`` raise ConfigError. Returns the SparsePlan
    (kind "memory"); wrap it in a ModelConfig for the budget (``model_budget(cfg).sparse_params``
    is the total, ``sparse_bytes_per_token / dtype_bytes`` the activated values).
    """
    own = "split_memory_plan"
    spec = memory_spec(memory, owner=f"{own}.memory")
    check_int(own, "n_memories", n_memories, min_value=1)
    size_field = spec.size_field
    if size_field is None or not hasattr(memory, size_field) or not hasattr(memory, "top_k"):
        raise ConfigError(f"{own}.memory={spec.name!r} is not allowed: must have a size field (n_keys) and "
                          f"top_k to divide")
    n, K, S = getattr(memory, size_field), memory.top_k, n_memories
    n_split, _ = split_memory(n * n, S, n_layers, span)
    if K % S:
        raise ConfigError(f"{own}: top_k={K} is not allowed with n_memories={S}: must be divisible by it "
                          f"(each memory keeps K / S slots per head so that activated values stay H*K)")
    changes: dict[str, Any] = {size_field: n_split, "top_k": K // S}
    m = getattr(memory, "candidate_m", None)
    if m is not None:
        if m % S:
            raise ConfigError(f"{own}: candidate_m={m} is not allowed with n_memories={S}: must be divisible "
                              f"by it (or None, to follow top_k)")
        changes["candidate_m"] = m // S
    small = dataclasses.replace(memory, **changes) if S > 1 else memory
    return SparsePlan(kind="memory", memory=small, placements=spread_placements(S, n_layers, span),
                      shared_values=shared_values)


# ----------------------------------------------------------------------------------------------
# The trunk.
# ----------------------------------------------------------------------------------------------


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer), GPT-NeoX "half split" layout.

    For position t and pair index i < hd/2, the pair (x_i, x_{i+hd/2}) is rotated by angle
    t * base^(-2i/hd). Applied to queries and keys, it makes q_t·k_s depend on t - s only.
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T_max, hd/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, T: int) -> tuple[Tensor, Tensor]:
        return self.cos[:T], self.sin[:T]  # (T, hd/2) each


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` of shape (B, H, T, hd) by the angles in cos/sin of shape (T, hd/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (B, H, T, hd/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, H, T, hd)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention(is_causal=True)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.head_dim, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)  # (B, T, D) each
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(y)


class Block(nn.Module):
    """``h = x + Attn(Norm x); u = Norm h; x' = h + FFN(u)``; returns ``(x', u, ffn_aux)``.

    ``ffn=None`` (a block whose FFN a memory replaces): ``x' = h`` and the LM adds ``Mem(u)``.

    ``u`` is returned so that memory layers placed at this block can read it (the skip-layer).
    """

    def __init__(self, cfg: ModelConfig, ffn: nn.Module | None) -> None:
        super().__init__()
        self.norm_attn = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.attn = CausalSelfAttention(cfg)
        self.norm_ffn = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.ffn = ffn
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, LayerAux | None]:
        h = x + self.drop(self.attn(self.norm_attn(x), cos, sin))
        u = self.norm_ffn(h)  # (B, T, D): this block's FFN input
        if self.ffn is None:  # a memory placed "k:k" replaces the FFN: x' = h + Mem(u), added by the LM
            return h, u, None
        y, aux = _call_layer(self.ffn, u)
        return h + self.drop(y), u, aux


def _call_layer(layer: nn.Module, x: Tensor) -> tuple[Tensor, LayerAux | None]:
    """Layers return ``(y, aux)``; tolerate a plain tensor (aux None) from a dense module."""
    out = layer(x)
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


@dataclass(frozen=True, eq=False)
class LMOutput:
    """logits (B, T, V); loss: mean cross-entropy over targets != -100 (None without targets);
    aux_loss: () the sparse layers' weighted aux losses: the MoE layers' mean (or sum, per
    ``SparsePlan.moe_aux_reduction``) plus each memory's; aux: their records by stable name
    ("block3.moe", "mem0(2:5)")."""

    logits: Tensor
    loss: Tensor | None
    aux_loss: Tensor
    aux: dict[str, LayerAux]


class LM(nn.Module):
    """The decoder LM: ``LM(cfg)(idx, targets=None) -> LMOutput``. See the module docstring."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise ConfigError(f"LM: cfg={cfg!r} is not allowed: must be a ModelConfig")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        tag_param(self.tok_emb.weight, "default")
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        moe_ids, no_ffn = set(cfg.moe_block_ids()), set(cfg.replaced_ffn_blocks())
        self.blocks = nn.ModuleList(
            Block(cfg, None if i in no_ffn else MoE(cfg.plan.moe) if i in moe_ids else DenseFFN(cfg.ffn_config()))
            for i in range(cfg.n_layers))
        self.block_names = [f"block{i}.moe" if i in moe_ids else f"block{i}.no_ffn" if i in no_ffn
                            else f"block{i}.ffn" for i in range(cfg.n_layers)]
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

        # Memories: memory j reads block k_j's FFN input and is added after block v_j.
        self.mem_pairs = list(cfg.memory_pairs())
        self.mem_names = list(cfg.memory_names())
        self.memories = nn.ModuleList()
        mem_cfg = cfg.memory_layer_config()
        pool: nn.Embedding | None = None
        mem_layer = memory_spec(mem_cfg).layer if mem_cfg is not None else None
        windows = cfg.ring_windows()
        if windows:  # a pool read through ring windows (UltraMemV2): values and pre-values, built once
            pool, pre_pool = value_pool(mem_cfg, cfg.pool_rows())
            for w in windows:
                self.memories.append(mem_layer(mem_cfg, values=pool, pre_values=pre_pool, window_start=w.start))
        else:
            for _ in self.mem_pairs:
                layer = mem_layer(mem_cfg, values=pool)
                if cfg.plan.shared_values and pool is None:
                    pool = layer.values  # the first memory's table, with its own init, shared by the rest
                    if not isinstance(pool, nn.Embedding):
                        raise TypeError(f"LM: shared_values needs {type(layer).__name__}.values to be an "
                                        f"nn.Embedding, got {type(pool).__name__}")
                    tag_param(pool.weight, "memory_values")
                self.memories.append(layer)
        self._reads: dict[int, list[int]] = {}   # block k -> memories reading its FFN input
        self._adds: dict[int, list[int]] = {}    # block v -> memories added after it
        for j, (k, v) in enumerate(self.mem_pairs):
            self._reads.setdefault(k, []).append(j)
            self._adds.setdefault(v, []).append(j)
        self._init_trunk()

    def _init_trunk(self) -> None:
        std = self.cfg.init_std
        nn.init.normal_(self.tok_emb.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.normal_(block.attn.proj.weight, std=std / math.sqrt(2 * self.cfg.n_layers))
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=std)

    # -- iterators -------------------------------------------------------------------------------

    def memory_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """``(name, layer)`` of every memory layer, e.g. ``("mem0(2:5)", UltraMem)``."""
        yield from zip(self.mem_names, self.memories)

    def sparse_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """MoE blocks' MoE layers (``"block3.moe"``) then the memory layers."""
        for name, block in zip(self.block_names, self.blocks):
            if name.endswith(".moe"):
                yield name, block.ffn
        yield from self.memory_layers()

    def refresh_retrieval(self) -> None:
        """Call ``refresh_retrieval()`` on every memory layer that has it (once per optimiser step:
        UltraMem recomputes the rank-1 SVD proxy of its Tucker cores)."""
        for _, layer in self.memory_layers():
            refresh = getattr(layer, "refresh_retrieval", None)
            if callable(refresh):
                refresh()

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> LMOutput:
        cfg = self.cfg
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
            got = f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, Tensor) else type(idx).__name__
            raise ValueError(f"LM: idx must be a (B, T) torch.long tensor, got {got}")
        B, T = idx.shape
        if T > cfg.max_seq_len or T == 0:
            raise ValueError(f"LM: sequence length T={T} is not allowed: must be 1..max_seq_len="
                             f"{cfg.max_seq_len}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= cfg.vocab_size):
            raise ValueError(f"LM: idx has token ids in [{int(idx.min())}, {int(idx.max())}]; allowed: "
                             f"0..vocab_size-1={cfg.vocab_size - 1}")
        if targets is not None and (not isinstance(targets, Tensor) or targets.shape != idx.shape
                                    or targets.dtype != torch.long):
            got = f"{tuple(targets.shape)} {targets.dtype}" if isinstance(targets, Tensor) else type(targets)
            raise ValueError(f"LM: targets must be a torch.long tensor of idx's shape {(B, T)}, got {got}")

        x = self.drop(self.tok_emb(idx))  # (B, T, D)
        cos, sin = self.rotary(T)  # (T, hd/2)
        aux: dict[str, LayerAux] = {}
        pending: dict[int, list[Tensor]] = {}  # block v -> memory outputs to add after it
        for i, block in enumerate(self.blocks):
            x, u, ffn_aux = block(x, cos, sin)
            if ffn_aux is not None and self.block_names[i].endswith(".moe"):
                aux[self.block_names[i]] = ffn_aux
            for j in self._reads.get(i, ()):
                m, mem_aux = _call_layer(self.memories[j], u)  # memory j reads u_k (k = i)
                aux[self.mem_names[j]] = mem_aux
                pending.setdefault(self.mem_pairs[j][1], []).append(self.drop(m))
            for m in pending.pop(i, ()):
                x = x + m  # skip-layer: added to the residual stream after block v (v = i)
        x = self.norm_f(x)
        weight = self.tok_emb.weight if self.head is None else self.head.weight
        logits = F.linear(x, weight)  # (B, T, V)

        aux_loss = torch.zeros((), device=logits.device, dtype=torch.float32)
        moe_losses = [a.aux_loss for n, a in aux.items() if a is not None and n.endswith(".moe")]
        if moe_losses:  # MoE layers: mean (OLMoE / megablocks) or sum, SparsePlan.moe_aux_reduction
            moe_total = torch.stack(moe_losses).sum()
            aux_loss = aux_loss + (moe_total / len(moe_losses) if cfg.plan.moe_aux_reduction == "mean"
                                   else moe_total)
        for n, a in aux.items():  # memory layers: each its own term
            if a is not None and not n.endswith(".moe"):
                aux_loss = aux_loss + a.aux_loss
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(B * T),
                                   ignore_index=-100)  # (B*T, V) vs (B*T,)
        return LMOutput(logits=logits, loss=loss, aux_loss=aux_loss, aux=aux)
