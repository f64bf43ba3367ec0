"""Optimiser parameter groups by role, the memory-value learning-rate schedule, retrieval refresh.

Parameter roles (``labcore.layers.base.param_role``) decide the groups, never module names:

* ``"default"``: matrices, decayed with ``weight_decay``;
* ``"no_decay"``: norm gains, biases, sub-keys, Tucker cores, any 0/1-dim tensor (weight decay 0);
* ``"memory_values"``: value tables of PKM / UltraMem, their own group with the value learning
  rate (``value_lr``, default ``lr``) and its own weight decay (default 0);
* value tables that carry a constant learning rate (Memory+ ``value_lr``, recorded by the layer
  on the parameter, ``labcore.layers.memory_plus.fixed_lr``): one group per such lr, ``lr_role ==
  "memory_values_fixed_lr"``, which ``apply_value_lr`` leaves at that lr at every step (no warmup,
  no cosine, no value-LR decay; docs/mechanisms.md §5).

Weight decay by kind (``decay=``): inside the roles, parameters are told apart by what they are
(:func:`param_kind`): "matrix" (role "default"), "keys" (memory sub-keys), "cores" (Tucker cores),
"norms" (norm gains: the trunk's RMSNorm gains, memory q/k norm gains), "values" (memory value
tables), "bias" and "other" (any other 0/1-dim tensor). Matrices are always decayed with
``weight_decay``; ``decay`` names which of :data:`DECAY_KINDS` ("keys", "cores", "norms",
"values") are decayed too, or a preset of :data:`DECAY_PRESETS`:

* ``"default"`` (today's behaviour): none of them;
* ``"release"``: all four, as the UltraMem release (``olmo/optim.py`` on top of OLMo's AdamW,
  docs/implementations.md "UltraMem") decays keys, Tucker cores, norm gains and value tables with
  AdamW's ``weight_decay`` (0.1, arXiv 2411.12364 Table 4); the values inherit it at their own
  learning rate (AdamW's decoupled decay multiplies by the group's lr, so values decay at the value
  lr). ``value_weight_decay``, when given, overrides the values' decay.

Biases and "other" are never decayed. A group holds the parameters of one role with one weight
decay (and one fixed lr); its ``param_kinds`` lists their kinds. With ``decay="default"`` the
groups are exactly the three roles.

Value learning-rate decay (UltraMem, docs/mechanisms.md §1.6; docs/implementations.md "UltraMem")::

    lr_values(step) = lr(step) * factor(step),   factor(step) = 1 + (M - 1) * max(0, 1 - step / T)

M = 10 in the paper, 4 in the official release (``ValueLRSchedule`` default); T = ``end_step``
(the release uses the whole run). ``factor`` is M at step 0, decays linearly, and stays exactly 1
from step T on. The community port's version turns negative and divides by zero before its end
step; here M >= 1 and T >= 1 are validated and the clamp keeps the factor in [1, M].
``apply_value_lr`` applies it on top of any warmup/cosine schedule passed as ``lr_scale``.

``refresh_all(model)`` calls ``refresh_retrieval()`` (UltraMem's once-per-optimiser-step rank-1 SVD
proxy refresh) on every submodule that defines it; call it right after ``optimizer.step()``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any

from torch import nn
from torch.optim import Optimizer

from labcore.config import ConfigError, check_float, check_int
from labcore.layers.base import param_role
from labcore.layers.memory_plus import fixed_lr

VALUE_ROLE = "memory_values"
FIXED_VALUE_ROLE = "memory_values_fixed_lr"
DECAY_KINDS = ("keys", "cores", "norms", "values")
DECAY_PRESETS: dict[str, tuple[str, ...]] = {"default": (), "release": DECAY_KINDS}
_NORM_TYPES = (nn.RMSNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class ValueLRSchedule:
    """Multiplier of the memory-value learning rate: M at step 0, linear decay to 1 at end_step.

    ``ValueLRSchedule(end_step=10_000)`` (release default M = 4) or
    ``ValueLRSchedule(10.0, end_step=10_000)`` (paper). M = 1 means a constant 1x.
    """

    multiplier: float = 4.0
    _: KW_ONLY
    end_step: int

    def __post_init__(self) -> None:
        check_float("ValueLRSchedule", "multiplier", self.multiplier, min_value=1.0)
        check_int("ValueLRSchedule", "end_step", self.end_step, min_value=1)

    def factor(self, step: int) -> float:
        """1 + (M - 1) * max(0, 1 - step / T), for an optimiser step >= 0."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"ValueLRSchedule.factor: step={step!r} is not allowed: must be an integer >= 0")
        return 1.0 + (self.multiplier - 1.0) * max(0.0, 1.0 - step / self.end_step)


def resolve_decay(decay: str | Sequence[str] | None, owner: str = "build_param_groups") -> tuple[str, ...]:
    """The kinds a ``decay=`` option decays besides matrices: a preset name of
    :data:`DECAY_PRESETS` or a sequence of :data:`DECAY_KINDS`; ConfigError otherwise."""
    if decay is None:
        return ()
    if isinstance(decay, str):
        if decay not in DECAY_PRESETS:
            raise ConfigError(f"{owner}: decay={decay!r} is not allowed: must be a preset "
                              f"{sorted(DECAY_PRESETS)} or a list of kinds from {list(DECAY_KINDS)}")
        return DECAY_PRESETS[decay]
    kinds = tuple(decay) if isinstance(decay, list | tuple | set | frozenset) else None
    if kinds is None or any(k not in DECAY_KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ConfigError(f"{owner}: decay={decay!r} is not allowed: must be a preset {sorted(DECAY_PRESETS)} "
                          f"or a list of distinct kinds from {list(DECAY_KINDS)}")
    return tuple(k for k in DECAY_KINDS if k in kinds)


def param_kind(module: nn.Module, attr: str, p: nn.Parameter) -> str:
    """What parameter ``p`` (registered as ``module.<attr>``) is, for weight decay by kind.

    Role "default" -> "matrix"; role "memory_values" -> "values"; inside role "no_decay": the
    attribute ``keys`` -> "keys" (PKM / UltraMem / PEER sub-keys), ``cores`` -> "cores" (Tucker
    cores), a norm module's ``weight`` or an attribute ending in ``gain`` -> "norms" (RMSNorm /
    LayerNorm gains, PKM's sub-query LayerNorm, the q/k norm gains of UltraMem and Memory+),
    ``bias`` -> "bias", anything else "other"."""
    role = param_role(p)
    if role == "default":
        return "matrix"
    if role == VALUE_ROLE:
        return "values"
    if attr == "keys":
        return "keys"
    if attr == "cores":
        return "cores"
    if attr == "bias":
        return "bias"
    is_norm = isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")
    if attr.endswith("gain") or (attr == "weight" and is_norm):
        return "norms"
    return "other"


def build_param_groups(model: nn.Module, lr: float, weight_decay: float, value_lr: float | None = None,
                       value_weight_decay: float | None = None,
                       decay: str | Sequence[str] | None = "default") -> list[dict[str, Any]]:
    """Trainable parameters of ``model`` grouped by role and kind, ready for ``torch.optim.AdamW(groups)``.

    Every group has ``params``, ``lr``, ``base_lr`` (the lr before any schedule), ``weight_decay``,
    ``lr_role`` (its role name) and ``param_kinds`` (the :func:`param_kind` of its parameters). ``decay``: which kinds
    besides matrices get ``weight_decay`` (module docstring; "default" = none, "release" = keys,
    cores, norms, values). ``value_weight_decay``: the value tables' decay (None: ``weight_decay``
    if "values" is decayed, else 0). Groups without parameters are left out. A parameter shared
    by several modules appears once; frozen parameters (``requires_grad=False``) are left out.
    Value tables with a fixed lr (Memory+) get one group per lr, role "memory_values_fixed_lr".
    """
    check_float("build_param_groups", "lr", lr, min_value=0.0, min_inclusive=False)
    check_float("build_param_groups", "weight_decay", weight_decay, min_value=0.0)
    if value_lr is not None:
        check_float("build_param_groups", "value_lr", value_lr, min_value=0.0, min_inclusive=False)
    if value_weight_decay is not None:
        check_float("build_param_groups", "value_weight_decay", value_weight_decay, min_value=0.0)
    decayed = resolve_decay(decay)
    if value_weight_decay is None:
        value_weight_decay = weight_decay if "values" in decayed else 0.0
    role_lr = {"default": lr, "no_decay": lr, VALUE_ROLE: lr if value_lr is None else value_lr}

    def wd_of(kind: str) -> float:
        if kind == "matrix":
            return weight_decay
        if kind == "values":
            return value_weight_decay
        return weight_decay if kind in decayed else 0.0

    # (role, weight decay, fixed lr or None) -> parameters and their kinds; shared parameters once
    buckets: dict[tuple[str, float, float | None], tuple[list[nn.Parameter], set[str]]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            role = param_role(p)
            if role not in role_lr:
                raise ConfigError(f"build_param_groups: parameter role {role!r} is not allowed: must be "
                                  f"one of {sorted(role_lr)}")
            kind = param_kind(module, attr, p)
            fixed = fixed_lr(p) if role == VALUE_ROLE else None
            params, kinds = buckets.setdefault((role, wd_of(kind), fixed), ([], set()))
            params.append(p)
            kinds.add(kind)
    order = {"default": 0, "no_decay": 1, VALUE_ROLE: 2}
    groups = []
    for (role, wd, fixed), (params, kinds) in sorted(
            buckets.items(), key=lambda kv: (order[kv[0][0]], kv[0][2] is not None, -kv[0][1])):
        group_lr = role_lr[role] if fixed is None else float(fixed)
        groups.append({"params": params, "lr": group_lr, "base_lr": group_lr, "weight_decay": wd,
                       "lr_role": role if fixed is None else FIXED_VALUE_ROLE,
                       "param_kinds": tuple(sorted(kinds))})
    return groups


def apply_value_lr(optimizer: Optimizer, schedule: ValueLRSchedule | None, step: int,
                   lr_scale: float = 1.0) -> None:
    """Set every group's lr to ``base_lr * lr_scale``, times ``schedule.factor(step)`` for the
    memory-value groups (``lr_role == "memory_values"``). ``lr_scale`` carries the global
    warmup/cosine factor; ``schedule=None`` means factor 1. Fixed-lr value groups
    (``lr_role == "memory_values_fixed_lr"``, Memory+) stay at their ``base_lr``."""
    check_float("apply_value_lr", "lr_scale", lr_scale, min_value=0.0)
    value_factor = 1.0 if schedule is None else schedule.factor(step)
    for i, group in enumerate(optimizer.param_groups):
        if "base_lr" not in group:
            raise ValueError(f"apply_value_lr: optimizer.param_groups[{i}] has no 'base_lr'; build the "
                             "optimizer from labcore.lm.optim.build_param_groups(...)")
        if group.get("lr_role") == FIXED_VALUE_ROLE:                   # constant: no schedule at all
            group["lr"] = group["base_lr"]
            continue
        factor = value_factor if group.get("lr_role") == VALUE_ROLE else 1.0
        group["lr"] = group["base_lr"] * lr_scale * factor


def refresh_all(model: nn.Module) -> int:
    """Call ``refresh_retrieval()`` on every submodule of ``model`` (itself included) that defines
    it; return how many were refreshed.

    A module that defines it *and* contains other modules that define it (e.g. an LM whose
    ``refresh_retrieval`` delegates to its layers via this function) is treated as a container
    and skipped, so each layer is refreshed exactly once and delegation cannot recurse.
    """
    refreshable = [m for m in model.modules() if callable(getattr(m, "refresh_retrieval", None))]
    count = 0
    for m in refreshable:
        is_container = any(other is not m and callable(getattr(other, "refresh_retrieval", None))
                           for other in m.modules())
        if not is_container:
            m.refresh_retrieval()
            count += 1
    return count
