"""The experiment loop shared by the ablation notebooks: variants x seeds -> one tidy table.

An ablation is a list of :class:`Variant` (a name and a :class:`~labcore.lm.model.ModelConfig`, plus
optional training overrides such as the value-LR multiplier) trained on the same data with the same
:class:`~labcore.lm.train.TrainConfig` for several seeds. :func:`run_variants` trains each (variant,
seed), evaluates it, adds its static budget (parameters, FLOPs per token) and returns one row per
(variant, seed). Statistics are computed from that table only:

- :func:`summarize`: per variant, mean, standard deviation and a 95% confidence interval of the
  mean (Student t, n - 1 degrees of freedom) of each metric;
- :func:`paired_deltas`: per variant, the difference to a baseline variant *paired by seed* (same
  data order and same init seed), with its 95% CI and a plain verdict: an effect whose CI contains
  0 is "inside seed noise" at this scale.

Everything a notebook shows comes from these tables, and everything written goes through a
:class:`~labcore.results.RunDir` (history.jsonl, summary.parquet, figures).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from labcore.data.knowledge import KnowledgeConfig
from labcore.layers.base import ConfigError
from labcore.lm.budget import model_budget
from labcore.lm.model import ModelConfig
from labcore.lm.train import TrainConfig, train

# Metrics every run reports (when they exist): final validation loss, knowledge recall.
CORE_METRICS = ("val_loss", "recall_qa", "recall_bio")


@dataclass(frozen=True)
class Variant:
    """One arm of an ablation: ``name`` (unique in the ablation), the model, and TrainConfig fields
    that differ from the shared training config (e.g. ``{"value_lr_multiplier": 1.0}``). ``tags``
    are extra columns for the result table (e.g. ``{"rank": 2}``)."""

    name: str
    model: ModelConfig
    train_overrides: Mapping[str, Any] = field(default_factory=dict)
    tags: Mapping[str, Any] = field(default_factory=dict)


def knowledge_data(n_people: int, seed: int = 0, bios_per_person: int = 4) -> KnowledgeConfig:
    """The lab's default task: the synthetic knowledge base (see labcore.data.knowledge)."""
    return KnowledgeConfig(n_people=n_people, bios_per_person=bios_per_person, seed=seed)


def seeds_from(seed: int, n_seeds: int) -> list[int]:
    """``n_seeds`` consecutive seeds starting at ``seed``."""
    if n_seeds < 1:
        raise ConfigError(f"n_seeds={n_seeds!r} is not allowed: must be an integer >= 1")
    return [seed + i for i in range(n_seeds)]


def _scalar_metrics(final: Mapping[str, Any]) -> dict[str, float]:
    """Numbers only (lists such as per-expert load stay in history.jsonl)."""
    out = {}
    for k, v in final.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, int | float) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def memory_metric(row: Mapping[str, Any], metric: str, how: str = "mean") -> float:
    """Aggregate a per-layer sparse metric (keys ``"<layer>/<metric>"``) over layers; NaN if absent."""
    vals = [float(v) for k, v in row.items() if k.endswith("/" + metric) and isinstance(v, int | float)
            and not isinstance(v, bool)]
    if not vals:
        return float("nan")
    return float(np.mean(vals) if how == "mean" else np.sum(vals))


def run_variants(variants: Sequence[Variant], seeds: Sequence[int], data: Any, train_cfg: TrainConfig,
                 workdir: str | Path, *, log: Callable[[dict[str, Any]], None] | None = None,
                 context_len: int | None = None,
                 extra_metrics: Callable[[Variant, Any], Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """Train every (variant, seed) and return one row per pair.

    Columns: ``variant``, ``seed``, the variant's tags, every scalar final metric of the run
    (``val_loss``, ``val_ppl``, ``recall_qa``, ``recall_bio``, ``<layer>/coverage``, ...), the
    memory aggregates ``coverage``, ``kl_uniform``, ``top1_score`` (mean over memory layers), the
    budget (``total_params``, ``active_params``, ``flops_per_token``), ``train_seconds`` and
    ``tokens_per_s``. ``log`` receives every training/eval history row tagged with variant and seed
    (pass ``RunDir.log``). ``extra_metrics(variant, train_result)`` adds columns (e.g. search recall).
    Training runs live under ``workdir/<variant>/seed-<s>/`` (checkpoints only at the end).
    """
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"variants: names must be unique, got {names}")
    if not seeds:
        raise ConfigError("seeds=[] is not allowed: must list at least one seed")
    rows: list[dict[str, Any]] = []
    for v in variants:
        budget = model_budget(v.model, context_len=context_len or train_cfg.seq_len).row()
        for s in seeds:
            cfg = dataclasses.replace(train_cfg, seed=int(s), **dict(v.train_overrides))
            t0 = time.perf_counter()

            def _cb(step: int, row: dict[str, Any], _v: Variant = v, _s: int = s) -> None:
                if log is not None:
                    log({"variant": _v.name, "seed": _s, **{k: x for k, x in row.items()
                                                              if not isinstance(x, list)}})

            res = train(v.model, cfg, data, Path(workdir) / v.name / f"seed-{s}", callbacks=[_cb],
                        resume=False)
            seconds = time.perf_counter() - t0
            final = _scalar_metrics(res.final)
            if log is not None:
                log({"variant": v.name, "seed": s, "kind": "final", **final})
            row = {"variant": v.name, "seed": int(s), **dict(v.tags), **final}
            for m in ("coverage", "kl_uniform", "top1_score", "output_std", "lambda1", "lambda2"):
                row[m] = memory_metric(final, m)
            row.update(budget)
            row["train_seconds"] = seconds
            row["tokens_per_s"] = cfg.tokens_per_step * cfg.steps / max(seconds, 1e-9)
            if extra_metrics is not None:
                row.update(extra_metrics(v, res))
            rows.append(row)
            del res
    return pd.DataFrame(rows)


def _t_quantile_975(dof: int) -> float:
    """Two-sided 95% Student-t quantile (exact table for small dof, normal limit beyond)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
             9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
    if dof < 1:
        return float("nan")
    if dof in table:
        return table[dof]
    keys = sorted(table)
    for lo, hi in zip(keys, keys[1:]):
        if lo < dof < hi:  # interpolate in 1/dof, accurate to ~1e-3
            w = (1 / dof - 1 / hi) / (1 / lo - 1 / hi)
            return table[hi] + w * (table[lo] - table[hi])
    return 1.96 + 2.4 / dof  # dof > 30


def mean_ci(values: Sequence[float]) -> tuple[float, float, float, int]:
    """(mean, std, 95% CI half-width of the mean, n) of finite values; NaNs where undefined."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(x.mean())
    if n == 1:
        return mean, float("nan"), float("nan"), 1
    std = float(x.std(ddof=1))
    return mean, std, _t_quantile_975(n - 1) * std / math.sqrt(n), n


def summarize(df: pd.DataFrame, metrics: Sequence[str], by: str | Sequence[str] = "variant") -> pd.DataFrame:
    """Per group: ``n`` (rows in the group) and, for each metric, ``<metric>_mean``, ``_std``,
    ``_ci95`` (half-width) and ``_n`` (finite values), in the order the groups first appear."""
    by = [by] if isinstance(by, str) else list(by)
    missing = [m for m in list(metrics) + by if m not in df.columns]
    if missing:
        raise KeyError(f"summarize: columns {missing} not in the table (have {list(df.columns)})")
    out = []
    for key, g in df.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        row["n"] = len(g)  # rows (seeds) in the group; a metric's own count is <metric>_n
        for m in metrics:
            mean, std, ci, n = mean_ci(g[m].tolist())
            row.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_ci95": ci, f"{m}_n": n})
        out.append(row)
    return pd.DataFrame(out)


def paired_deltas(df: pd.DataFrame, metric: str, baseline: str | None = None, *, chain: bool = False,
                  order: Sequence[str] | None = None) -> pd.DataFrame:
    """Differences of ``metric`` between variants, paired by seed.

    ``baseline``: compare every variant with this one. ``chain=True``: compare each variant with the
    previous one in ``order`` (Table 2 style, each row adds one change). Columns: ``variant``,
    ``reference``, ``delta_mean``, ``delta_ci95``, ``n`` and ``verdict`` ("inside seed noise" when the
    CI contains 0, else "better"/"worse" for a loss-like metric read as lower = better).
    """
    order = list(order) if order is not None else list(dict.fromkeys(df["variant"]))
    if not chain and baseline not in order:
        raise KeyError(f"paired_deltas: baseline={baseline!r} is not one of the variants {order}")
    wide = df.pivot_table(index="seed", columns="variant", values=metric, aggfunc="mean")
    rows = []
    for i, v in enumerate(order):
        ref = order[i - 1] if chain else baseline
        if v == ref or (chain and i == 0):
            continue
        d = (wide[v] - wide[ref]).dropna().tolist()
        mean, _, ci, n = mean_ci(d)
        if n < 2 or not np.isfinite(ci):
            verdict = "too few seeds"
        elif abs(mean) <= ci:
            verdict = "inside seed noise"
        else:
            verdict = "lower" if mean < 0 else "higher"
        rows.append({"variant": v, "reference": ref, "metric": metric, "delta_mean": mean,
                     "delta_ci95": ci, "n": n, "verdict": verdict})
    return pd.DataFrame(rows)


def describe_device() -> str:
    return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"


def describe_deltas(deltas: pd.DataFrame, unit: str = "nats") -> str:
    """Plain-language reading of a :func:`paired_deltas` table, one line per variant, including the
    paper's number when the table has a ``paper_delta`` column."""
    lines = []
    for r in deltas.itertuples(index=False):
        paper = getattr(r, "paper_delta", None)
        paper_txt = "" if paper is None or not np.isfinite(paper) else f"; paper {paper:+.3f}"
        ci = "n/a" if not np.isfinite(r.delta_ci95) else f"± {r.delta_ci95:.3f}"
        lines.append(f"{r.variant} vs {r.reference}: Δ{r.metric} = {r.delta_mean:+.4f} {ci} {unit} "
                     f"(95% CI, n={r.n} seeds) -> {r.verdict}{paper_txt}")
    return "\n".join(lines)
