"""The optimiser of a run: AdamW over the parameter groups of :mod:`labcore.lm.optim`.

Parameter groups come from the layers' role tags (``build_param_groups``): matrices decayed, norm
gains / keys / cores not decayed, memory value tables in their own group whose learning rate the
schedule multiplies by the value-LR factor (:mod:`labcore.lm.train.schedule`).
"""

from __future__ import annotations

import torch
from torch import nn

from labcore.lm.optim import build_param_groups
from labcore.lm.train.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``labcore.lm.optim.build_param_groups`` (roles: default / no_decay / memory_values);
    RuntimeError if the groups miss a trainable parameter."""
    groups = build_param_groups(model, cfg.lr, cfg.weight_decay)
    n_opt = sum(p.numel() for g in groups for p in g["params"])
    n_all = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_opt != n_all:
        raise RuntimeError(f"build_param_groups covers {n_opt} parameters, the model has {n_all} trainable")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda")
