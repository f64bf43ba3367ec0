"""Shared contract of every labcore layer: validated frozen configs and the typed aux record.

Every layer is an ``nn.Module`` built from a frozen dataclass config and called as
``y, aux = layer(x)`` with ``x`` of shape ``(B, T, D)`` or ``(N_tok, D)``; ``y`` has the shape of
``x``. ``aux`` is a :class:`LayerAux` (or a subclass): plots, metrics and training read this
record and never reach into a layer's internals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------
# The aux record.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LayerAux:
    """What a layer did on one call. Tokens are flattened: N_tok = B*T (or N_tok for 2-D input).

    aux_loss: ``()`` scalar, the *weighted* sum of the layer's auxiliary losses, differentiable;
        a zero tensor (on the input's device) when the layer has none.
    indices: ``(N_tok, S)`` long, what each token selected (expert ids, or value slots: virtual
        slots for UltraMem with IVE); None for dense layers. S = K for MoE, H*K for memories.
    scores: ``(N_tok, S)`` float, the weight applied to each selected item (after softmax /
        renormalisation, i.e. exactly what multiplies the expert or value output).
    counts: ``(n_slots,)`` long, hits per expert / value slot in this call (bincount of indices).
    losses: unweighted named components of the aux loss (e.g. "balance", "z", "tucker").
    stats: detached float diagnostics (e.g. "dropped_tokens", "top1_score", "output_std").
    """

    aux_loss: Tensor
    indices: Tensor | None = None
    scores: Tensor | None = None
    counts: Tensor | None = None
    losses: Mapping[str, Tensor] = field(default_factory=dict)
    stats: Mapping[str, float] = field(default_factory=dict)


def zero_loss(like: Tensor) -> Tensor:
    """A zero scalar on ``like``'s device and dtype (float32 if ``like`` is not floating)."""
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return torch.zeros((), device=like.device, dtype=dtype)


def flatten_tokens(x: Tensor, d_model: int, owner: str) -> tuple[Tensor, tuple[int, ...]]:
    """``(B, T, D)`` or ``(N_tok, D)`` -> ``(N_tok, D)`` plus the leading shape to restore."""
    if x.dim() not in (2, 3) or x.shape[-1] != d_model:
        raise ValueError(f"{owner}: input x has shape {tuple(x.shape)}; expected (B, T, {d_model}) "
                         f"or (N, {d_model})")
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, d_model), lead  # (N_tok, D)


# ----------------------------------------------------------------------------------------------
# Parameter roles: optimiser groups are built from these tags, never from module names.
# ----------------------------------------------------------------------------------------------

ROLE_ATTR = "_labcore_role"
ROLES = ("default", "no_decay", "memory_values")


def tag_param(p: nn.Parameter, role: str) -> nn.Parameter:
    """Tag a parameter with an optimiser role: "no_decay" (norm gains, biases, keys, cores...)
    or "memory_values" (value tables: own group with the value learning-rate multiplier)."""
    if role not in ROLES:
        raise ValueError(f"role={role!r} is not allowed: must be one of {ROLES}")
    setattr(p, ROLE_ATTR, role)
    return p


def param_role(p: nn.Parameter) -> str:
    """The role of a parameter: its tag, else "no_decay" for 0/1-dim tensors, else "default"."""
    role = getattr(p, ROLE_ATTR, None)
    if role is not None:
        return role
    return "no_decay" if p.dim() < 2 else "default"


# ----------------------------------------------------------------------------------------------
# Analytical cost of a layer: every config implements ``cost() -> LayerCost``.
# budget.py composes these into model budgets; profiling's cost model turns them into bytes and
# FLOPs of a decode step of B tokens. Counts must be exact for params (tests compare with the
# built module) and are multiply-add x 2 for FLOPs.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCost:
    """params: exact parameter count by part (sum == sum of numel of the built layer's parameters;
        buffers excluded). Part names are free-form but stable, e.g. "router", "experts",
        "shared", "query", "keys", "cores", "values", "value_proj", "norms", "w_in", "w_out".
    sparse_part: the name of the part accessed sparsely ("experts" or "values"), or None (dense).
    n_units: number of sparse units (experts E, or physical value rows N); 0 when dense.
    unit_params: parameters per sparse unit (one expert's weights, or D_v for one value row).
    units_per_token: sparse units one token touches (K experts, or H*K value rows).
    flops_per_token: forward FLOPs for one token (2 per multiply-add), including retrieval/routing.
    """

    params: Mapping[str, int]
    sparse_part: str | None = None
    n_units: int = 0
    unit_params: int = 0
    units_per_token: int = 0
    flops_per_token: int = 0

    @property
    def total_params(self) -> int:
        return int(sum(self.params.values()))

    @property
    def dense_params(self) -> int:
        """Parameters read for every token (everything but the sparse part)."""
        return self.total_params - (int(self.params.get(self.sparse_part, 0)) if self.sparse_part else 0)

    @property
    def active_params_per_token(self) -> int:
        return self.dense_params + self.units_per_token * self.unit_params


# ----------------------------------------------------------------------------------------------
# Per-call diagnostics switch of the memory layers.
# ----------------------------------------------------------------------------------------------


def set_sparse_value_grads(module: nn.Module, flag: bool) -> int:
    """Set ``sparse_value_grad`` on every submodule of ``module`` (itself included) that has it.

    PKM and UltraMem read their value table with ``labcore.layers.fast.bags.weighted_bag``; with the
    flag on, the table's gradient is a sparse COO tensor over the rows the step read (the PKM
    authors' ``--mem_sparse``, arXiv 1907.05242 code), which ``labcore.lm.sparse_optim.LazyAdamW``
    updates without scanning a dense (N, F) gradient; ``torch.optim.AdamW`` refuses sparse
    gradients, so ``labcore.lm.train.build_optimizer`` turns it on only with ``optimizer="lazy_adamw"``.
    Returns the number of layers set."""
    return _set_layer_flag(module, "sparse_value_grad", flag, "set_sparse_value_grads")


def _set_layer_flag(module: nn.Module, attr: str, flag: bool, caller: str) -> int:
    """Set ``attr`` to ``flag`` on every submodule (itself included) that has it; the count set."""
    if not isinstance(flag, bool):
        raise TypeError(f"{caller}: flag={flag!r} is not allowed: must be True or False")
    n = 0
    for m in module.modules():
        if hasattr(m, attr):
            setattr(m, attr, flag)
            n += 1
    return n


def set_detailed_aux(module: nn.Module, flag: bool) -> int:
    """Set ``detailed_aux`` on every submodule of ``module`` (itself included) that has it.

    Memory layers (PKM, UltraMem) compute per-call diagnostics whose cost grows with the number of
    value slots, not with the batch: ``aux.counts`` (a bincount over all slots), coverage and the KL
    to uniform usage. ``detailed_aux=True`` (the default) keeps them; ``False`` gives
    ``aux.counts=None`` and only the O(N_tok) stats (decode-step benchmarks switch it off). Returns
    the number of layers set.
    """
    return _set_layer_flag(module, "detailed_aux", flag, "set_detailed_aux")
