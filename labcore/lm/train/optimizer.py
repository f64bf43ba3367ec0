"""The optimiser of a run: AdamW over the parameter groups of :mod:`labcore.lm.optim`.

Parameter groups come from the layers' role tags (``build_param_groups``): matrices decayed, norm
gains / keys / cores / values decayed only as ``TrainConfig.weight_decay_kinds`` says ("default":
not; "release": all, as the UltraMem release), memory value tables in their own group whose learning
rate the schedule multiplies by the value-LR factor (:mod:`labcore.lm.train.schedule`); Memory+
value tables with a fixed lr stay at it. With ``optimizer="lazy_adamw"`` the value-table groups are
updated lazily, only on the rows a step touched (:class:`labcore.lm.sparse_optim.LazyAdamW`), every
other group exactly as torch's AdamW, and the PKM / UltraMem layers hand their value tables sparse
gradients (``labcore.layers.base.set_sparse_value_grads``; the rows a step read, as the PKM authors'
``--mem_sparse``), so the optimiser does not scan a dense table gradient for the touched rows.
"""

from __future__ import annotations

import torch
from torch import nn

from labcore.layers.base import set_sparse_value_grads
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
    # lazy: the value tables' gradients as sparse COO tensors over the rows read (XLM's --mem_sparse)
    set_sparse_value_grads(model, cfg.optimizer == "lazy_adamw")
    if cfg.optimizer == "lazy_adamw":
        return LazyAdamW(mark_lazy(groups, (VALUE_ROLE, FIXED_VALUE_ROLE)), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                         bias_correction=cfg.lazy_bias_correction, fused=device.type == "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda")
