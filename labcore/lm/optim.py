"""Optimiser parameter groups by role, the memory-value learning-rate schedule, retrieval refresh.

Parameter roles (``labcore.layers.base.param_role``) decide the groups, never module names:

* ``"default"``: matrices, decayed with ``weight_decay``;
* ``"no_decay"``: norm gains, biases, sub-keys, Tucker cores, any 0/1-dim tensor (weight decay 0);
* ``"memory_values"``: value tables of PKM / UltraMem, their own group with the value learning
  rate (``value_lr``, default ``lr``) and its own weight decay (default 0).

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
from dataclasses import KW_ONLY, dataclass
from typing import Any

from torch import nn
from torch.optim import Optimizer

from labcore.layers.base import ConfigError, check_float, check_int, param_role

VALUE_ROLE = "memory_values"


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


def build_param_groups(model: nn.Module, lr: float, weight_decay: float, value_lr: float | None = None,
                       value_weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Trainable parameters of ``model`` grouped by role, ready for ``torch.optim.AdamW(groups)``.

    Every group has ``params``, ``lr``, ``base_lr`` (the lr before any schedule), ``weight_decay``
    and ``lr_role`` (its role name). Groups without parameters are left out. A parameter shared by
    several modules appears once; frozen parameters (``requires_grad=False``) are left out.
    """
    check_float("build_param_groups", "lr", lr, min_value=0.0, min_inclusive=False)
    check_float("build_param_groups", "weight_decay", weight_decay, min_value=0.0)
    if value_lr is not None:
        check_float("build_param_groups", "value_lr", value_lr, min_value=0.0, min_inclusive=False)
    check_float("build_param_groups", "value_weight_decay", value_weight_decay, min_value=0.0)
    settings = {                                                        # role -> (lr, weight decay)
        "default": (lr, weight_decay),
        "no_decay": (lr, 0.0),
        VALUE_ROLE: (lr if value_lr is None else value_lr, value_weight_decay),
    }
    by_role: dict[str, list[nn.Parameter]] = {role: [] for role in settings}
    for p in model.parameters():                                        # de-duplicated by identity
        if p.requires_grad:
            role = param_role(p)
            if role not in by_role:
                raise ConfigError(f"build_param_groups: parameter role {role!r} is not allowed: must be "
                                  f"one of {sorted(by_role)}")
            by_role[role].append(p)
    groups = []
    for role, params in by_role.items():
        if params:
            group_lr, wd = settings[role]
            groups.append({"params": params, "lr": group_lr, "base_lr": group_lr, "weight_decay": wd,
                           "lr_role": role})
    return groups


def apply_value_lr(optimizer: Optimizer, schedule: ValueLRSchedule | None, step: int,
                   lr_scale: float = 1.0) -> None:
    """Set every group's lr to ``base_lr * lr_scale``, times ``schedule.factor(step)`` for the
    memory-value groups (``lr_role == "memory_values"``). ``lr_scale`` carries the global
    warmup/cosine factor; ``schedule=None`` means factor 1."""
    check_float("apply_value_lr", "lr_scale", lr_scale, min_value=0.0)
    value_factor = 1.0 if schedule is None else schedule.factor(step)
    for i, group in enumerate(optimizer.param_groups):
        if "base_lr" not in group:
            raise ValueError(f"apply_value_lr: optimizer.param_groups[{i}] has no 'base_lr'; build the "
                             "optimizer from labcore.lm.optim.build_param_groups(...)")
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
