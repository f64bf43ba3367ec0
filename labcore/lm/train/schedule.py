"""Learning rates per optimiser step: linear warmup then cosine, times the memory-value factor.

::

    lr_s      = lr * (s + 1) / W                                          s < W (linear warmup)
              = lr * (r + (1 - r) * 0.5 * (1 + cos(pi * p)))             p = (s - W) / (S - 1 - W)   (cosine to r * lr)
    lr_values = lr_s * (1 + (M - 1) * max(0, 1 - s / T_v))               value-LR decay (docs/mechanisms.md §1.6)

(s the 0-based step, W warmup_steps, S steps, r min_lr_ratio, M value_lr_multiplier, T_v
value_lr_end_step; :class:`~labcore.lm.optim.ValueLRSchedule` holds the value factor.)
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

from labcore.lm.optim import ValueLRSchedule, apply_value_lr
from labcore.lm.train.config import TrainConfig


def lr_at(cfg: TrainConfig, s: int) -> float:
    """Learning rate of optimiser step ``s`` (0-based): linear warmup then cosine to r * lr."""
    if s < cfg.warmup_steps:
        return cfg.lr * (s + 1) / cfg.warmup_steps
    span = cfg.steps - 1 - cfg.warmup_steps
    p = min(1.0, (s - cfg.warmup_steps) / span) if span > 0 else 0.0  # a lone step runs at the peak
    r = cfg.min_lr_ratio
    return cfg.lr * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p)))


def value_lr_schedule(cfg: TrainConfig) -> ValueLRSchedule:
    """The memory-value learning-rate factor of ``cfg``: M at step 0, 1 from step T_v on."""
    return ValueLRSchedule(multiplier=cfg.value_lr_multiplier, end_step=cfg.value_lr_end_step or cfg.steps)


def set_step_lr(optimizer: Optimizer, cfg: TrainConfig, schedule: ValueLRSchedule, s: int) -> float:
    """Set every group's lr for step ``s``: ``base_lr * lr_at(s) / lr``, times the value factor for
    the memory-value groups (``labcore.lm.optim.apply_value_lr``). Returns the base lr of the step."""
    lr = lr_at(cfg, s)
    apply_value_lr(optimizer, schedule, s, lr_scale=lr / cfg.lr)
    return lr
