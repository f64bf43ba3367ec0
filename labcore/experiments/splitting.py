"""02_layer_splitting: one big memory vs S smaller ones, at equal total AND activated values.

UltraMem's first structural change (docs/mechanisms.md §1.2; arXiv 2411.12364 §3.1, Fig. 3) splits
PKM's single big memory into S smaller memory layers spread over the depth, each a skip-layer
"k:v" that reads block k's FFN input and adds its output after block v. Table 2's row "+split big
mem & skip" reports -0.015 validation loss (with the skip links, a 151M-activated LM).

The rule that keeps the comparison about the split and nothing else
(:func:`labcore.lm.model.split_memory_plan`): each of the S memories holds N / S values and reads
K / S values per head, so the model holds N values and a token reads H * K of them, before and
after. Without the second half of the rule, S memories with the full top-K each read S times more
values, and "splitting helps" would mean "reading more helps".

The arms (:func:`split_variants`): "S=1" (one memory, the baseline), "S=<S> same block" (the S
small memories side by side at the baseline's block: the split alone) and "S=<S> depth span <s>"
(spread over the depth, the paper's layout). Every run trains on the facts task
(:mod:`labcore.data.facts`; answer-token loss, accuracy and stored bits) with calibrated init and
the value-LR multiplier in every arm. The decode part times the whole model at ``batch_sizes`` on
this machine and reads the memory bytes of one decode step from the cost model
(N [1 - (1 - m/N)^B] distinct values per memory, plus its keys and query read once per step).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from labcore.experiments.common import lab_run, save_outputs
from labcore.experiments.core import (
    Variant,
    describe_deltas,
    paired_deltas,
    run_variants,
    summarize,
)
from labcore.experiments.params import SplittingParams
from labcore.layers.ultramem import UltraMem, UltraMemConfig
from labcore.lm.budget import model_budget
from labcore.lm.model import LM, ModelConfig, split_memory_plan
from labcore.profiling.cost_model import layer_step_cost
from labcore.profiling.timer import time_fn
from labcore.viz.figures import cost_curves_figure, deltas_figure, variants_figure

__all__ = ["NOTEBOOK", "PAPER_VAL_DELTA", "SplittingParams", "SplittingResult", "analyse", "base_memory",
           "decode_profile", "describe", "held_equal", "interpret", "run", "split_variants", "tiny_forward"]

NOTEBOOK = "02_layer_splitting"
HEADS = 2
# arXiv 2411.12364 Table 2, "+split big mem & skip": validation loss of a 151M-activated LM (nats).
PAPER_VAL_DELTA = -0.015
METRICS = ("answer_accuracy", "answer_loss", "stored_kbit")


def base_memory(P: SplittingParams) -> UltraMemConfig:
    """The single memory the arms split: UltraMem with TDQKR (rank 2) and 2 scoring cores, raw
    scores, ``HEADS`` heads x top-``top_k``, D/4 key features per side, full-width values (D_v = D,
    no projection, E = 1): the shape that learns facts on this small trunk (facts_pilot.memory_shape)."""
    n = math.isqrt(P.total_values)
    if n * n != P.total_values:  # SplittingParams checks total / S for every S, including S = 1
        raise ValueError(f"total_values={P.total_values} is not a perfect square")
    D = P.d_model
    return UltraMemConfig(d_model=D, n_keys=n, heads=HEADS, k_dim=max(1, D // 4), top_k=P.top_k, d_value=D,
                          value_proj=False, expansion=1, rank=2, n_cores=2)


def split_variants(P: SplittingParams) -> list[Variant]:
    """The arms, "S=1" first. Every arm: N = ``total_values`` values in all, H * K read per token."""
    P = P.effective()
    mem = base_memory(P)
    one = split_memory_plan(mem, 1, P.n_layers, 0)       # one memory at the middle of the depth
    out = [_variant("S=1", P, one, "one memory")]
    for s in sorted(x for x in set(P.splits) if x > 1):
        if P.same_block:                                 # the split alone: S memories at one block
            plan = dataclasses.replace(split_memory_plan(mem, s, P.n_layers, 0), placements=one.placements * s)
            out.append(_variant(f"S={s} same block", P, plan, "same block"))
        for span in P.spans:                             # the paper's layout: spread over the depth
            out.append(_variant(f"S={s} depth span {span}", P, split_memory_plan(mem, s, P.n_layers, span),
                                "over depth", span))
    return out


def _variant(name: str, P: SplittingParams, plan: Any, layout: str, span: int = 0) -> Variant:
    m, S = plan.memory, len(plan.placements)
    return Variant(name, P.model(plan), tags={
        "memories": S, "layout": layout, "span": span, "placements": "/".join(plan.placements),
        "n_keys": m.n_keys, "top_k": m.top_k, "values_total": S * m.n_keys ** 2,
        "values_read": S * m.heads * m.top_k})


def held_equal(variants: list[Variant], context_len: int) -> pd.DataFrame:
    """What each arm holds and spends: values in all, values read per token (equal by construction),
    parameters and forward FLOPs per token (not equal: each memory has its own query and keys)."""
    rows = []
    for v in variants:
        b = model_budget(v.model, context_len=context_len)
        m, S = v.model.plan.memory, len(v.model.plan.placements)
        c = m.cost()
        rows.append({"variant": v.name, "memories": S, "placements": "/".join(v.model.plan.placements),
                     "values_per_memory": m.n_keys ** 2, "values_total": S * m.n_keys ** 2,
                     "top_k_per_head": m.top_k, "values_read_per_token": S * c.units_per_token,
                     "value_params": b.sparse_params, "total_params": b.total_params,
                     "flops_per_token": b.flops_per_token,
                     "memory_flops_per_token": b.flops_by_part["memory"]})
    df = pd.DataFrame(rows)
    ref = df.iloc[0]
    df["params_vs_S1"] = df["total_params"] / ref["total_params"] - 1.0
    df["flops_vs_S1"] = df["flops_per_token"] / ref["flops_per_token"] - 1.0
    return df


@torch.no_grad()
def tiny_forward(n_keys: int = 8, splits: int = 4, top_k: int = 4, d_model: int = 16, tokens: int = 3,
                 seed: int = 0) -> pd.DataFrame:
    """One forward pass of a tiny memory (n_keys^2 values, 2 heads x top-``top_k``) and of its split
    into ``splits`` memories (n_keys^2 / S values, top_k / S each), on ``tokens`` random tokens:
    one row per step with the tensor, its shape and what it is. The last rows count the values
    stored and read per token on each side of the split (equal)."""
    torch.manual_seed(seed)
    big = UltraMemConfig(d_model=d_model, n_keys=n_keys, heads=HEADS, k_dim=4, top_k=top_k, d_value=d_model,
                         value_proj=False, expansion=1, rank=2, n_cores=2)
    small = split_memory_plan(big, splits, n_layers=splits, span=0).memory
    x = torch.randn(tokens, d_model)                                          # (N_tok, D)
    rows = [("input", "x", str(tuple(x.shape)), "N_tok tokens of width D")]
    for label, cfg, count in (("one memory", big, 1), (f"each of S={splits}", small, splits)):
        layer = UltraMem(cfg)
        y, aux = layer(x)                                                     # (N_tok, D), aux.indices (N_tok, H*K)
        rows += [
            (label, "query W_q x", str(tuple(layer.query(x).shape)), "one query (row half, column half) of "
                                                                    "2 x D_k features, shared by the heads"),
            (label, "keys", str(tuple(layer.keys.shape)), f"(H, 2 sides, R, n, D_k): n = {cfg.n_keys} sub-keys "
                                                          "per side"),
            (label, "values V", str(tuple(layer.values.weight.shape)), f"n^2 = {cfg.n_keys}^2 rows of width D_v"),
            (label, "slots (aux.indices)", str(tuple(aux.indices.shape)),
             f"H*K = {cfg.heads}*{cfg.top_k} value rows read per token"),
            (label, "y", str(tuple(y.shape)), "sum_k s_k V[slot_k]: the memory output, width D"),
            (label, "values stored, all memories", str(count * cfg.n_keys ** 2), f"{count} x {cfg.n_keys}^2"),
            (label, "values read per token, all memories", str(count * cfg.heads * cfg.top_k),
             f"{count} x H*K = {count} x {cfg.heads}*{cfg.top_k}"),
        ]
    return pd.DataFrame(rows, columns=["step", "tensor", "shape", "meaning"])


@torch.no_grad()
def decode_profile(model_cfg: ModelConfig, batch_sizes: list[int], *, repeats: int = 5,
                   device: str = "cpu") -> pd.DataFrame:
    """Per batch size B: measured decode-step latency of the whole model (B sequences, one new
    token each, no KV cache: the trunk's per-token work) and the cost model's memory bytes."""
    torch.manual_seed(0)
    lm = LM(model_cfg).to(device).eval()
    mem_cost = model_cfg.plan.memory.cost() if model_cfg.plan.kind == "memory" else None
    n_mem = len(model_cfg.plan.placements) if mem_cost is not None else 0
    rows = []
    for b in batch_sizes:
        idx = torch.randint(0, model_cfg.vocab_size, (b, 1), device=device)   # (B, T=1)
        t = time_fn(lambda idx=idx: lm(idx), warmup=2, repeats=repeats, device=device)
        mem_bytes = n_mem * layer_step_cost(mem_cost, b).bytes_total if mem_cost is not None else 0.0
        rows.append({"batch_size": b, "latency_ms": 1e3 * t.median_s, "latency_iqr_ms": 1e3 * t.iqr_s,
                     "memory_bytes": mem_bytes})
    return pd.DataFrame(rows)


@dataclass
class SplittingResult:
    table: pd.DataFrame            # one row per (variant, seed)
    summary: pd.DataFrame          # per variant: mean, std, 95% CI of the metrics
    deltas: pd.DataFrame           # headline: answer loss vs S=1, paired by seed (with the paper's delta)
    accuracy_deltas: pd.DataFrame  # answer accuracy vs S=1
    kbit_deltas: pd.DataFrame      # stored kbit vs S=1
    equal: pd.DataFrame            # what is held equal (and what is not)
    init: pd.DataFrame             # step-0 memory output std before / after calibration
    cost: pd.DataFrame             # decode latency and memory bytes per batch size
    figures: dict[str, Any]


def analyse(table: pd.DataFrame, baseline: str = "S=1") -> dict[str, pd.DataFrame]:
    """The tables the notebook shows, from the per-(variant, seed) table alone: ``deltas`` (answer
    loss, paired by seed, with the paper's delta on the depth arms), ``accuracy_deltas``,
    ``kbit_deltas``, ``summary`` and ``init`` (step-0 stds)."""
    paper = {v: PAPER_VAL_DELTA for v in dict.fromkeys(table["variant"]) if "depth" in str(v)}
    cols = [c for c in ("output_std", "coverage", "flops_per_token", "total_params") if c in table.columns]
    init_cols = [c for c in ("init_std_before", "init_std", "init_target") if c in table.columns]
    init = table.groupby("variant", sort=False)[init_cols].mean().reset_index() if init_cols else pd.DataFrame()
    return {
        "deltas": paired_deltas(table, "answer_loss", baseline=baseline, paper=paper),
        "accuracy_deltas": paired_deltas(table, "answer_accuracy", baseline=baseline, higher_is_better=True),
        "kbit_deltas": paired_deltas(table, "stored_kbit", baseline=baseline, higher_is_better=True),
        "summary": summarize(table, [*METRICS, *cols]),
        "init": init,
    }


def run(P: SplittingParams) -> SplittingResult:
    """Train every arm x seed on the facts task, compare with S=1 paired by seed, time decode steps."""
    E = P.effective()
    variants = split_variants(E)
    with lab_run(P, NOTEBOOK) as rd:
        table = run_variants(variants, E.seeds, E.data_config(), E.train_config(), rd.path / "train",
                             log=rd.log, context_len=E.context_len, calibrate=E.calibrate_init)
        a = analyse(table, variants[0].name)
        equal = held_equal(variants, E.context_len)
        dev = "cuda" if E.device == "cuda" or (E.device == "auto" and torch.cuda.is_available()) else "cpu"
        cost = pd.concat([decode_profile(v.model, list(E.batch_sizes), repeats=3 if E.smoke else 7, device=dev)
                          .assign(variant=v.name) for v in variants], ignore_index=True)
        figures = {
            "answer_loss_deltas": deltas_figure(a["deltas"], {v: PAPER_VAL_DELTA for v in a["deltas"]["variant"]
                                                              if "depth" in v},
                                                f"Δ answer loss vs {variants[0].name} (paired by seed) and the "
                                                "paper's Δ val loss"),
            "accuracy": variants_figure(table, "answer_accuracy", title="Answer accuracy per arm (seeds, mean ± 95% CI)"),
            "latency": cost_curves_figure(cost, "latency_ms", "Decode-step latency of the whole model (this machine)"),
            "memory_access": cost_curves_figure(cost, "memory_bytes", "Memory bytes read per decode step (cost model)"),
        }
        save_outputs(rd, NOTEBOOK, table, figures,
                     {"deltas": a["deltas"], "accuracy_deltas": a["accuracy_deltas"], "kbit_deltas": a["kbit_deltas"],
                      "held_equal": equal, "init_std": a["init"], "means": a["summary"], "decode_cost": cost})
    return SplittingResult(table, a["summary"], a["deltas"], a["accuracy_deltas"], a["kbit_deltas"], equal,
                           a["init"], cost, figures)


def _row(d: pd.DataFrame, variant: str) -> dict[str, Any] | None:
    r = d[d["variant"] == variant]
    return None if r.empty else r.iloc[0].to_dict()


def _effect(r: dict[str, Any], unit: str, scale: float = 1.0, fmt: str = "+.3f") -> str:
    ci = f"95% CI {scale * r['ci_low']:{fmt}} .. {scale * r['ci_high']:{fmt}}"
    res = r.get("resolution", np.nan)
    res_txt = f", resolution {scale * res:.3g}" if np.isfinite(res) else ""
    return f"{scale * r['delta_mean']:{fmt}} {unit} ({ci}, n = {int(r['n'])}{res_txt})"


def _status(r: dict[str, Any]) -> str:
    return "resolved" if str(r["verdict"]).startswith("resolved") else "not resolved"


def interpret(result: Any) -> str:
    """A paragraph on this run's numbers: each arm's accuracy and loss effect against S=1 (with
    interval and resolution), what separates the same-block split from the split over depth, and
    what the design does not resolve. ``result``: a :class:`SplittingResult` or anything with
    ``accuracy_deltas``, ``deltas`` and ``summary`` tables of :func:`analyse`'s form."""
    acc, loss, summ = result.accuracy_deltas, result.deltas, result.summary
    base = str(acc["reference"].iloc[0]) if len(acc) else "S=1"
    b = summ[summ["variant"] == base]
    base_acc = float(b["answer_accuracy_mean"].iloc[0]) if len(b) else float("nan")
    out = [f"The single memory ({base}) answers {base_acc:.1%} of the facts."]
    if base_acc >= 0.95:
        out.append("That is at the ceiling: improvements cannot show; train less or store more facts.")
    elif base_acc <= 0.05:
        out.append("That is near chance: the run is too short to compare arms; train longer.")
    same, depth = [], []
    for r in acc.to_dict("records"):
        lr = _row(loss, r["variant"]) or {}
        word = "more" if r["delta_mean"] > 0 else "fewer"
        txt = (f"{r['variant']}: {_effect(r, 'accuracy points', 100, '+.1f')}, {word} facts answered "
               f"({_status(r)}); answer loss {_effect(lr, 'nats') if lr else 'n/a'}.")
        (same if "same block" in r["variant"] else depth).append((r, txt))
        out.append(txt)
    resolved_same = [r for r, _ in same if _status(r) == "resolved"]
    resolved_depth = [r for r, _ in depth if _status(r) == "resolved"]
    if same and depth:
        s_mean = float(np.mean([r["delta_mean"] for r, _ in same]))
        d_mean = float(np.mean([r["delta_mean"] for r, _ in depth]))
        if s_mean > d_mean and (resolved_same or resolved_depth):
            out.append("The same S memories do better side by side than spread over the depth, with the same "
                       "values stored and read: what the depth layout changes is WHERE the memories read and "
                       "write. An early memory forms its query after fewer attention layers (here a 5-token "
                       "fact, so less of the subject and relation has been mixed into the query position), and "
                       "its output moves the residual stream that the later memories query, so their addresses "
                       "drift while the values (trained at a high value LR) move fast.")
        elif s_mean < d_mean and (resolved_same or resolved_depth):
            out.append("Spreading the memories over the depth does better than keeping them at one block here: "
                       "the later memories see a query formed by more attention layers.")
    if any(r["delta_mean"] > 0 for r in resolved_same):
        out.append("Splitting at one block helps: S memories with their own keys and queries act like more "
                   "independent heads over disjoint sub-tables (each head pair searches a smaller grid).")
    worse = [r for r in resolved_depth if r["delta_mean"] < 0]
    if worse:
        out.append("The paper's split (with skip links, over a 20-block LM trained on text) lowers validation "
                   f"loss by {abs(PAPER_VAL_DELTA)}; here the depth split costs accuracy. This is a different "
                   "quantity (answer-token accuracy on memorised facts, a 4-block trunk, a few hundred steps), "
                   "so the lab judges direction only, and the direction is opposite at this scale.")
    unresolved = [r for r in acc.to_dict("records") if _status(r) != "resolved"]
    if unresolved:
        res = [float(r["resolution"]) for r in unresolved if np.isfinite(r.get("resolution", np.nan))]
        res_txt = f" (resolution {100 * min(res):.1f}-{100 * max(res):.1f} points)" if res else ""
        out.append(f"Not resolved at n = {int(unresolved[0]['n'])} seeds{res_txt}: "
                   + ", ".join(r["variant"] for r in unresolved) + "; smaller effects than the resolution may "
                   "exist in either direction.")
    out.append("Not measured here: the paper's systems reason for the split (overlapping each memory lookup with "
               "the dense blocks it spans needs a GPU with two streams), and whether the gaps close with longer "
               "training (this is learning speed over a few hundred steps, not capacity).")
    return "\n".join(out)


def describe(result: SplittingResult) -> str:
    """The headline deltas in words (core.describe_deltas): answer loss in nats, then accuracy."""
    return (describe_deltas(result.deltas, "nats") + "\n"
            + describe_deltas(result.accuracy_deltas, "(accuracy, fraction of facts)"))
