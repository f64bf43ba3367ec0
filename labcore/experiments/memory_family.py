"""07_memory_family: the six sparse architectures and dense at equal budget on the memory-bound task.

Dense, MoE, PKM, UltraMem, UltraMemV2, Memory+ and PEER (``labcore.lm.budget.memory_family_names``)
are sized from one small dense trunk by :func:`labcore.lm.budget.equal_budget_family`: all at the
dense model's forward FLOPs per token (equal *activated* compute), the sparse ones at ``(1 + ratio)``
times its parameters, within 2%. Each is trained on the facts task (:mod:`labcore.data.facts`:
(subject, relation) -> object, one answer token, ``log2 n_objects`` bits per fact) with the loss on
the answer token only (:func:`labcore.experiments.facts_pilot.train_facts`), for several seeds (same
seed = same init seed and batch order: a pair). Measured:

- **knowledge stored**: answer accuracy, answer loss and stored bits
  (:mod:`labcore.experiments.knowledge_metrics`: ``sum_f max(0, log2 A - ce_f)``) with 95% intervals
  over seeds (:func:`labcore.experiments.core.summarize`), and the paired difference to dense and to
  MoE with the design's resolution (:func:`labcore.experiments.stats.compare`);
- **the capacity curve**: stored bits vs memory size (value rows N) for the memories of
  ``capacity_archs`` at each of ``capacity_ratios`` (equal activated FLOPs, more parameters), with
  dense and MoE as references;
- **inference cost**: one decode step of each sparse layer at the batch sizes of ``batch_sizes``
  (:func:`labcore.bench.inference.run_inference_bench`, layer scope): latency and bytes read per token;
- **the papers' claims** beside the lab's numbers (:data:`PAPER_CLAIMS`, quoted from
  docs/mechanisms.md).

The memory shapes on the small trunk follow the facts-regime pilot: PKM, UltraMemV2 and PEER use their
family defaults; UltraMem uses TDQKR (rank 2, 2 cores) with full-width values, no IVE (E = 1) and no
skip (a skip query on a 2-block trunk sees one attention layer); Memory+ keeps its shared value pool
over two memories with 2 heads and D/4 key features (its default 4 heads x D/2 features cost more than
the trunk's FFN can give back). See :func:`layer_overrides`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from labcore.bench.inference import run_inference_bench
from labcore.data.facts import FactsConfig
from labcore.experiments.common import VOCAB_SIZE, lab_run, save_outputs
from labcore.experiments.core import summarize
from labcore.experiments.facts_pilot import train_facts
from labcore.experiments.params import MEMORY_FAMILY, MemoryFamilyParams
from labcore.experiments.stats import compare
from labcore.lm.budget import equal_budget_family, model_budget
from labcore.lm.model import ModelConfig
from labcore.lm.train import TrainConfig
from labcore.viz.figures import variants_figure
from labcore.viz.plots import latency_vs_batch_figure
from labcore.viz.style import layout

__all__ = ["MemoryFamilyParams", "MEMORY_FAMILY", "PAPER_CLAIMS", "NOTEBOOK", "base_model", "layer_overrides",
           "family", "capacity_models", "memory_size", "facts_config", "train_config", "train_cell",
           "headline_table", "capacity_table", "inference_table", "claims_table", "capacity_figure", "run"]

NOTEBOOK = "07_memory_family"
N_RELATIONS = 4

# Each paper's claim about its architecture, as docs/mechanisms.md states it, and the lab number that
# speaks to it (filled by claims_table).
PAPER_CLAIMS: dict[str, dict[str, str]] = {
    "moe": {"source": "arXiv 2101.03961; docs/mechanisms.md §7.1",
            "claim": "the baseline: top-2 experts at the dense model's compute, whole experts as the unit",
            "lab": "reference"},
    "pkm": {"source": "arXiv 1907.05242; docs/mechanisms.md §4",
            "claim": "a 12-layer model with memory beats a 24-layer baseline and is ~2x faster at inference",
            "lab": "stored_vs_dense"},
    "ultramem": {"source": "arXiv 2411.12364 §1, Fig. 1; docs/mechanisms.md §2.2",
                 "claim": "at equal compute and parameters, MoE decodes 2-6x slower than UltraMem (memory access)",
                 "lab": "latency_moe_over"},
    "ultramem_v2": {"source": "arXiv 2508.18756 Table 3; docs/mechanisms.md §3.3",
                    "claim": "parity with an 8-expert (top-8) MoE: eval loss 2.853 vs OLMoE 2.845 at 227M/1.2B, "
                             "2.628 vs 2.631 at 1B/7B",
                    "lab": "loss_vs_moe"},
    "memory_plus": {"source": "arXiv 2412.09764; docs/mechanisms.md §5",
                    "claim": "better than MoE matched for compute and parameters, largest gains on factual tasks "
                             "(NQ 13.68 vs MoE 8.14 at 1.3B base)",
                    "lab": "stored_vs_moe"},
    "peer": {"source": "arXiv 2407.04153; docs/mechanisms.md §6",
             "claim": "lowest compute-optimal perplexity against dense, MoE and PKM in isoFLOP sweeps",
             "lab": "loss_vs_moe"},
}


# ----------------------------------------------------------------------------------------------
# Models and data.
# ----------------------------------------------------------------------------------------------


def facts_config(E: MemoryFamilyParams) -> FactsConfig:
    """The task: ``n_facts`` facts over 4 relations; the same facts for every seed (seeds vary the
    init and the batch order)."""
    return FactsConfig(n_subjects=E.n_facts // N_RELATIONS, n_relations=N_RELATIONS, n_objects=E.n_objects,
                       seed=0)


def context_len(E: MemoryFamilyParams) -> int:
    """Tokens a facts row feeds the model (row_len - 1): the context the FLOPs are counted at."""
    return facts_config(E).row_len - 1


def base_model(E: MemoryFamilyParams) -> ModelConfig:
    """The dense trunk: D = ``d_model``, L = ``n_layers``, D/16 heads, d_ff = 4D, the byte vocabulary."""
    D = E.d_model
    return ModelConfig(vocab_size=VOCAB_SIZE, d_model=D, n_layers=E.n_layers, n_heads=max(1, D // 16),
                       d_ff=4 * D, max_seq_len=max(16, context_len(E)))


def layer_overrides(E: MemoryFamilyParams) -> dict[str, dict[str, Any]]:
    """Matcher keywords that replace the family defaults on this trunk (see the module docstring)."""
    D, mid = E.d_model, E.n_layers // 2
    return {
        "ultramem": {"heads": 2, "top_k": 32, "k_dim": max(1, D // 4), "d_value": D, "value_proj": False,
                     "expansion": 1, "placements": (f"{mid}:{mid}",)},
        "memory_plus": {"heads": 2, "k_dim": 2 * max(1, D // 8)},
    }


def _family(E: MemoryFamilyParams, ratio: float, names: Sequence[str]) -> dict[str, ModelConfig]:
    own = {k: v for k, v in layer_overrides(E).items() if k in names}
    return equal_budget_family(base_model(E), ratio, context_len=context_len(E), multiple_of=4,
                               names=list(names), **own)


def family(E: MemoryFamilyParams) -> dict[str, ModelConfig]:
    """``E.architectures`` at equal forward FLOPs, the sparse ones at ``(1 + ratio)`` x dense params."""
    return _family(E, E.ratio, E.architectures)


def capacity_models(E: MemoryFamilyParams) -> dict[tuple[str, float], ModelConfig]:
    """(memory, ratio) -> config for every memory of ``capacity_archs`` at every ratio of
    ``capacity_ratios`` other than ``ratio`` (those are the family's own models)."""
    out = {}
    for arch in E.capacity_archs:
        for r in sorted(set(map(float, E.capacity_ratios))):
            if not math.isclose(r, E.ratio):
                out[(arch, r)] = _family(E, r, ["dense", arch])[arch]
    return out


def memory_size(cfg: ModelConfig) -> int:
    """Value rows N over the model's memories (a shared pool once; 0 for dense and MoE)."""
    if cfg.plan.kind != "memory":
        return 0
    c = cfg.memory_layer_config().cost()
    return int(c.n_units) * (1 if cfg.plan.shared_values else len(cfg.memory_pairs()))


def train_config(E: MemoryFamilyParams, seed: int) -> TrainConfig:
    """AdamW without weight decay, warmup then cosine, memory values at ``value_lr_multiplier`` x lr
    decaying linearly to 1x (docs/mechanisms.md §1.6) for every memory, Memory+ included (its released
    fixed value LR, §5, ``MemoryPlusConfig.value_lr``, stays off so that all memories train alike)."""
    return TrainConfig(steps=E.steps, batch_size=E.batch_size, seq_len=context_len(E), lr=E.lr,
                       warmup_steps=max(1, min(20, E.steps // 10)), weight_decay=0.0,
                       value_lr_multiplier=E.value_lr_multiplier, eval_every=0, checkpoint_every=0, seed=seed,
                       device=E.device, progress=False)


def train_cell(name: str, arch: str, cfg: ModelConfig, E: MemoryFamilyParams, seed: int, *, ratio: float,
               log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train one (model, seed) on the facts and return its row: variant, arch, ratio, seed, the final
    answer metrics, stored bits, the budget, value rows N and the training seconds."""
    fcfg = facts_config(E)

    def tagged(row: dict[str, Any]) -> None:
        if log is not None:
            log({"variant": name, "seed": seed, **row})

    t0 = time.perf_counter()
    run = train_facts(cfg, fcfg, train_config(E, seed), log_every=max(1, E.steps // 4), log=tagged)
    seconds = time.perf_counter() - t0
    b = model_budget(cfg, context_len=context_len(E))
    f = run.final
    row = {"variant": name, "arch": arch, "ratio": ratio, "seed": int(seed),
           "answer_accuracy": f["answer_accuracy"], "answer_loss": f["answer_loss"],
           "stored_bits": f["stored_bits"], "stored_kbit": f["stored_bits"] / 1e3,
           "stored_fraction": f["stored_fraction"], "bits_per_param": f["bits_per_param"],
           "n_values": memory_size(cfg), "exposures_per_fact": E.steps * E.batch_size / fcfg.n_facts,
           **b.row(), "train_seconds": seconds}
    tagged({"kind": "final", **{k: v for k, v in row.items() if isinstance(v, int | float)}})
    return row


# ----------------------------------------------------------------------------------------------
# Tables.
# ----------------------------------------------------------------------------------------------

METRICS = ("answer_accuracy", "answer_loss", "stored_kbit")


def headline_table(table: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """Per architecture: accuracy, answer loss and stored kbit (mean, 95% CI over seeds), params,
    FLOPs, and the paired difference of stored kbit to dense (delta, CI, resolution, verdict)."""
    t = table[table["variant"].isin(order)]
    s = summarize(t, list(METRICS), by="variant").set_index("variant").loc[list(order)].reset_index()
    first = t.groupby("variant", sort=False).first().loc[list(order)]
    out = pd.DataFrame({"architecture": s["variant"], "seeds": s["n"]})
    for m in METRICS:
        out[m] = s[f"{m}_mean"].to_numpy()
        out[f"{m}_ci95"] = s[f"{m}_ci95"].to_numpy()
    out["total_params"] = first["total_params"].to_numpy()
    out["flops_per_token"] = first["flops_per_token"].to_numpy()
    out["n_values"] = first["n_values"].to_numpy()
    if len(order) > 1:
        c = compare(t, "stored_kbit", baseline=order[0], order=list(order), higher_is_better=True)
        c = c.set_index("variant")
        for col, src in (("d_stored_kbit_vs_dense", "delta_mean"), ("d_ci_low", "ci_low"),
                         ("d_ci_high", "ci_high"), ("resolution_kbit", "resolution"), ("verdict", "verdict")):
            out[col] = [c.at[v, src] if v in c.index else (0.0 if col != "verdict" else "reference")
                        for v in out["architecture"]]
    return out


def capacity_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per (arch, ratio): value rows N, total params and stored kbit (mean, CI) and accuracy."""
    s = summarize(table, ["stored_kbit", "answer_accuracy"], by=["arch", "ratio"])
    first = table.groupby(["arch", "ratio"], sort=False)[["n_values", "total_params", "flops_per_token"]].first()
    s = s.merge(first.reset_index(), on=["arch", "ratio"])
    return s.sort_values(["arch", "n_values"]).reset_index(drop=True)


def inference_table(inference: pd.DataFrame) -> pd.DataFrame:
    """Per (model, batch): decode-step latency (ms), latency per token (us), bytes read per token
    (measured: ``bytes_accessed / B``; the cost model's ``bytes_predicted / B``)."""
    df = inference[inference["scope"] == "layer"] if "scope" in inference.columns else inference
    return pd.DataFrame({
        "architecture": df["model"].to_numpy(), "batch": df["batch"].to_numpy(),
        "latency_ms": 1e3 * df["latency_s"].to_numpy(),
        "us_per_token": 1e6 * df["latency_s"].to_numpy() / df["batch"].to_numpy(),
        "bytes_per_token": df["bytes_accessed"].to_numpy() / df["batch"].to_numpy(),
        "bytes_per_token_predicted": df["bytes_predicted"].to_numpy() / df["batch"].to_numpy(),
    })


def _fmt_diff(c: pd.DataFrame, v: str, unit: str) -> str:
    if c.empty or v not in set(c["variant"]):
        return "not measured"
    r = c.set_index("variant").loc[v]
    return (f"Δ {r['metric']} vs {r['reference']} = {r['delta_mean']:+.3g} {unit} "
            f"(95% CI {r['ci_low']:+.3g} .. {r['ci_high']:+.3g}, n={int(r['n'])}): {r['verdict']}")


def claims_table(table: pd.DataFrame, inference: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """Each architecture's paper claim beside the lab number that speaks to it."""
    t = table[table["variant"].isin(order)]
    has = set(order)
    loss_moe = (compare(t, "answer_loss", baseline="moe", order=list(order))
                if {"moe", "dense"} <= has and len(has) > 2 else pd.DataFrame())
    stored_moe = (compare(t, "stored_kbit", baseline="moe", order=list(order), higher_is_better=True)
                  if {"moe", "dense"} <= has and len(has) > 2 else pd.DataFrame())
    stored_dense = (compare(t, "stored_kbit", baseline="dense", order=list(order), higher_is_better=True)
                    if len(has) > 1 else pd.DataFrame())
    lat = inference_table(inference).pivot_table(index="batch", columns="architecture", values="latency_ms")
    rows = []
    for arch in order:
        if arch not in PAPER_CLAIMS:
            continue
        kind = PAPER_CLAIMS[arch]["lab"]
        if kind == "reference":
            lab = "the reference the memories are compared with"
        elif kind == "stored_vs_dense":
            lab = _fmt_diff(stored_dense, arch, "kbit")
        elif kind == "stored_vs_moe":
            lab = _fmt_diff(stored_moe, arch, "kbit")
        elif kind == "loss_vs_moe":
            lab = _fmt_diff(loss_moe, arch, "nats")
        else:  # latency_moe_over
            if "moe" in lat.columns and arch in lat.columns:
                lab = "MoE / " + arch + " layer latency: " + ", ".join(
                    f"{r:.2f}x at B={b}" for b, r in (lat["moe"] / lat[arch]).items())
            else:
                lab = "not measured"
        rows.append({"architecture": arch, "paper_claim": PAPER_CLAIMS[arch]["claim"],
                     "source": PAPER_CLAIMS[arch]["source"], "lab": lab})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Figures.
# ----------------------------------------------------------------------------------------------


def capacity_figure(cap: pd.DataFrame, refs: pd.DataFrame, title: str) -> go.Figure:
    """Stored kbit (mean ± 95% CI) vs value rows N, one line per memory, dense and MoE as dashed
    horizontal references (their mean stored kbit). ``cap``: :func:`capacity_table`; ``refs``: rows of
    the same table for the reference architectures."""
    fig = go.Figure()
    for arch, g in cap.groupby("arch", sort=False):
        fig.add_trace(go.Scatter(x=g["n_values"], y=g["stored_kbit_mean"], mode="lines+markers", name=str(arch),
                                 error_y=dict(type="data", array=g["stored_kbit_ci95"].fillna(0.0), visible=True),
                                 text=[f"ratio {r:g}" for r in g["ratio"]]))
    for r in refs.itertuples(index=False):
        fig.add_hline(y=r.stored_kbit_mean, line_dash="dash", annotation_text=f"{r.arch}",
                      annotation_position="top left")
    fig.update_xaxes(type="log")
    return layout(fig, title, "memory value rows N (log)", "knowledge stored (kbit)", bottom=80)


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


@dataclass
class MemoryFamilyResult:
    budget: pd.DataFrame
    table: pd.DataFrame
    headline: pd.DataFrame
    capacity: pd.DataFrame
    inference: pd.DataFrame
    cost: pd.DataFrame
    claims: pd.DataFrame
    figures: dict[str, Any]


def _device(E: MemoryFamilyParams) -> str:
    return "cuda" if E.device == "cuda" or (E.device == "auto" and torch.cuda.is_available()) else "cpu"


def bench_family(fam: dict[str, ModelConfig], E: MemoryFamilyParams) -> pd.DataFrame:
    """The decode-step bench (layer scope) of every model at ``E.batch_sizes``. A shared value pool
    (Memory+) is timed as one layer with its own table of the pool's size: the bench's cost model has
    no shared pool, and one layer alone reads its own N rows either way."""
    configs = {name: dataclasses.replace(cfg, plan=dataclasses.replace(cfg.plan, shared_values=False))
               if cfg.plan.shared_values else cfg for name, cfg in fam.items()}
    return run_inference_bench(list(E.batch_sizes), configs=configs, device=_device(E), warmup=1,
                               repeats=2 if E.smoke else 5, scopes=("layer",), overlap=False, log=None)


def run(P: MemoryFamilyParams) -> MemoryFamilyResult:
    """Train every architecture x seed and every capacity point x seed, time the decode step, and
    write run.json, history.jsonl, summary.parquet, the key tables and the figures."""
    E = P.effective()
    fam = family(E)
    caps = capacity_models(E)  # sized before any training: a size that cannot be matched stops here
    order = list(fam)
    budget = pd.DataFrame([{"architecture": k, **model_budget(c, context_len=context_len(E)).row(),
                            "n_values": memory_size(c)} for k, c in fam.items()])
    with lab_run(P, NOTEBOOK) as rd:
        rows = []
        for name, cfg in fam.items():
            for s in E.seeds:
                rows.append(train_cell(name, name, cfg, E, s, ratio=0.0 if name == "dense" else E.ratio,
                                       log=rd.log))
        for (arch, r), cfg in caps.items():
            for s in E.seeds:
                rows.append(train_cell(f"{arch} x{r:g}", arch, cfg, E, s, ratio=r, log=rd.log))
        table = pd.DataFrame(rows)
        headline = headline_table(table, order)
        cap_archs = [a for a in E.capacity_archs if a in set(table["arch"])]
        capacity = capacity_table(table[table["arch"].isin(cap_archs + ["dense", "moe"])])
        inference = bench_family(fam, E)
        cost = inference_table(inference)
        timed = cost.rename(columns={"architecture": "model"})
        claims = claims_table(table, inference, order)
        family_rows = table[table["variant"].isin(order)]
        figures = {
            "stored_bits": variants_figure(family_rows, "stored_kbit", order,
                                           "Knowledge stored at equal activated FLOPs (kbit)"),
            "accuracy": variants_figure(family_rows, "answer_accuracy", order, "Answer accuracy on the stored facts"),
            "capacity": capacity_figure(capacity[capacity["arch"].isin(cap_archs)],
                                        capacity[capacity["arch"].isin(["dense", "moe"])],
                                        "Knowledge stored vs memory size (equal activated FLOPs)"),
            "latency": latency_vs_batch_figure(timed, "latency_ms", "batch",
                                               "model", "Sparse-layer decode latency vs batch size (this machine)"),
            "bytes_per_token": latency_vs_batch_figure(timed, "bytes_per_token", "batch", "model",
                                                       "Bytes read per token vs batch size (measured)"),
        }
        save_outputs(rd, NOTEBOOK, table, figures, {
            "headline": headline, "capacity": capacity, "inference_cost": cost, "paper_claims": claims,
            "budget": budget})
    return MemoryFamilyResult(budget, table, headline, capacity, inference, cost, claims, figures)


def describe(result: MemoryFamilyResult) -> str:
    """The run's numbers in sentences: the best stored knowledge, each memory against dense, the
    capacity slope and the MoE / memory latency at the largest batch."""
    h = result.headline
    lines = []
    best = h.loc[h["stored_kbit"].idxmax()]
    load = result.table["stored_kbit"].max() / max(result.table["stored_fraction"].max(), 1e-12)
    lines.append(f"Most knowledge stored: {best['architecture']} with {best['stored_kbit']:.2f} kbit "
                 f"(accuracy {best['answer_accuracy']:.3f}) of a {load:.1f} kbit load.")
    if "verdict" in h.columns:
        for r in h.iloc[1:].itertuples(index=False):
            lines.append(f"{r.architecture} vs dense: Δ stored {r.d_stored_kbit_vs_dense:+.2f} kbit -> {r.verdict}")
    cap = result.capacity
    for arch, g in cap[cap["n_values"] > 0].groupby("arch", sort=False):
        if len(g) >= 2:
            g = g.sort_values("n_values")
            slope = np.polyfit(np.log2(g["n_values"].astype(float)), g["stored_kbit_mean"], 1)[0]
            lines.append(f"capacity {arch}: {slope:+.2f} kbit per doubling of N "
                         f"({int(g['n_values'].iloc[0]):,} -> {int(g['n_values'].iloc[-1]):,} value rows)")
    c = result.cost
    if len(c):
        bmax = c["batch"].max()
        at = c[c["batch"] == bmax].set_index("architecture")
        if "moe" in at.index:
            for a in at.index:
                if a not in ("moe", "dense"):
                    lines.append(f"B={bmax}: MoE / {a} layer latency {at.at['moe', 'latency_ms'] / at.at[a, 'latency_ms']:.2f}x, "
                                 f"bytes/token {at.at['moe', 'bytes_per_token'] / max(at.at[a, 'bytes_per_token'], 1e-12):.2f}x")
    return "\n".join(lines)
