"""Sparse-layer diagnostics of an evaluation window, read from the layers' ``LayerAux`` records only.

:func:`sparse_metrics` turns the records a model returned over the evaluation batches into flat
``"<layer>/<metric>"`` numbers (coverage, KL to uniform use, MoE load balance, mean stats, aux
losses) for ``history.jsonl``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from labcore.layers.base import LayerAux

SUMMED_STATS = ("dropped_tokens",)


def sparse_metrics(records: Mapping[str, Sequence[LayerAux]], max_listed_slots: int = 128) -> dict[str, Any]:
    """Per sparse layer, from its ``LayerAux`` records over an evaluation window.

    With the hits per slot summed over the window, ``c_i`` (experts or value slots, i = 1..n) and
    ``p_i = c_i / sum c``:

        coverage            = |{i : c_i > 0}| / n             fraction of slots used at least once
        kl_uniform          = sum_i p_i log(p_i * n)          KL(usage || uniform), nats; 0 = even use
        load_max_over_mean  = max_i c_i / mean_i c_i          MoE imbalance (1 = perfect balance)
        load                = [c_1, ..., c_n]                  listed when n <= max_listed_slots (experts)
        tokens              = number of tokens seen

    and the mean over records of every ``stats`` entry (``top1_score``, ``output_std``, ``lambda1``,
    ``lambda2`` ...) except ``dropped_tokens``, which is summed (and also given as
    ``dropped_fraction`` of the tokens), plus the mean of each named aux loss ``loss_<name>``.
    A stats entry named like a window metric (a layer's own per-call ``coverage``) is kept as
    ``<metric>_per_batch``: coverage over the whole window is the number that shows collapse.
    When ``stats`` has no ``top1_score`` but ``scores`` exist, ``top1_score`` is the mean over
    tokens of the largest selected score. Keys are ``"<layer>/<metric>"``.
    """
    out: dict[str, Any] = {}
    for name, recs in records.items():
        recs = [r for r in recs if r is not None]
        if not recs:
            continue
        n_tok = sum(int(r.indices.shape[0]) for r in recs if r.indices is not None)
        counts = [r.counts for r in recs if r.counts is not None]
        if counts:
            c = torch.stack([x.detach().to("cpu", torch.float64) for x in counts]).sum(0)  # (n_slots,)
            n = c.numel()
            total = float(c.sum())
            out[f"{name}/coverage"] = float((c > 0).double().mean())
            if total > 0:
                p = c / total
                nz = p > 0
                out[f"{name}/kl_uniform"] = float((p[nz] * torch.log(p[nz] * n)).sum())
                out[f"{name}/load_max_over_mean"] = float(c.max() / c.mean())
            if n <= max_listed_slots:
                out[f"{name}/load"] = [int(v) for v in c.tolist()]
        if n_tok:
            out[f"{name}/tokens"] = n_tok
        keys = sorted({k for r in recs for k in r.stats})
        for k in keys:
            vals = [float(r.stats[k]) for r in recs if k in r.stats]
            if f"{name}/{k}" in out:  # a layer's per-call value of a window metric (coverage, ...)
                out[f"{name}/{k}_per_batch"] = float(np.mean(vals))
            elif k in SUMMED_STATS:
                out[f"{name}/{k}"] = float(sum(vals))
                if n_tok:
                    out[f"{name}/dropped_fraction"] = float(sum(vals)) / n_tok
            else:
                out[f"{name}/{k}"] = float(np.mean(vals))
        if "top1_score" not in keys:
            tops = [r.scores.detach().float().max(dim=-1).values for r in recs if r.scores is not None
                    and r.scores.numel()]
            if tops:
                out[f"{name}/top1_score"] = float(torch.cat(tops).mean())
        for k in sorted({k for r in recs for k in r.losses}):
            out[f"{name}/loss_{k}"] = float(np.mean([float(r.losses[k]) for r in recs if k in r.losses]))
    return out
