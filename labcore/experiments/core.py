"""The experiment loop shared by the ablation notebooks: variants x seeds -> one tidy table.

An ablation is a list of :class:`Variant` (a name and a :class:`~labcore.lm.model.ModelConfig`, plus
optional training overrides such as the value-LR multiplier) trained on the same data with the same
:class:`~labcore.lm.train.TrainConfig` for several seeds. :func:`run_variants` trains each (variant,
seed), evaluates it, adds its static budget (parameters, FLOPs per token) and returns one row per
(variant, seed). Statistics are computed from that table only:

- :func:`summarize`: per variant, mean, standard deviation and a 95% confidence interval of the
  mean (Student t, n - 1 degrees of freedom) of each metric;
- :func:`paired_deltas`: per variant, the difference to a baseline variant (or, chained, to the
  previous variant) *paired by seed* (same data order and same init seed), with its 95% CI, the
  design's resolution (the smallest effect 80% power would detect at this n and seed noise), the
  seeds needed to resolve the paper's delta, Holm-adjusted p-values over the family of rows and a
  verdict (:mod:`labcore.experiments.stats`): an effect not resolved is "inside seed noise" at
  this scale, or "not resolvable at this n" when the paper's delta is below the resolution.

The ablation notebooks train on the **facts task** (:mod:`labcore.data.facts`: (subject,
relation) -> object, one answer token, ``log2 n_objects`` bits per fact), where a small dense
trunk cannot store every fact at equal activated FLOPs and a memory layer can: when ``data`` is a
:class:`~labcore.data.facts.FactsConfig`, each run is :func:`labcore.experiments.facts_pilot.train_facts`
(loss on the answer token only) and its row holds ``answer_accuracy``, ``answer_loss``,
``stored_kbit`` and ``bits_per_param`` on the fixed evaluation set (every stored fact). Before
training, every memory's value table is rescaled so that its output std at step 0 equals the
trunk's mean FFN output std (:func:`labcore.lm.calibrate.calibrate_memory_init`, the lab's default;
``Variant.calibrate=False`` or ``run_variants(calibrate=False)`` turns it off) and the row records
the step-0 stds before and after (``init_std_before``, ``init_std``, ``init_target``), so no arm is
louder than another for reasons unrelated to its mechanism. Any other ``data`` (the knowledge-base
text task) trains with :func:`labcore.lm.train.train`.

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

from labcore.config import ConfigError
from labcore.data.facts import FactsConfig, inputs_targets
from labcore.data.knowledge import KnowledgeConfig
from labcore.experiments import stats
from labcore.lm.budget import model_budget
from labcore.lm.model import ModelConfig
from labcore.lm.train import TrainConfig, train

# Metrics every run reports (when they exist): final validation loss, knowledge recall.
CORE_METRICS = ("val_loss", "recall_qa", "recall_bio")
# What a facts run reports (answer token only, on every stored fact).
FACTS_METRICS = ("answer_accuracy", "answer_loss", "stored_kbit")
# Memory diagnostics aggregated over memory layers (mean), from the layers' aux records.
MEMORY_DIAGNOSTICS = ("coverage", "kl_uniform", "top1_score", "output_std", "lambda1", "lambda2")


@dataclass(frozen=True)
class Variant:
    """One arm of an ablation: ``name`` (unique in the ablation), the model, and TrainConfig fields
    that differ from the shared training config (e.g. ``{"value_lr_multiplier": 1.0}``). ``tags``
    are extra columns for the result table (e.g. ``{"rank": 2}``)."""

    name: str
    model: ModelConfig
    train_overrides: Mapping[str, Any] = field(default_factory=dict)
    tags: Mapping[str, Any] = field(default_factory=dict)
    calibrate: bool | None = None  # facts runs: calibrate the memory init (None: run_variants' default)


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
                 extra_metrics: Callable[[Variant, Any], Mapping[str, Any]] | None = None,
                 calibrate: bool = True, init_target: float | None = None) -> pd.DataFrame:
    """Train every (variant, seed) and return one row per pair.

    Columns: ``variant``, ``seed``, the variant's tags, every scalar final metric of the run
    (``val_loss``, ``val_ppl``, ``recall_qa``, ``recall_bio``, ``<layer>/coverage``, ...), the
    memory aggregates ``coverage``, ``kl_uniform``, ``top1_score`` (mean over memory layers), the
    budget (``total_params``, ``active_params``, ``flops_per_token``), ``train_seconds`` and
    ``tokens_per_s``. ``log`` receives every training/eval history row tagged with variant and seed
    (pass ``RunDir.log``). ``extra_metrics(variant, train_result)`` adds columns (e.g. search recall).
    Training runs live under ``workdir/<variant>/seed-<s>/`` (checkpoints only at the end; inside
    :func:`labcore.experiments.common.lab_run` they are deleted once the whole run has finished,
    unless ``keep_checkpoints``).

    With ``data`` a :class:`~labcore.data.facts.FactsConfig` the run is :func:`facts_cell` instead
    (no files under ``workdir``): columns ``answer_accuracy``, ``answer_loss``, ``stored_kbit``,
    ``bits_per_param``, the step-0 output stds (``init_std_before``, ``init_std``, ``init_target``;
    NaN for a model without memory), the memory diagnostics on the evaluation set, the budget,
    ``n_values``, ``reads_per_token``, ``train_seconds``. ``calibrate`` / ``init_target``: see
    :func:`facts_cell` (a variant's own ``calibrate`` wins). ``extra_metrics`` then receives the
    :class:`~labcore.experiments.facts_pilot.FactsRun`.
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
            if isinstance(data, FactsConfig):
                rows.append(facts_cell(v, cfg, data, calibrate=calibrate, init_target=init_target, log=log,
                                       extra_metrics=extra_metrics))
                continue
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


def _memory_diagnostics(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Per-layer sparse metrics (``"<layer>/coverage"``, ...) of one eval-mode forward on ``x`` and
    their means over memory layers (:data:`MEMORY_DIAGNOSTICS`)."""
    from labcore.lm.train.metrics import sparse_metrics

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was)
    per_layer = _scalar_metrics(sparse_metrics({k: [a] for k, a in out.aux.items() if a is not None}))
    return {**per_layer, **{m: memory_metric(per_layer, m) for m in MEMORY_DIAGNOSTICS}}


def facts_cell(v: Variant, train_cfg: TrainConfig, facts: FactsConfig, *, calibrate: bool = True,
               init_target: float | None = None, log: Callable[[dict[str, Any]], None] | None = None,
               extra_metrics: Callable[[Variant, Any], Mapping[str, Any]] | None = None,
               calib_rows: int = 256) -> dict[str, Any]:
    """Train one (variant, seed) on the facts task and return its row (see :func:`run_variants`).

    The model is built with ``torch.manual_seed(train_cfg.seed)``. Step 0: the output std of every
    memory and FFN is measured on a fixed batch (the first ``calib_rows`` stored facts, the same
    for every variant and seed); with ``calibrate`` every memory's value table is first rescaled so
    that its output std equals ``init_target`` (default: the mean FFN output std of this model,
    :func:`labcore.lm.calibrate.calibrate_memory_init`). Then :func:`train_facts` trains on the
    answer tokens; the row's metrics come from its final evaluation on every stored fact and the
    memory diagnostics from one eval-mode forward on the calibration batch. ``v.calibrate``, when
    set, wins over ``calibrate``."""
    from labcore.data.cache import load_dataset
    from labcore.experiments.facts_pilot import memory_reads, train_facts
    from labcore.lm.calibrate import calibrate_memory_init, output_stds
    from labcore.lm.model import LM

    torch.manual_seed(train_cfg.seed)
    model = LM(v.model)
    fs = load_dataset(facts, False).extras["facts"]
    ev = fs.eval_set("stored")
    x0, _ = inputs_targets(ev.tokens[:calib_rows], ev.answer_mask[:calib_rows])  # (calib_rows, row_len - 1)
    init: dict[str, float] = {"init_std_before": float("nan"), "init_std": float("nan"),
                              "init_target": float("nan")}
    if v.calibrate is not None:
        calibrate = v.calibrate
    if any(True for _ in model.memory_layers()):
        if calibrate:
            c = calibrate_memory_init(model, x0, init_target)
            before = [r["std_before"] for r in c.rows]
            after = [r["std_after"] for r in c.rows]
            init["init_target"] = float(c.target)
        else:
            ffn, mem = output_stds(model, x0)
            before = after = list(mem.values())
            init["init_target"] = float(np.mean(list(ffn.values()))) if ffn else float("nan")
        init["init_std_before"] = float(np.mean(before))
        init["init_std"] = float(np.mean(after))

    def tagged(row: dict[str, Any]) -> None:
        if log is not None:
            log({"variant": v.name, "seed": int(train_cfg.seed),
                 **{k: x for k, x in row.items() if not isinstance(x, list)}})

    run = train_facts(model, facts, train_cfg, log_every=max(1, train_cfg.steps // 8),
                      eval_every=train_cfg.eval_every, log=tagged)
    f = run.final
    ctx = facts.row_len - 1
    n_values, reads = memory_reads(v.model)
    row: dict[str, Any] = {"variant": v.name, "seed": int(train_cfg.seed), **dict(v.tags),
                           "answer_accuracy": f["answer_accuracy"], "answer_loss": f["answer_loss"],
                           "stored_kbit": f["stored_bits"] / 1e3, "bits_per_param": f["bits_per_param"],
                           **init, **_memory_diagnostics(run.model, x0.to(next(run.model.parameters()).device)),
                           **model_budget(v.model, context_len=ctx).row(),
                           "n_values": n_values, "reads_per_token": reads,
                           "exposures_per_fact": train_cfg.steps * train_cfg.batch_size / facts.n_facts,
                           "train_seconds": run.seconds,
                           "tokens_per_s": train_cfg.steps * train_cfg.batch_size * ctx / max(run.seconds, 1e-9)}
    if extra_metrics is not None:
        row.update(extra_metrics(v, run))
    tagged({"kind": "final", **{k: x for k, x in row.items() if isinstance(x, int | float)
                                and not isinstance(x, bool)}})
    return row


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
    return mean, std, stats.t_quantile_975(n - 1) * std / math.sqrt(n), n


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
                  order: Sequence[str] | None = None, paper: Mapping[str, float] | None = None,
                  higher_is_better: bool = False) -> pd.DataFrame:
    """Differences of ``metric`` between variants, paired by seed (:func:`labcore.experiments.stats.compare`).

    ``baseline``: compare every variant with this one. ``chain=True``: compare each variant with the
    previous one in ``order`` (Table 2 style, each row adds one change). The rows form one family:
    their p-values are Holm-adjusted (``p_holm``). ``paper[variant]``: the paper's delta for that
    row (same sign convention, variant - reference), the effect the design should resolve.

    Columns: ``variant``, ``reference``, ``metric``, ``n`` (seeds), ``delta_mean``, ``delta_ci95``
    (half-width of the 95% t-interval), ``ci_low``, ``ci_high``, ``sd`` (of the paired differences),
    ``p_value``, ``p_holm``, ``resolution`` (the smallest |delta| detected with 80% power at this n
    and sd), ``paper_delta`` and ``seeds_needed`` (to resolve the paper's delta; NaN without one)
    and ``verdict`` (:func:`labcore.experiments.stats.verdict`: "resolved: ...", "inside seed noise
    (resolution ...)" or "not resolvable at this n: ..."), and ``higher_is_better`` (the direction the
    verdict reads, kept so that a later refresh of the paper columns reads it the same way).
    """
    out = stats.compare(df, metric, baseline=baseline, chain=chain, order=order,
                        higher_is_better=higher_is_better, delta_of_interest=None)
    out["delta_ci95"] = (out["ci_high"] - out["ci_low"]) / 2
    out = out.drop(columns=["delta_of_interest", "seeds_needed"])
    cols = ["variant", "reference", "metric", "n", "delta_mean", "delta_ci95", "ci_low", "ci_high", "sd",
            "p_value", "p_holm", "resolution", "verdict"]
    out = out[cols].assign(higher_is_better=bool(higher_is_better))
    return with_paper_deltas(out, paper or {}, higher_is_better=higher_is_better)


def with_paper_deltas(deltas: pd.DataFrame, paper: Mapping[str, float], *,
                      higher_is_better: bool = False) -> pd.DataFrame:
    """A copy of a :func:`paired_deltas` table with ``paper_delta`` (``paper[variant]``, NaN where
    the paper has none), ``seeds_needed`` (seeds that would resolve the paper's delta with 80% power
    at the measured paired sd) and the verdict recomputed against the paper's delta."""
    out = deltas.copy()
    out["paper_delta"] = [float(paper[v]) if v in paper and paper[v] is not None else float("nan")
                          for v in out["variant"]]
    return _resolve_paper(out, higher_is_better=higher_is_better)


def _resolve_paper(deltas: pd.DataFrame, *, higher_is_better: bool = False) -> pd.DataFrame:
    """Fill ``seeds_needed`` and ``verdict`` of a deltas table from its ``paper_delta`` column. A
    row's own ``higher_is_better`` (written by :func:`paired_deltas`) wins over the argument."""
    needed, verdicts = [], []
    for r in deltas.to_dict("records"):
        hib = r.get("higher_is_better")
        hib = bool(hib) if hib is not None and not pd.isna(hib) else higher_is_better
        target = r.get("paper_delta")
        target = float(target) if target is not None and np.isfinite(target) and target != 0 else None
        sd, n = float(r["sd"]), int(r["n"])
        ok = n >= 2 and math.isfinite(sd)
        needed.append(stats.seeds_needed(target, sd) if target is not None and ok else None)
        diff = stats.PairedDifference(n, float(r["delta_mean"]), sd, float(r["ci_low"]), float(r["ci_high"]),
                                      float(r["p_value"]))
        ph = r.get("p_holm")
        verdicts.append(stats.verdict(diff, name=str(r["variant"]), reference=str(r["reference"]),
                                      higher_is_better=hib,
                                      p_adjusted=float(ph) if ph is not None and np.isfinite(ph) else None,
                                      delta_of_interest=target))
    deltas["seeds_needed"] = [float("nan") if x is None else float(x) for x in needed]
    deltas["verdict"] = verdicts
    return deltas


def refresh_paper_columns(table: pd.DataFrame) -> pd.DataFrame:
    """For a :func:`paired_deltas` table whose ``paper_delta`` column was set afterwards (e.g.
    ``deltas["paper_delta"] = deltas["variant"].map(PAPER)``): recompute ``seeds_needed`` and the
    verdict against it. Any other table is returned unchanged."""
    needed = {"variant", "reference", "n", "delta_mean", "sd", "ci_low", "ci_high", "p_value", "paper_delta"}
    if not needed <= set(table.columns):
        return table
    return _resolve_paper(table.copy())


def describe_device() -> str:
    return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"


def describe_deltas(deltas: pd.DataFrame, unit: str = "nats") -> str:
    """Plain-language reading of a :func:`paired_deltas` table, one line per variant: the delta with
    its 95% interval, the design's resolution, the paper's delta and the seeds that would resolve
    it (where the table has them), and the verdict."""
    lines = []
    for r in deltas.to_dict("records"):
        ci = ("n/a" if not np.isfinite(r.get("ci_low", np.nan))
              else f"95% CI {r['ci_low']:+.4f} .. {r['ci_high']:+.4f}")
        res = r.get("resolution", np.nan)
        res_txt = f"; resolution {res:.4f}" if np.isfinite(res) else ""
        paper = r.get("paper_delta")
        paper_txt = ""
        if paper is not None and not pd.isna(paper):
            need = r.get("seeds_needed")
            need_txt = "" if need is None or pd.isna(need) else f", resolved by ~{int(need)} seeds"
            paper_txt = f"; paper {paper:+.3f}{need_txt}"
        lines.append(f"{r['variant']} vs {r['reference']}: Δ{r['metric']} = {r['delta_mean']:+.4f} {unit} "
                     f"({ci}, n={r['n']} seeds{res_txt}{paper_txt}) -> {r['verdict']}")
    return "\n".join(lines)
