"""Evaluation: validation loss and perplexity, recall metrics and sparse-layer diagnostics.

Every ``eval_every`` steps and at the end, :func:`evaluate` computes on ``eval_batches`` fixed
validation batches the validation loss and perplexity; knowledge recall (bio prompts and held-out
questions) when the data is the knowledge base; associative-recall accuracy for recall data; and,
from the sparse layers' ``LayerAux`` records gathered over those batches,
:func:`~labcore.lm.train.metrics.sparse_metrics`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from labcore.data import Dataset, knowledge_recall
from labcore.data.knowledge import recall_items
from labcore.data.recall import associative_recall_accuracy
from labcore.layers.base import LayerAux
from labcore.lm.train.config import TrainConfig
from labcore.lm.train.device import autocast, autocast_dtype
from labcore.lm.train.metrics import sparse_metrics


def forward_with_aux(model: nn.Module, x: Tensor, y: Tensor | None = None) -> tuple[Any, Tensor]:
    """``model(x, y)`` and its ``aux_loss`` (a zero scalar for a model without one)."""
    out = model(x, y)
    aux_loss = getattr(out, "aux_loss", None)
    return out, (aux_loss if aux_loss is not None else torch.zeros((), device=x.device))


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, cfg: TrainConfig, device: torch.device | None = None) -> dict[str, Any]:
    """Validation loss/perplexity, recall metrics and sparse-layer diagnostics (see module doc)."""
    device = device or next(model.parameters()).device
    amp = autocast_dtype(cfg, device)
    was_training = model.training

    def logits_of(idx: Tensor) -> Tensor:  # (B, T) -> (B, T, V) float32, for the recall scorers
        with autocast(device, amp):
            return forward_with_aux(model, idx)[0].logits.float()

    model.eval()
    try:
        sampler = data.sampler("val", cfg.batch_size, cfg.seq_len, cfg.seed)
        losses: list[float] = []
        records: dict[str, list[LayerAux]] = {}
        for i in range(cfg.eval_batches):
            x, y = sampler.micro_batches(i)[0]
            with autocast(device, amp):
                out, _ = forward_with_aux(model, x.to(device), y.to(device))
            losses.append(float(out.loss))
            for name, rec in (getattr(out, "aux", None) or {}).items():
                records.setdefault(name, []).append(rec)
        val_loss = float(np.mean(losses))
        metrics: dict[str, Any] = {"val_loss": val_loss,
                                   "val_ppl": math.exp(val_loss) if val_loss < 700 else float("inf")}
        metrics.update(sparse_metrics(records))
        max_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
        if data.kb is not None and cfg.recall_max_people > 0:
            for mode, key in (("bio", "recall_bio"), ("question", "recall_qa")):
                items = recall_items(data.kb, mode)
                longest = max(len(it.prompt.encode()) + len(it.answer.encode()) + 1 for it in items)
                if max_len is not None and longest > max_len:
                    metrics[f"{key}_skipped"] = f"prompt+answer up to {longest} tokens > max_seq_len {max_len}"
                    continue
                res = knowledge_recall(logits_of, data.kb, mode=mode, max_people=cfg.recall_max_people,
                                       device=device)
                metrics.update(res.as_metrics(key))
        if data.generator == "recall":
            row_len = data.config.row_len
            if max_len is None or row_len - 1 <= max_len:
                metrics["recall_acc"] = associative_recall_accuracy(logits_of, data, device=device)
    finally:
        model.train(was_training)
    return metrics
