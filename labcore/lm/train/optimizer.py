"""The optimiser of a run: AdamW over the parameter groups of :mod:`labcore.lm.optim`.

Parameter groups come from the layers' role tags (``build_param_groups``): matrices decayed, norm
gains / keys / cores / values decayed only as ``TrainConfig.weight_decay_kinds`` says ("default":
not; "release": all, as the UltraMem release), memory value tables in their own group whose learning
rate the schedule multiplies by the value-LR factor (:mod:`labcore.lm.train.schedule`); Memory+
value tables with a fixed lr stay at it. With ``optimizer="lazy_adamw"`` the value-table groups are
updated lazily, only on the rows a step touched (:class:`labcore.lm.sparse_optim.LazyAdamW`), every
other group exactly as torch's AdamW.
"""

from __future__ import annotations

import torch
from torch import nn

from labcore.lm.optim import FIXED_VALUE_ROLE, VALUE_ROLE, build_param_groups
from labcore.lm.sparse_optim import LazyAdamW, mark_lazy
from labcore.lm.train.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``labcore.lm.optim.build_param_groups`` (roles: default / no_decay / memory_values,
    weight decay by kind per ``cfg.weight_decay_kinds``);
    RuntimeError if the groups miss a trainable parameter."""
    groups = build_param_groups(model, cfg.lr, cfg.weight_decay, decay=cfg.weight_decay_kinds)
    n_opt = sum(p.numel() for g in groups for p in g["params"])
    n_all = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_opt != n_all:
        raise RuntimeError(f"build_param_groups covers {n_opt} parameters, the model has {n_all} trainable")
    if cfg.optimizer == "lazy_adamw":
        return LazyAdamW(mark_lazy(groups, (VALUE_ROLE, FIXED_VALUE_ROLE)), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                         bias_correction=cfg.lazy_bias_correction, fused=device.type == "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda")
