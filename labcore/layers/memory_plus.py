"""Memory+: a PKM read followed by a SiLU-gated output projection (Memory Layers at Scale).

Memory+ (Berges, Oğuz et al., "Memory Layers at Scale", arXiv 2412.09764 §3; docs/mechanisms.md §5)
keeps PKM's product-key read (docs/mechanisms.md §4, ``labcore.layers.pkm``) and changes what
happens to its output: the read is gated, feature by feature, by a SiLU of a linear map of the
input, then projected back to the model width. It replaces the FFN in a few blocks (about three,
spread over depth), and those memories share one value pool.

Symbols (notation of ``labcore/__init__.py``): D model width, n sub-keys per side (N = n^2 values),
H heads, K values read per head, D_k key dimension, D_v value width (= D when the gate is on).

The mechanism
-------------
::

    m(x) = Σ_h Σ_{i ∈ I_h} softmax_K(s)_i V_i          PKM read, heads summed  (labcore.layers.pkm)
    y    = W_o (m(x) ⊙ SiLU(W_s x))                     gate=True: W_s: D -> D_v, W_o: D_v -> D
    y    = m(x)   (or PKM's own D_v -> D projection)    gate=False: exactly PKM
    y   <- σ(W_g x) ⊙ y                                 output_gate=True (an extra gate in the
                                                        released code, off by default)

``gate=False`` (and ``output_gate=False``, ``qk_norm=False``) *is* PKM: the read is done by a
:class:`~labcore.layers.pkm.PKM` held as ``self.memory`` (composition, PKM's code is not copied) and
the test loads a PKM's weights into it and compares outputs. With the gate on the value width must
be D (Meta's configs use D_v = D and the UltraMem release's Memory+ asserts it; PKM would otherwise
project the read to D before the gate could act on it).

qk-norm (``qk_norm``; the paper uses it "when needed", for large memories on small models; not in
the released code): each sub-query and each sub-key is LayerNorm-ed over its D_k/2 features before
scoring. The query side is PKM's per sub-query LayerNorm (``query_norm="layernorm"``, gain 1); on
the key side the inner memory is a :class:`QKNormPKM`, a PKM whose ``keys`` attribute (the sub-key
tensor its search reads) is LayerNorm(raw keys) * g, with a learned gain g of shape
(H, 2, 1, D_k/2) initialised to (D_k/2)^-1/2, so a sub-score q̂·k̂·g has std about 1 at init (the
1/sqrt(d) of attention). The raw keys stay the parameter ``memory.keys`` of the state dict.

Value learning rate (``value_lr``): the released configs train the values with a fixed learning rate
(1e-3), independent of the model's schedule. The layer records it on the value table (attribute
:data:`FIXED_LR_ATTR`, read with :func:`fixed_lr`), next to its optimiser role "memory_values"
(``labcore.layers.base.tag_param``). The layer only records it: giving such a parameter its own
optimiser group at that constant learning rate is ``labcore.lm.optim``'s job. Layers sharing one value
pool must agree on it.

Shared value pool: ``MemoryPlus(cfg, values=pool)`` with ``pool`` an ``nn.Embedding(n^2, D_v)``
(used as is, like PKM's ``values=``); ``layer.values`` is the table, so the LM can hand the first
layer's table to the others.

Initialisation: PKM's (sub-keys Uniform(+-1/sqrt(D_k/2)), values N(0, D_v^-1/2)); W_s, W_o, W_g as
``nn.Linear`` without bias (the paper does not say; bias-free like labcore's dense FFN default).

Known public-code issue (docs/implementations.md): the Memory+ baseline in the UltraMem release
computes normalised keys and then scores the *raw* keys; here the normalised keys are the ones
PKM's search reads (tests/layers/test_memory_plus.py checks that rescaling the raw keys changes
nothing under qk-norm).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labcore.config import ConfigError, check_bool, check_float, check_int
from labcore.layers.base import LayerAux, LayerCost, flatten_tokens, tag_param
from labcore.layers.pkm import PKM, PKMConfig, check_dropouts, check_product_keys, pkm_reference
from labcore.layers.registry import LayerSpec, register

FIXED_LR_ATTR = "_labcore_fixed_lr"
"""Attribute of a parameter holding a constant learning rate the optimiser must use for it."""


def fixed_lr(p: nn.Parameter) -> float | None:
    """The constant learning rate recorded on ``p`` (Memory+ values), or None."""
    return getattr(p, FIXED_LR_ATTR, None)


@dataclass(frozen=True)
class MemoryPlusConfig:
    """Configuration of a Memory+ layer: PKM's fields (same meaning and defaults) plus the output block.

    PKM fields: d_model, n_keys, heads, k_dim, top_k, query_norm, d_value, value_init_std,
    query_bias, input_dropout, query_dropout, value_dropout, norm_eps (see ``PKMConfig``).
    gate: the SiLU-gated output y = W_o(m ⊙ SiLU(W_s x)) (Memory+); False gives PKM exactly.
    output_gate: an extra y <- sigmoid(W_g x) ⊙ y (in the released code; off by default).
    qk_norm: LayerNorm on sub-queries and sub-keys (needs query_norm="layernorm").
    value_lr: a constant learning rate for the value table (released configs: 1e-3); None = the
        trainer's memory-value group settings.
    """

    d_model: int
    n_keys: int
    heads: int = 4
    k_dim: int = 128
    top_k: int = 32
    query_norm: str = "layernorm"
    d_value: int | None = None
    value_init_std: float | None = None
    query_bias: bool = True
    input_dropout: float = 0.0
    query_dropout: float = 0.0
    value_dropout: float = 0.0
    norm_eps: float = 1e-5
    gate: bool = True
    output_gate: bool = False
    qk_norm: bool = False
    value_lr: float | None = None

    def __post_init__(self) -> None:
        o = "MemoryPlusConfig"
        check_product_keys(self, o)
        if self.d_value is not None:
            check_int(o, "d_value", self.d_value)
        if self.value_init_std is not None:
            check_float(o, "value_init_std", self.value_init_std, min_value=0.0, min_inclusive=False)
        for name in ("query_bias", "gate", "output_gate", "qk_norm"):
            check_bool(o, name, getattr(self, name))
        check_dropouts(self, o)
        if self.value_lr is not None:
            check_float(o, "value_lr", self.value_lr, min_value=0.0, min_inclusive=False)
        if self.gate and self.d_value not in (None, self.d_model):
            raise ConfigError(f"{o}.d_value={self.d_value!r} is not allowed with gate=True: must be None or "
                              f"d_model ({self.d_model}) (the gate acts on the D-wide read before W_o)")
        if self.qk_norm and self.query_norm != "layernorm":
            raise ConfigError(f"{o}.query_norm={self.query_norm!r} is not allowed with qk_norm=True: must be "
                              "'layernorm' (the query half of qk-norm)")

    # derived ---------------------------------------------------------------------------------
    def pkm_config(self) -> PKMConfig:
        """The PKM that does the read (every PKM field copied)."""
        names = {f.name for f in dataclasses.fields(PKMConfig)}
        return PKMConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in names})

    @property
    def d_v(self) -> int:
        return self.d_model if self.d_value is None else self.d_value

    def flops_by_part(self) -> dict[str, int]:
        """Forward FLOPs per token by part (2 per multiply-add): "memory" is PKM's count
        (``PKMConfig.cost``); gate W_s x, gating (one multiply per feature), w_out W_o(.),
        output_gate W_g x and its multiply. Not counted: SiLU, sigmoid, the key norm (per call, not
        per token)."""
        D, Dv = self.d_model, self.d_v
        return {
            "memory": self.pkm_config().cost().flops_per_token,
            "gate": 2 * D * Dv if self.gate else 0,
            "gating": Dv if self.gate else 0,
            "w_out": 2 * Dv * D if self.gate else 0,
            "output_gate": 2 * D * D + D if self.output_gate else 0,
        }

    def cost(self) -> LayerCost:
        """Exact parameter count by part (PKM's parts plus the output block) and FLOPs per token."""
        pkm = self.pkm_config().cost()
        D, Dv = self.d_model, self.d_v
        params = dict(pkm.params)                      # with every switch off: PKM's cost exactly
        if self.qk_norm:
            params["norms"] = params.get("norms", 0) + self.heads * self.k_dim                 # key gain
        if self.gate:
            params["gate"] = D * Dv
            params["w_out"] = Dv * D
        if self.output_gate:
            params["output_gate"] = D * D
        return dataclasses.replace(pkm, params=params, flops_per_token=sum(self.flops_by_part().values()))


class KeyNorm(nn.Module):
    """qk-norm's key side for PKM's sub-keys (H, 2, n, D_k/2): LayerNorm over D_k/2, times a learned gain."""

    def __init__(self, heads: int, half: int, eps: float):
        super().__init__()
        self.half, self.eps = half, eps
        self.gain = tag_param(nn.Parameter(torch.full((heads, 2, 1, half), half ** -0.5)), "no_decay")

    def forward(self, keys: Tensor) -> Tensor:
        return F.layer_norm(keys, (self.half,), eps=self.eps) * self.gain        # (H, 2, n, D_k/2)


class QKNormPKM(PKM):
    """A PKM whose search reads normalised sub-keys: ``keys`` is ``key_norm(raw keys)``.

    PKM's search reads ``self.keys`` (its documented (H, 2, n, D_k/2) sub-key tensor); here that
    attribute is computed from the raw parameter on each read (the parameter is still registered,
    and saved, as ``keys``), so PKM's code runs unchanged on the normalised keys.
    """

    def __init__(self, cfg: PKMConfig, values: nn.Embedding | None = None):
        super().__init__(cfg, values=values)
        self.key_norm = KeyNorm(cfg.heads, cfg.k_dim // 2, cfg.norm_eps)

    @property
    def keys(self) -> Tensor:  # type: ignore[override]
        raw, norm = self._parameters.get("keys"), self._modules.get("key_norm")
        if raw is None or norm is None:                   # during PKM.__init__, before both exist
            raise AttributeError("keys")
        return norm(raw)

    @property
    def raw_keys(self) -> nn.Parameter:
        """The trainable sub-keys before normalisation."""
        return self._parameters["keys"]


class MemoryPlus(nn.Module):
    """Memory+ layer: ``y, aux = layer(x)`` with x (B, T, D) or (N_tok, D).

    ``values``: an optional external ``nn.Embedding(n^2, D_v)`` shared with other memory layers
    (the paper's shared pool), used as is. ``aux`` is the PKM read's record (indices, softmax weights,
    counts, coverage, KL to uniform) with ``stats["output_std"]`` of this layer's output and
    ``stats["memory_std"]`` of the read before the gate.
    """

    def __init__(self, cfg: MemoryPlusConfig, values: nn.Embedding | None = None):
        super().__init__()
        if not isinstance(cfg, MemoryPlusConfig):
            raise ConfigError(f"MemoryPlus: cfg of type {type(cfg).__name__} is not allowed: must be a "
                              "MemoryPlusConfig")
        self.cfg = cfg
        D, Dv = cfg.d_model, cfg.d_v
        memory_cls = QKNormPKM if cfg.qk_norm else PKM
        self.memory = memory_cls(cfg.pkm_config(), values=values)              # the read m(x)
        self.gate = nn.Linear(D, Dv, bias=False) if cfg.gate else None         # W_s
        self.w_out = nn.Linear(Dv, D, bias=False) if cfg.gate else None        # W_o
        self.output_gate = nn.Linear(D, D, bias=False) if cfg.output_gate else None  # W_g
        table = self.memory.values.weight
        tag_param(table, "memory_values")
        if cfg.value_lr is not None:
            previous = fixed_lr(table)
            if previous is not None and previous != cfg.value_lr:
                raise ConfigError(f"MemoryPlusConfig.value_lr={cfg.value_lr!r} is not allowed for this shared "
                                  f"value pool: must be {previous!r}, the value another layer set")
            setattr(table, FIXED_LR_ATTR, float(cfg.value_lr))

    @property
    def values(self) -> nn.Embedding:
        """The value table (n^2, D_v), the one to share across layers."""
        return self.memory.values

    def cost(self) -> LayerCost:
        return self.cfg.cost()

    def extra_repr(self) -> str:
        c = self.cfg
        return f"gate={c.gate}, output_gate={c.output_gate}, qk_norm={c.qk_norm}, value_lr={c.value_lr}"

    def forward(self, x: Tensor) -> tuple[Tensor, LayerAux]:
        c = self.cfg
        x2d, lead = flatten_tokens(x, c.d_model, "MemoryPlus")                # (N_tok, D)
        m, aux = self.memory(x2d)                                              # PKM read: (N_tok, D_v)
        y = m
        if self.gate is not None:
            y = self.w_out(m * F.silu(self.gate(x2d)))                         # W_o (m ⊙ SiLU(W_s x))
        if self.output_gate is not None:
            y = torch.sigmoid(self.output_gate(x2d)) * y                       # σ(W_g x) ⊙ y
        if y is not m:
            with torch.no_grad():
                out_std = y.float().std().item() if y.numel() > 1 else 0.0
            aux = dataclasses.replace(aux, stats={**aux.stats, "memory_std": aux.stats["output_std"],
                                                  "output_std": out_std})
        return y.view(*lead, c.d_model), aux                                    # (B, T, D) or (N_tok, D)


def memory_plus_reference(layer: MemoryPlus, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Brute-force Memory+: ``pkm_reference`` (all n^2 slots scored) on the inner PKM, then the gate
    written out. Returns ``(y, slots, weights)`` like ``pkm_reference``."""
    c = layer.cfg
    x2d, lead = flatten_tokens(x, c.d_model, "memory_plus_reference")
    m, slots, weights = pkm_reference(layer.memory, x2d)                       # (N_tok, D_v)
    y = m
    if c.gate:
        s = x2d @ layer.gate.weight.T
        y = (m * (s / (1.0 + torch.exp(-s)))) @ layer.w_out.weight.T          # SiLU(s) = s * sigmoid(s)
    if c.output_gate:
        y = y / (1.0 + torch.exp(-(x2d @ layer.output_gate.weight.T)))
    return y.view(*lead, c.d_model), slots, weights


def _three_memories(n_layers: int) -> tuple[int, int]:
    """Three memories (fewer in a shallower model), each in parallel to one block's FFN (span 0):
    "about three memory layers is best" (arXiv 2412.09764 §3; docs/mechanisms.md §5)."""
    return min(3, n_layers), 0


register(LayerSpec(name="memory_plus", role="memory", config=MemoryPlusConfig, layer=MemoryPlus,
                   label="Memory+", color="#17becf", size_field="n_keys",
                   min_size=lambda kw: kw.get("top_k", MemoryPlusConfig.top_k),
                   # Meta's configs: 4 heads x top-32, k_dim D/2, D_v = D (the gate needs it), ONE value
                   # pool shared by the memories (``shared_values`` is a keyword of the budget matcher,
                   # labcore.lm.budget.match_memory), about three memory layers (arXiv 2412.09764 §3).
                   family_kwargs=lambda D: {"heads": 4, "top_k": 32, "k_dim": 2 * max(1, D // 4), "d_value": D,
                                            "shared_values": True},
                   layout=_three_memories,
                   summary="PKM read, then y = W_o(m ⊙ SiLU(W_s x)); shared value pool, optional qk-norm "
                           "(arXiv 2412.09764)"))
