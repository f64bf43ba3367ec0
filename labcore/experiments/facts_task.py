"""08_facts_task: the facts task's own property — a dense trunk's stored knowledge against the load.

The facts task (:mod:`labcore.data.facts`) asks a model to store ``n_facts`` random facts
(subject, relation) -> object, each worth ``log2 n_objects`` bits that can only be stored, never
inferred. Knowledge stored (Allen-Zhu & Li, "Physics of Language Models 3.3", arXiv 2404.05405) is

    stored_bits = sum_f max(0, log2 A - ce_f)          ce_f: fact f's answer cross-entropy in bits

(:mod:`labcore.experiments.knowledge_metrics`). A model with P parameters stores at most about
``c * P`` bits, c ~ 2 bits per parameter after ~1000 exposures per fact and ~1 after ~100 (their
capacity laws). So as the load ``n_facts * log2 A`` grows at a fixed number of exposures per fact,
stored bits should first follow the load (accuracy ~100%) and then level off at the trunk's
capacity while the accuracy falls below 100%: the property that makes this task memory-bound.

This module trains every trunk of ``FactsTaskParams.d_models`` (dense, no memory) on every load of
``fact_counts`` with steps scaled to the load (``FactsTaskParams.steps_for``: the same exposures
per fact at every size), through :func:`labcore.experiments.core.run_variants` (one
:func:`~labcore.experiments.core.facts_cell` per (trunk, load, seed): answer-token metrics on every
stored fact). Tables: :func:`summary_table` (per trunk and load, mean and 95% interval over seeds),
:func:`capacity_table` (per trunk: what the largest load stores, in kbit and bits per parameter,
beside the capacity line) and :func:`load_deltas` (stored kbit of each load minus the previous
one, paired by seed: growth below capacity, ~0 on the plateau). :func:`interpret` writes the
run's reading in sentences; :func:`tiny_forward` walks one tiny batch through a dense trunk.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from labcore.config import ConfigError, check_float, check_int
from labcore.data.cache import load_dataset
from labcore.data.facts import FactsConfig, inputs_targets
from labcore.experiments.common import lab_run, save_outputs
from labcore.experiments.core import Variant, paired_deltas, run_variants, summarize
from labcore.experiments.knowledge_metrics import answer_scores, stored_bits
from labcore.experiments.params import FactsTaskParams
from labcore.lm.budget import model_budget
from labcore.lm.model import LM, ModelConfig
from labcore.viz.style import layout

__all__ = ["FactsTaskParams", "NOTEBOOK", "N_RELATIONS", "trunk", "trunk_params", "load_kbit", "capacity_kbit",
           "capacity_facts", "variant_name", "plan", "tiny_forward", "summary_table", "capacity_table",
           "load_deltas", "curves_table", "capacity_figure", "accuracy_figure", "bits_per_param_figure",
           "training_figure", "FactsTaskResult", "run", "interpret"]

NOTEBOOK = "08_facts_task"
N_RELATIONS = 4  # LabParams.data_config: 4 relations per subject
METRICS = ("answer_accuracy", "answer_loss", "stored_kbit", "bits_per_param")


# ----------------------------------------------------------------------------------------------
# Sizes.
# ----------------------------------------------------------------------------------------------


def trunk(P: FactsTaskParams, d_model: int) -> ModelConfig:
    """The dense trunk of width ``d_model`` (``P.n_layers`` blocks, D/16 heads, d_ff 4D, no memory)."""
    check_int("trunk", "d_model", d_model, min_value=16)
    return P.model(d_model=d_model, n_heads=max(1, d_model // 16), d_ff=4 * d_model)


def trunk_params(P: FactsTaskParams, d_model: int) -> int:
    """Total parameters of :func:`trunk` (``labcore.lm.budget.model_budget``)."""
    return int(model_budget(trunk(P, d_model), context_len=P.context_len).total_params)


def load_kbit(n_facts: int, n_objects: int = 128) -> float:
    """The knowledge load of ``n_facts`` facts over ``n_objects`` objects in kbit
    (``FactsConfig.knowledge_bits``: n_facts * log2 n_objects)."""
    check_int("load_kbit", "n_facts", n_facts, min_value=N_RELATIONS)
    if n_facts % N_RELATIONS:
        raise ConfigError(f"load_kbit: n_facts={n_facts} is not allowed: must be a multiple of {N_RELATIONS} "
                          "(4 relations per subject)")
    cfg = FactsConfig(n_subjects=n_facts // N_RELATIONS, n_relations=N_RELATIONS, n_objects=n_objects)
    return cfg.knowledge_bits / 1e3


def capacity_kbit(n_params: int, bits_per_param: float = 2.0) -> float:
    """The capacity line: ``bits_per_param * n_params`` bits, in kbit."""
    check_int("capacity_kbit", "n_params", n_params, min_value=1)
    check_float("capacity_kbit", "bits_per_param", bits_per_param, min_value=0.0, min_inclusive=False)
    return n_params * bits_per_param / 1e3


def capacity_facts(n_params: int, bits_per_param: float = 2.0, n_objects: int = 128) -> int:
    """Facts (``log2 n_objects`` bits each) that fill ``bits_per_param * n_params`` bits (rounded down)."""
    check_int("capacity_facts", "n_objects", n_objects, min_value=2)
    return math.floor(capacity_kbit(n_params, bits_per_param) * 1e3 / math.log2(n_objects))


def variant_name(d_model: int, n_facts: int) -> str:
    """The row name of one (trunk, load) cell, e.g. ``"D=16 1600 facts"``."""
    return f"D={d_model} {n_facts} facts"


def plan(P: FactsTaskParams) -> pd.DataFrame:
    """One row per (trunk, load) of the run at ``P.effective()``: d_model, total_params,
    capacity_kbit (the capacity line), n_facts, load_kbit, steps, exposures_per_fact (steps *
    batch_size / n_facts) and rows (training rows per seed)."""
    E = P.effective()
    rows = []
    for D in E.d_models:
        n_params = trunk_params(E, D)
        for n in E.fact_counts:
            steps = E.steps_for(n)
            rows.append({"d_model": D, "total_params": n_params,
                         "capacity_kbit": capacity_kbit(n_params, E.capacity_bits), "n_facts": n,
                         "load_kbit": load_kbit(n, E.n_objects), "steps": steps,
                         "exposures_per_fact": steps * E.batch_size / n, "rows": steps * E.batch_size})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# The mechanism on one tiny batch.
# ----------------------------------------------------------------------------------------------


def tiny_forward(seed: int = 0, n_subjects: int = 2, n_objects: int = 8, d_model: int = 16) -> pd.DataFrame:
    """One forward pass of an untrained dense trunk on a tiny facts task, step by step.

    Returns a DataFrame (step, tensor, shape, meaning, value): the facts, their rows, the model
    input and the answer-only targets, the logits, the answer cross-entropy per fact, and the
    stored bits ``sum_f max(0, log2 A - ce_f)`` (about 0 at initialisation: an untrained model
    spreads its probability over the whole byte vocabulary)."""
    fc = FactsConfig(n_subjects=n_subjects, n_relations=N_RELATIONS, n_objects=n_objects, seed=seed)
    fs = load_dataset(fc, False).extras["facts"]
    ev = fs.eval_set("stored")
    x, y = inputs_targets(ev.tokens, ev.answer_mask)  # (F, row_len - 1) each
    torch.manual_seed(seed)
    cfg = FactsTaskParams(d_models=[d_model]).model(d_model=d_model, n_heads=max(1, d_model // 16),
                                                    d_ff=4 * d_model)
    model = LM(cfg).eval()
    with torch.no_grad():
        logits = model(x).logits  # (F, row_len - 1, V)
    mask = y != -100
    sc = answer_scores(logits, y, mask)
    kn = stored_bits(sc.ce_nats, n_objects)
    F_, T = x.shape
    V = logits.shape[-1]
    n_params = sum(p.numel() for p in model.parameters())
    rows = [
        ("facts", "objects[s, r]", (n_subjects, N_RELATIONS),
         f"the answer of every (subject, relation): uniform over A = {n_objects} objects", str(fs.objects.tolist())),
        ("rows", "tokens", tuple(ev.tokens.shape),
         f"one row per fact: BOS, {fc.subject_len} subject symbols, relation word, answer",
         str(ev.tokens[0].tolist())),
        ("input", "x = tokens[:, :-1]", tuple(x.shape), "what the trunk reads (F facts x T tokens)",
         str(x[0].tolist())),
        ("targets", "y (-100 except the answer)", tuple(y.shape), "the loss counts the answer token only",
         str(y[0].tolist())),
        ("trunk", f"LM: D={d_model}, L={cfg.n_layers}, d_ff={cfg.d_ff}", (n_params,),
         "parameters P (embedding tied to the output head)", f"{n_params:,} parameters"),
        ("logits", "model(x).logits", (F_, T, V), "next-token scores over the byte vocabulary", f"V = {V}"),
        ("answer CE", "ce_f (bits)", (F_,), "cross-entropy of each fact's answer, in bits",
         str([round(float(v) / math.log(2), 2) for v in sc.ce_nats])),
        ("stored", "sum_f max(0, log2 A - ce_f)", (), f"knowledge stored, of a load of {fc.knowledge_bits:g} bits",
         f"{kn.bits:.2f} bits ({kn.bits / n_params:.2e} bits/param)"),
    ]
    return pd.DataFrame(rows, columns=["step", "tensor", "shape", "meaning", "value"])


# ----------------------------------------------------------------------------------------------
# Tables.
# ----------------------------------------------------------------------------------------------


def summary_table(table: pd.DataFrame, curves: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (trunk, load): n (seeds), d_model, n_facts, load_kbit, total_params, steps,
    exposures_per_fact, and for each of :data:`METRICS` its mean and 95% half-width over seeds
    (``<metric>_mean``, ``<metric>_ci95``), ``stored_fraction`` (mean stored / load). With ``curves``
    (:func:`curves_table`): ``last_gain`` = accuracy gained over the last stretch of training
    (final eval minus the one before, mean over seeds; NaN without two evaluations): a large gain
    means that load had not converged."""
    s = summarize(table, list(METRICS), by=["d_model", "n_facts"])
    first = table.groupby(["d_model", "n_facts"], sort=False)[
        ["variant", "load_kbit", "total_params", "steps", "exposures_per_fact"]].first().reset_index()
    s = first.merge(s, on=["d_model", "n_facts"])
    s["stored_fraction"] = s["stored_kbit_mean"] / s["load_kbit"]
    s["last_gain"] = float("nan")
    if curves is not None and len(curves):
        for i, r in s.iterrows():
            g = curves[curves["variant"] == r["variant"]]
            gains = []
            for _, c in g.groupby("seed"):
                c = c.sort_values("step")
                if len(c) >= 2:
                    gains.append(float(c["answer_accuracy"].iloc[-1] - c["answer_accuracy"].iloc[-2]))
            if gains:
                s.at[i, "last_gain"] = float(np.mean(gains))
    keep = ["variant", "d_model", "n_facts", "load_kbit", "total_params", "steps", "exposures_per_fact", "n"]
    keep += [f"{m}_{k}" for m in METRICS for k in ("mean", "ci95")] + ["stored_fraction", "last_gain"]
    return s[keep].sort_values(["d_model", "n_facts"]).reset_index(drop=True)


def load_deltas(table: pd.DataFrame) -> pd.DataFrame:
    """Stored kbit of each load minus that of the previous (smaller) load of the same trunk, paired
    by seed (:func:`labcore.experiments.core.paired_deltas`, chained; each trunk's rows are one
    family for the Holm correction: each trunk is its own question). Below
    capacity a larger load stores more (delta ~ the added load); on the plateau the delta is ~0 or
    negative. Extra columns: d_model and ``load_added_kbit`` (the load the larger cell adds)."""
    parts = []
    for D, g in table.groupby("d_model", sort=True):
        order = [variant_name(int(D), int(n)) for n in sorted(g["n_facts"].unique())]
        if len(order) < 2:
            continue
        d = paired_deltas(g, "stored_kbit", chain=True, order=order, higher_is_better=True)
        parts.append(d.assign(d_model=int(D)))
    if not parts:
        raise ConfigError("load_deltas: the table needs at least 2 loads of one trunk")
    out = pd.concat(parts, ignore_index=True)
    load = table.groupby("variant")["load_kbit"].first()
    out["load_added_kbit"] = [float(load[v] - load[r]) for v, r in zip(out["variant"], out["reference"])]
    return out


def capacity_table(summary: pd.DataFrame, deltas: pd.DataFrame, table: pd.DataFrame,
                   capacity_bits: float = 2.0) -> pd.DataFrame:
    """The capacity estimate per trunk, from the largest load: d_model, total_params,
    ``capacity_line_kbit`` (``capacity_bits`` x params), ``largest_load`` (facts) and its
    load_kbit, accuracy, stored_kbit and bits_per_param there (mean, 95% CI low/high over seeds),
    ``peak_load`` (the load with the most stored bits, means), ``of_capacity_line`` (stored at the
    largest load / the capacity line), ``last_doubling_kbit`` (the paired delta to the previous load)
    with its 95% CI, ``load_added_kbit``, ``plateau`` (True when that delta is below a quarter of
    the load it adds: most of the added load was not stored) and ``plateau_resolved`` (True when the
    delta's 95% interval lies below the added load: these seeds rule out storing all of it)."""
    rows = []
    for D, g in summary.groupby("d_model", sort=True):
        g = g.sort_values("n_facts")
        last = g.iloc[-1]
        t = table[table["variant"] == last["variant"]]
        bpp = t["bits_per_param"].to_numpy(dtype=float)
        mean, half = float(last["bits_per_param_mean"]), float(last["bits_per_param_ci95"])
        d = deltas[(deltas["d_model"] == D) & (deltas["variant"] == last["variant"])]
        dl = d.iloc[0] if len(d) else None
        peak = g.loc[g["stored_kbit_mean"].idxmax()]
        cap = capacity_kbit(int(last["total_params"]), capacity_bits)
        rows.append({
            "d_model": int(D), "total_params": int(last["total_params"]), "capacity_line_kbit": cap,
            "largest_load": int(last["n_facts"]), "load_kbit": float(last["load_kbit"]),
            "exposures_per_fact": float(last["exposures_per_fact"]), "n": int(last["n"]),
            "answer_accuracy": float(last["answer_accuracy_mean"]),
            "stored_kbit": float(last["stored_kbit_mean"]), "stored_kbit_ci95": float(last["stored_kbit_ci95"]),
            "bits_per_param": mean, "bpp_ci_low": mean - half if np.isfinite(half) else float("nan"),
            "bpp_ci_high": mean + half if np.isfinite(half) else float("nan"),
            "bpp_min_seed": float(bpp.min()), "bpp_max_seed": float(bpp.max()),
            "peak_load": int(peak["n_facts"]), "peak_stored_kbit": float(peak["stored_kbit_mean"]),
            "of_capacity_line": float(last["stored_kbit_mean"]) / cap,
            "last_doubling_kbit": float(dl["delta_mean"]) if dl is not None else float("nan"),
            "last_doubling_ci_low": float(dl["ci_low"]) if dl is not None else float("nan"),
            "last_doubling_ci_high": float(dl["ci_high"]) if dl is not None else float("nan"),
            "load_added_kbit": float(dl["load_added_kbit"]) if dl is not None else float("nan"),
            "last_gain": float(last["last_gain"]),
        })
    out = pd.DataFrame(rows)
    out["plateau"] = out["last_doubling_kbit"] < 0.25 * out["load_added_kbit"]
    out["plateau_resolved"] = out["last_doubling_ci_high"] < out["load_added_kbit"]
    return out


def curves_table(history: Sequence[dict[str, Any]], table: pd.DataFrame) -> pd.DataFrame:
    """The evaluation rows of the training logs (variant, seed, step, answer_accuracy, stored_kbit)
    with d_model, n_facts and ``exposures`` (step * batch rows / n_facts: how often each fact has
    been seen by then) from ``table``."""
    ev = [r for r in history if r.get("kind") == "eval" and "answer_accuracy" in r]
    if not ev:
        return pd.DataFrame(columns=["variant", "seed", "step", "answer_accuracy", "stored_kbit", "d_model",
                                     "n_facts", "exposures"])
    c = pd.DataFrame(ev)[["variant", "seed", "step", "answer_accuracy", "stored_bits"]]
    c["stored_kbit"] = c.pop("stored_bits") / 1e3
    info = table.groupby("variant")[["d_model", "n_facts", "exposures_per_fact", "steps"]].first()
    c = c.join(info, on="variant")
    c["exposures"] = c["step"] / c["steps"] * c["exposures_per_fact"]
    return c.drop(columns=["exposures_per_fact", "steps"]).reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# Figures.
# ----------------------------------------------------------------------------------------------

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b")


def capacity_figure(summary: pd.DataFrame, capacity_bits: float = 2.0) -> go.Figure:
    """Stored kbit (mean ± 95% CI over seeds) against the load (kbit), one line per trunk, with the
    line y = x (everything stored) and each trunk's capacity line (``capacity_bits`` x params)."""
    fig = go.Figure()
    top = float(summary["load_kbit"].max())
    fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="y = x (every fact stored)",
                             line=dict(color="#9aa5b1", dash="dot")))
    for i, (D, g) in enumerate(summary.groupby("d_model", sort=True)):
        col = _COLORS[i % len(_COLORS)]
        g = g.sort_values("n_facts")
        fig.add_trace(go.Scatter(x=g["load_kbit"], y=g["stored_kbit_mean"], mode="lines+markers",
                                 name=f"D={D} ({int(g['total_params'].iloc[0]):,} params)", line=dict(color=col),
                                 error_y=dict(type="data", array=g["stored_kbit_ci95"].fillna(0.0), visible=True),
                                 text=[f"{n} facts" for n in g["n_facts"]]))
        cap = capacity_kbit(int(g["total_params"].iloc[0]), capacity_bits)
        fig.add_trace(go.Scatter(x=[0, top], y=[cap, cap], mode="lines", line=dict(color=col, dash="dash"),
                                 name=f"D={D} capacity line: {capacity_bits:g} bits/param"))
    return layout(fig, "Knowledge stored vs knowledge load (dense trunks, equal exposures per fact)",
                  "load: n_facts x log2 A (kbit)", "stored (kbit)", bottom=80)


def _per_trunk(summary: pd.DataFrame, metric: str, title: str, y: str, hline: float | None = None,
               hline_text: str = "") -> go.Figure:
    fig = go.Figure()
    for i, (D, g) in enumerate(summary.groupby("d_model", sort=True)):
        g = g.sort_values("n_facts")
        fig.add_trace(go.Scatter(x=g["n_facts"], y=g[f"{metric}_mean"], mode="lines+markers", name=f"D={D}",
                                 line=dict(color=_COLORS[i % len(_COLORS)]),
                                 error_y=dict(type="data", array=g[f"{metric}_ci95"].fillna(0.0), visible=True)))
    if hline is not None:
        fig.add_hline(y=hline, line_dash="dash", annotation_text=hline_text, annotation_position="top left")
    fig.update_xaxes(type="log")
    return layout(fig, title, "facts (log)", y, bottom=80)


def accuracy_figure(summary: pd.DataFrame) -> go.Figure:
    """Answer accuracy (mean ± 95% CI) against the number of facts, one line per trunk."""
    return _per_trunk(summary, "answer_accuracy", "Answer accuracy vs number of facts (equal exposures per fact)",
                      "answer accuracy (fraction)", hline=1.0, hline_text="every fact")


def bits_per_param_figure(summary: pd.DataFrame, capacity_bits: float = 2.0) -> go.Figure:
    """Stored bits per parameter against the number of facts, with the capacity line."""
    return _per_trunk(summary, "bits_per_param", "Stored bits per parameter vs number of facts",
                      "stored bits per parameter (bits)", hline=capacity_bits,
                      hline_text=f"{capacity_bits:g} bits/param (Allen-Zhu & Li)")


def training_figure(curves: pd.DataFrame) -> go.Figure:
    """Accuracy during training (mean over seeds) against exposures per fact so far, one line per
    (trunk, load): a line still rising at its end has not converged."""
    fig = go.Figure()
    for v, g in curves.groupby("variant", sort=False):
        m = g.groupby("exposures")["answer_accuracy"].mean()
        fig.add_trace(go.Scatter(x=m.index, y=m.values, mode="lines+markers", name=str(v)))
    return layout(fig, "Learning curves: accuracy vs exposures per fact so far", "exposures per fact (count)",
                  "answer accuracy (fraction)", bottom=80)


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


@dataclass
class FactsTaskResult:
    plan: pd.DataFrame
    table: pd.DataFrame
    curves: pd.DataFrame
    summary: pd.DataFrame
    capacity: pd.DataFrame
    deltas: pd.DataFrame
    figures: dict[str, Any]
    cpu_seconds: float
    capacity_bits: float = 2.0


def run(P: FactsTaskParams) -> FactsTaskResult:
    """Train every (trunk, load, seed), then write run.json, history.jsonl, summary.parquet, the key
    tables (capacity estimate first, then the paired load deltas, the per-load summary, the plan)
    and the figures (the capacity figure first)."""
    E = P.effective()
    cells = plan(P)  # sizes everything before any training
    cpu0 = time.process_time()
    history: list[dict[str, Any]] = []
    with lab_run(P, NOTEBOOK) as rd:
        def log(row: dict[str, Any]) -> None:
            history.append(row)
            rd.log(row)

        parts = []
        for n in E.fact_counts:
            En = dataclasses.replace(E, n_facts=n)
            steps = E.steps_for(n)
            every = max(1, steps // E.eval_points) if E.eval_points else 0
            variants = [Variant(variant_name(D, n), trunk(E, D),
                                tags={"d_model": D, "n_facts": n, "load_kbit": load_kbit(n, E.n_objects),
                                      "steps": steps}) for D in E.d_models]
            parts.append(run_variants(variants, E.seeds, En.data_config(),
                                      En.train_config(steps=steps, eval_every=every), rd.path / "train",
                                      log=log, calibrate=False))
        table = pd.concat(parts, ignore_index=True)
        curves = curves_table(history, table)
        summary = summary_table(table, curves)
        deltas = load_deltas(table)
        capacity = capacity_table(summary, deltas, table, E.capacity_bits)
        figures = {"capacity": capacity_figure(summary, E.capacity_bits),
                   "curve_accuracy": accuracy_figure(summary),
                   "curve_bits_per_param": bits_per_param_figure(summary, E.capacity_bits),
                   "curve_training": training_figure(curves)}
        save_outputs(rd, NOTEBOOK, table, figures, {"capacity": capacity, "paired_deltas": deltas,
                                                    "per_load": summary, "plan": cells})
    return FactsTaskResult(cells, table, curves, summary, capacity, deltas, figures,
                           time.process_time() - cpu0, E.capacity_bits)


# ----------------------------------------------------------------------------------------------
# Interpretation.
# ----------------------------------------------------------------------------------------------


def interpret(summary: pd.DataFrame, capacity: pd.DataFrame, capacity_bits: float = 2.0) -> str:
    """This run's reading in sentences, from :func:`summary_table` and :func:`capacity_table`: per
    trunk, the largest load stored at >= 99% accuracy, what the largest load stores (kbit, bits per
    parameter with its interval, share of the capacity line), whether the last doubling of the load
    still added stored bits (plateau or growth), whether the curves had converged, and, with
    several trunks, whether the plateaus scale with the parameters (capacity) or not (training)."""
    lines = []
    for c in capacity.itertuples(index=False):
        g = summary[summary["d_model"] == c.d_model].sort_values("n_facts")
        full = g[g["answer_accuracy_mean"] >= 0.99]
        if len(full):
            f = full.iloc[-1]
            head = (f"D={c.d_model} ({c.total_params:,} parameters): up to {int(f['n_facts'])} facts "
                    f"({f['load_kbit']:.1f} kbit) it stores almost everything (accuracy "
                    f"{f['answer_accuracy_mean']:.3f}, {f['stored_kbit_mean']:.1f} kbit).")
        else:
            head = (f"D={c.d_model} ({c.total_params:,} parameters): no load reaches 99% accuracy "
                    f"(the smallest, {int(g['n_facts'].iloc[0])} facts, reaches "
                    f"{g['answer_accuracy_mean'].iloc[0]:.3f}).")
        ci = ("" if not np.isfinite(c.bpp_ci_low)
              else f", 95% CI {c.bpp_ci_low:.2f} .. {c.bpp_ci_high:.2f}")
        lines.append(f"{head} At the largest load, {c.largest_load} facts ({c.load_kbit:.1f} kbit), accuracy is "
                     f"{c.answer_accuracy:.3f} and it stores {c.stored_kbit:.1f} kbit = {c.bits_per_param:.2f} "
                     f"bits/param{ci} (n={c.n}), {100 * c.of_capacity_line:.0f}% of the {capacity_bits:g} bits/param "
                     f"line ({c.capacity_line_kbit:.1f} kbit).")
        if np.isfinite(c.last_doubling_kbit):
            ci_d = ("" if not np.isfinite(c.last_doubling_ci_low)
                    else f" (95% CI {c.last_doubling_ci_low:+.2f} .. {c.last_doubling_ci_high:+.2f})")
            if c.plateau:
                sure = ("the interval rules out storing the added load" if c.plateau_resolved else
                        f"but with n={c.n} the interval still reaches the added load: more seeds would settle it")
                lines.append(f"  The last step of the load added {c.load_added_kbit:.1f} kbit to learn but only "
                             f"{c.last_doubling_kbit:+.2f} kbit stored{ci_d}: stored bits have levelled off "
                             f"while accuracy falls, the plateau the task is built on ({sure}).")
            else:
                lines.append(f"  The last step of the load added {c.load_added_kbit:.1f} kbit and "
                             f"{c.last_doubling_kbit:+.2f} kbit were stored{ci_d}: stored bits are still "
                             f"growing, so this range of loads has not reached the trunk's plateau.")
        if np.isfinite(c.last_gain) and c.last_gain > 0.02:
            lines.append(f"  Not converged: accuracy at the largest load rose by {c.last_gain:.3f} over the last "
                         "stretch of training, so more exposures would store more; the plateau here is set by "
                         "training as much as by parameters.")
        if c.bits_per_param < 0.5 * capacity_bits:
            what = ("the trunk's capacity *at" if c.plateau else "what this schedule stores *at")
            lines.append(f"  {c.bits_per_param:.2f} bits/param is well below {capacity_bits:g}: read it as {what} "
                         f"{c.exposures_per_fact:.0f} exposures per fact*, not the trunk's ultimate capacity "
                         "(Allen-Zhu & Li reach ~2 only after ~1000 exposures).")
        else:
            lines.append(f"  {c.bits_per_param:.2f} bits/param is near the {capacity_bits:g} bits/param "
                         "of Allen-Zhu & Li: the trunk is close to its capacity.")
    if len(capacity) >= 2:
        c = capacity.sort_values("total_params")
        a, b = c.iloc[0], c.iloc[-1]
        p_ratio = b["total_params"] / a["total_params"]
        s_ratio = b["stored_kbit"] / max(a["stored_kbit"], 1e-12)
        how = ("about in proportion: a capacity set by parameters" if 0.7 * p_ratio <= s_ratio <= 1.3 * p_ratio
               else "not in proportion: the largest loads do not fill both trunks to the same bits per "
                    "parameter (one is limited by its load or its training, not its size)")
        lines.append(f"D={int(b['d_model'])} has {p_ratio:.1f}x the parameters of D={int(a['d_model'])} and stores "
                     f"{s_ratio:.1f}x the bits at the largest load: {how}.")
    return "\n".join(lines)
