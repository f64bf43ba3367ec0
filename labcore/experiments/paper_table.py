"""05_paper_table: the UltraMem paper's Table 2 walked on the facts task, one switch at a time.

Table 2 of the paper (arXiv 2411.12364 §4.3; docs/mechanisms.md §1.8) starts from a PKM model and
adds UltraMem's changes one row at a time, each row keeping all the previous ones. Here every row is
an :class:`~labcore.layers.ultramem.UltraMemConfig` (plus the model's placements and one training
switch), so the walk is a list of configs that differ in exactly one place:

=======================  ================================================  ==================
row                      what changes (cumulative)                         paper Δ val loss
=======================  ================================================  ==================
PKM                      additive product keys, softmax, D_v = D, 1 memory  (2.828)
+rm softmax              score_activation "softmax" -> "none"               -0.006
+half vdim + proj        D_v = D/2, twice the values (n·√2 keys), out proj  -0.022
+share query             heads share one query                              +0.003
+split big mem & skip    2 memories at equal total AND activated values     -0.015
+query/key LN            qk_norm on                                         +0.001
+IVE                     expansion E = 4 (virtual values, one projector)    -0.017
+TDQKR                   Tucker scoring, rank R = 2                         -0.008
+MCS                     2 Tucker cores, each weights its value slice       -0.003
+improved init           init "paper" (values N(0, E/(2KHL)), gains calib.) -0.003
+value lr decay          value LR x M -> x1 over the run (else constant x1) -0.022
=======================  ================================================  ==================

The task is the facts task (:class:`~labcore.experiments.params.LabParams`): each row is trained
for several seeds (a seed fixes the init and the batch order, so rows pair by seed), and each row is
compared with the previous one, paired by seed, on the answer token (answer loss in nats, the
headline; accuracy and stored kbit beside it), the rows forming one family with Holm-adjusted
p-values (:func:`labcore.experiments.core.paired_deltas`).

The paper's deltas are the validation loss of a 151M-activated-parameter LM after ~1T tokens; the
lab's are the answer-token loss of a D = 32 trunk after a few hundred steps. They are not the same
quantity: the notebook shows the paper's number as its claim and judges the *direction* only
(:func:`direction_table`). Two rows cannot be applied as the paper did on this trunk; they say so in
:func:`row_notes` rather than silently differ (the skip needs more than two blocks; the calibrated
init replaces the absolute value scale the "improved init" row sets).

The paper's "+query conv" row (-0.001 train, 0.000 val) is not walked: the released layers do not
have it either (docs/mechanisms.md §1.6).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from labcore.experiments import stats
from labcore.experiments.common import lab_run, save_outputs
from labcore.experiments.core import Variant, paired_deltas, run_variants, summarize
from labcore.experiments.params import PAPER_VAL_DELTAS, ROWS, PaperTableParams
from labcore.layers.ultramem import UltraMem, UltraMemConfig
from labcore.lm.budget import model_budget
from labcore.lm.model import SparsePlan, spread_placements
from labcore.viz.figures import deltas_figure, variants_figure

__all__ = ["PaperTableParams", "ROWS", "PAPER_VAL_DELTAS", "NOTEBOOK", "pkm_row_memory", "table2_variants",
           "walk_table", "row_notes", "direction_table", "tiny_forward", "interpret", "run", "PaperTableResult"]

NOTEBOOK = "05_paper_table"

# What each row changes (cumulative), for the walk table.
ROW_CHANGE = {
    "PKM": "additive product keys, softmax weights, D_v = D, one memory beside the middle block's FFN",
    "+rm softmax": "raw scores instead of softmax weights",
    "+half vdim + proj": "D_v = D/2 with a D_v -> D projection; n·√2 keys per side (twice the values)",
    "+share query": "one query shared by all heads",
    "+split big mem & skip": "two memories, half the values and half the top-K each, skip span 1",
    "+query/key LN": "LayerNorm on queries and keys",
    "+IVE": "implicit value expansion E = 4 (4x virtual values, one projector per block)",
    "+TDQKR": "Tucker-decomposed query-key retrieval, rank R = 2",
    "+MCS": "multi-core scoring: 2 Tucker cores, each weights its slice of the values",
    "+improved init": "the paper's init: value std sqrt(E / (2 K H L)), calibrated q/k gains",
    "+value lr decay": "value LR x M decaying to x1 over the run (earlier rows: x1)",
}


def pkm_row_memory(P: PaperTableParams) -> UltraMemConfig:
    """The first row: PKM written as an UltraMemConfig (additive scores, softmax, full-width values)."""
    return UltraMemConfig(d_model=P.d_model, n_keys=P.n_keys, heads=P.heads, k_dim=P.k_dim, top_k=P.top_k,
                          d_value=P.d_model, rank=1, n_cores=1, expansion=1, scoring="additive",
                          score_activation="softmax", qk_norm=False, share_query=False, value_proj=False,
                          init="release", n_model_layers=1)


def table2_variants(P: PaperTableParams) -> list[Variant]:
    """The cumulative walk PKM -> UltraMem as Variants (only the rows in ``P.rows``; a skipped row's
    change still applies to the rows after it). Tags: ``row`` (position in Table 2), ``n_memories``."""
    D, L, mid = P.d_model, P.n_layers, P.n_layers // 2
    mem = pkm_row_memory(P)        # the memory as if it were one (split: see _plan)
    n_mem, value_lr = 1, 1.0
    out: list[Variant] = []
    for i, row in enumerate(ROWS):
        if row == "+rm softmax":
            mem = dataclasses.replace(mem, score_activation="none")
        elif row == "+half vdim + proj":  # halve D_v, double the number of values, add the projection
            mem = dataclasses.replace(mem, d_value=D // 2, value_proj=True, n_keys=round(mem.n_keys * math.sqrt(2)))
        elif row == "+share query":
            mem = dataclasses.replace(mem, share_query=True)
        elif row == "+split big mem & skip":
            n_mem = 2
        elif row == "+query/key LN":
            mem = dataclasses.replace(mem, qk_norm=True)
        elif row == "+IVE":
            mem = dataclasses.replace(mem, expansion=4)
        elif row == "+TDQKR":
            mem = dataclasses.replace(mem, scoring="tucker", rank=2)
        elif row == "+MCS":
            mem = dataclasses.replace(mem, n_cores=2)
        elif row == "+improved init":
            mem = dataclasses.replace(mem, init="paper")
        elif row == "+value lr decay":
            value_lr = P.value_lr_multiplier
        if row in P.rows:
            out.append(Variant(row, P.model(_plan(mem, n_mem, L, mid)),
                               train_overrides={"value_lr_multiplier": value_lr},
                               tags={"row": i, "n_memories": n_mem}))
    return out


def _plan(mem: UltraMemConfig, n_mem: int, L: int, mid: int) -> SparsePlan:
    """One memory beside block ``mid``'s FFN, or the split: ``n_mem`` memories of n_s = round(n /
    sqrt(S)) keys per side (S * n_s^2 = N up to the rounding) and top-K / S slots per head (S * H *
    K / S = H * K value rows read per token: equal activated values, labcore.lm.model.split_memory_plan's
    rule), placed with skip span 1 by :func:`~labcore.lm.model.spread_placements`. ``n_model_layers``
    (the L of the paper init) is the number of memories."""
    if n_mem == 1:
        return SparsePlan(kind="memory", memory=mem, placements=(f"{mid}:{mid}",))
    small = dataclasses.replace(mem, n_keys=round(mem.n_keys / math.sqrt(n_mem)), top_k=mem.top_k // n_mem,
                                n_model_layers=n_mem)
    return SparsePlan(kind="memory", memory=small, placements=spread_placements(n_mem, L, 1))


# ----------------------------------------------------------------------------------------------
# What the walk builds, and where it departs from the paper.
# ----------------------------------------------------------------------------------------------


def walk_table(variants: list[Variant], context_len: int) -> pd.DataFrame:
    """Per row: what it changes, memories and placements, physical and virtual value rows, value rows
    read per token, total parameters, FLOPs per token and the value-LR multiplier."""
    rows = []
    for v in variants:
        m, plan = v.model.plan.memory, v.model.plan
        b = model_budget(v.model, context_len=context_len)
        S = len(plan.placements)
        rows.append({"row": v.name, "change": ROW_CHANGE[v.name], "memories": S, "placements": "/".join(plan.placements),
                     "n_keys": m.n_keys, "values": S * m.n_slots, "virtual_values": S * m.n_virtual,
                     "rows_read_per_token": S * m.heads * m.top_k, "d_value": m.d_v, "total_params": b.total_params,
                     "flops_per_token": b.flops_per_token,
                     "value_lr_multiplier": float(v.train_overrides.get("value_lr_multiplier", 1.0))})
    return pd.DataFrame(rows)


def row_notes(P: PaperTableParams) -> pd.DataFrame:
    """Per row of Table 2 (and the row that is not walked): the paper's delta, whether the lab applies
    the change as the paper did ("as in the paper", "adapted", "not walked") and why."""
    E = P.effective()
    vs = {v.name: v for v in table2_variants(dataclasses.replace(E, rows=list(ROWS)))}
    split = vs["+split big mem & skip"].model.plan
    before = vs["+share query"].model.plan.memory
    same_place = len(set(split.placements)) < len(split.placements)
    notes: dict[str, tuple[str, str]] = {
        "PKM": ("adapted", "PKM written as an UltraMem layer with additive scores and softmax weights (the same "
                "read as PKM), no query bias; values train at the trunk's LR (x1) until the last row"),
        "+half vdim + proj": ("as in the paper", f"n = {P.n_keys} -> {before.n_keys} keys per side: "
                              f"{before.n_slots} values vs 2 x {P.n_keys ** 2} (n·√2 rounded)"),
        "+share query": ("as in the paper", "labcore shares one query among all H heads (the release: pairs of "
                         f"heads); identical at H = 2 (here H = {P.heads})"),
        "+split big mem & skip": (
            "adapted" if same_place or E.n_layers < 4 else "as in the paper",
            f"2 memories of {split.memory.n_keys}^2 values and top-{split.memory.top_k} per head (equal total "
            "AND activated values; the paper's split also lowers FLOPs) at " + "/".join(split.placements)
            + (f": on a {E.n_layers}-block trunk both memories read after block 0's attention and add after "
               "block 1, so the split does not spread them over depth as the paper's does"
               if same_place else ": skip span 1")),
        "+improved init": (
            "adapted" if E.calibrate_init else "as in the paper",
            "every row's memory output is calibrated to the FFN output std at step 0 (calibrate_init), which "
            "replaces the absolute value scale the paper's init sets: what this row still changes is the "
            "q/k-norm gain calibration and the value scale relative to the projection"
            if E.calibrate_init else "values N(0, E / (2 K H L)) and calibrated q/k gains, uncalibrated"),
        "+value lr decay": ("as in the paper", f"value LR x{E.value_lr_multiplier:g} decaying linearly to x1 "
                            "(earlier rows: x1), the only row that changes training"),
        "+query conv": ("not walked", "not in the released layers either (docs/mechanisms.md §1.6); paper: "
                        "-0.001 train, 0.000 validation"),
    }
    rows = []
    for r in (*ROWS, "+query conv"):
        status, why = notes.get(r, ("as in the paper", ROW_CHANGE.get(r, "")))
        rows.append({"row": r, "paper_delta_val_loss": PAPER_VAL_DELTAS.get(r, 0.0 if r == "+query conv"
                                                                             else float("nan")),
                     "applied": status, "why": why})
    return pd.DataFrame(rows)


def _direction(delta: float, resolved: bool) -> str:
    if not resolved:
        return "not resolved"
    return "better" if delta < 0 else "worse"


def direction_table(deltas: pd.DataFrame) -> pd.DataFrame:
    """The paper's sign against the lab's, row by row, for a chained answer-loss deltas table with a
    ``paper_delta`` column (lower is better in both): ``lab_direction`` is "better" / "worse" only
    when the difference is resolved (Holm), ``agreement`` "same direction", "opposite" or "not
    resolved"."""
    out = []
    for r in deltas.to_dict("records"):
        resolved = str(r["verdict"]).startswith("resolved")
        paper = r.get("paper_delta", float("nan"))
        pdir = "n/a" if not np.isfinite(paper) else ("better" if paper < 0 else "worse")
        ldir = _direction(float(r["delta_mean"]), resolved)
        agree = ("not resolved" if not resolved else "n/a" if pdir == "n/a"
                 else "same direction" if ldir == pdir else "opposite")
        out.append({"row": r["variant"], "paper_delta_val_loss": paper, "paper_direction": pdir,
                    "lab_delta_answer_loss": r["delta_mean"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                    "p_holm": r["p_holm"], "lab_direction": ldir, "agreement": agree})
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------------------------
# Teaching: one token through a tiny UltraMem (the walk's last row).
# ----------------------------------------------------------------------------------------------


def tiny_layer(seed: int = 0) -> UltraMem:
    """A tiny UltraMem with every switch of the walk's last row: D = 16, n = 2 physical keys per side
    (N = 4 values), E = 4 (4 x 4 virtual grid), 2 heads sharing one query, top-2, rank R = 2, 2 cores,
    D_v = 8, q/k LayerNorm, paper init; the search scores every cell (exact)."""
    torch.manual_seed(seed)
    cfg = UltraMemConfig(d_model=16, n_keys=2, heads=2, k_dim=4, top_k=2, d_value=8, rank=2, n_cores=2,
                         expansion=4, candidate_m=4, init="paper", seed=seed)
    return UltraMem(cfg).eval()


def tiny_forward(seed: int = 0, tokens: int = 2) -> pd.DataFrame:
    """One forward pass through :func:`tiny_layer`, step by step (UltraMem eqs. of docs/mechanisms.md
    §1.3-§1.5): rows (step, tensor shape, meaning). The step-by-step output is checked against the
    layer's own forward (AssertionError if they differ)."""
    from labcore.layers.tucker import reference_qk_norm

    layer = tiny_layer(seed)
    c = layer.cfg
    torch.manual_seed(seed + 1)
    x = torch.randn(tokens, c.d_model)                                      # (T, D)
    rows: list[dict[str, Any]] = []

    def add(step: str, t: torch.Tensor | tuple[int, ...], meaning: str) -> None:
        rows.append({"step": step, "shape": tuple(t.shape) if isinstance(t, torch.Tensor) else t, "meaning": meaning})

    H, K, h, N, n_s = c.heads, c.top_k, c.n_cores, c.n_slots, c.n_side
    Dc = c.d_v // h
    with torch.no_grad():
        q = (x @ layer.query.weight.T).view(tokens, c.q_heads, 2, c.k_dim)  # (T, Hq, 2, D_k)
        q = reference_qk_norm(q, layer.query_gain, c.norm_type, c.norm_eps)
        keys = reference_qk_norm(layer.keys, layer.key_gain, c.norm_type, c.norm_eps)  # (H, 2, R, n_s, D_k)
        s_row = torch.einsum("hrnd,td->thrn", keys[:, 0], q[:, 0, 0])      # (T, H, R, n_s)
        s_col = torch.einsum("hrnd,td->thrn", keys[:, 1], q[:, 0, 1])      # (T, H, R, n_s)
        grids = torch.einsum("thri,chrs,thsj->thcij", s_row, layer.cores, s_col)  # (T, H, h, n_s, n_s)
        total = grids.sum(2).flatten(-2)                                    # (T, H, n_s^2)
        top, slots = total.topk(K, dim=-1)                                  # (T, H, K) virtual slots
        per_core = torch.gather(grids.flatten(-2), -1, slots[:, :, None].expand(-1, -1, h, -1))  # (T, H, h, K)
        perm = layer.perm if layer.perm is not None else torch.arange(c.n_virtual)
        shuffled = perm[slots]                                              # (T, H, K)
        phys, block = shuffled % N, torch.div(shuffled, N, rounding_mode="floor")
        pooled = torch.zeros(tokens, c.expansion, c.d_v)                    # (T, E, D_v)
        V = layer.values.weight                                             # (N, D_v)
        for t in range(tokens):
            for hd in range(H):
                for k in range(K):
                    for core in range(h):
                        ch = slice(core * Dc, (core + 1) * Dc)
                        pooled[t, block[t, hd, k], ch] += per_core[t, hd, core, k] * V[phys[t, hd, k], ch]
        y = layer.value_proj(pooled.flatten(1))                             # (T, D)
        y_layer, _ = layer(x)
    if not torch.allclose(y, y_layer, atol=1e-5):
        raise AssertionError("tiny_forward: the step-by-step UltraMem read differs from the layer's forward")
    add("x", x, "T tokens of width D")
    add("q = LN(x W_q)", q, f"one query shared by the H = {H} heads: a row half and a column half of D_k each")
    add("S_row = K_row q_row", s_row, f"per head, R = {c.rank} score vectors over n_s = {n_s} row keys")
    add("S_col = K_col q_col", s_col, "the same over the column keys")
    add("G^(c) = S_row^T C^(c) S_col", grids, f"TDQKR grid per core (h = {h} cores, MCS): n_s x n_s virtual slots")
    add("top-K of sum_c G^(c)", slots, f"K = {K} virtual slots per head (of n_s^2 = {n_s * n_s})")
    add("per-core scores s^(c)", per_core, "each core's score of the selected slots (no softmax)")
    add("IVE: slot -> (physical row, block)", phys, f"E = {c.expansion} virtual rows per physical row (N = {N}): "
        "a fixed permutation picks the row and the projector block")
    add("pooled[block, chunk c] += s^(c) V[row, chunk c]", pooled, f"E x D_v: each core weights its D_v/h = {Dc} slice")
    add("y = W_p pooled", y, "the projection (E*D_v -> D); equals the layer's own forward")
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


@dataclass
class PaperTableResult:
    table: pd.DataFrame       # one row per (row, seed)
    summary: pd.DataFrame     # mean / std / 95% CI per row
    deltas: pd.DataFrame      # headline: answer loss, each row vs the previous one, paired by seed, Holm
    directions: pd.DataFrame  # the paper's sign vs the lab's, per row
    accuracy: pd.DataFrame    # answer accuracy, chained the same way
    net: pd.DataFrame         # the last walked row vs PKM
    walk: pd.DataFrame        # what each row builds (params, FLOPs, values)
    notes: pd.DataFrame       # rows applied as in the paper / adapted / not walked, and why
    init: pd.DataFrame        # step-0 memory output stds per row
    figures: dict[str, Any]


def run(P: PaperTableParams) -> PaperTableResult:
    """Train the walk, write run.json, history.jsonl, summary.parquet, the key tables (headline
    deltas first) and the figures into ``P.out_dir``."""
    E = P.effective()
    variants = table2_variants(E)
    order = [v.name for v in variants]
    walk = walk_table(variants, E.context_len)
    notes = row_notes(E)
    with lab_run(P, NOTEBOOK) as rd:
        table = run_variants(variants, E.seeds, E.data_config(), E.train_config(), rd.path / "train", log=rd.log,
                             calibrate=E.calibrate_init)
        summary = summarize(table, ["answer_loss", "answer_accuracy", "stored_kbit", "flops_per_token",
                                    "total_params"])
        deltas = paired_deltas(table, "answer_loss", chain=True, order=order, paper=PAPER_VAL_DELTAS)
        directions = direction_table(deltas)
        deltas["agreement_with_paper"] = directions["agreement"].to_numpy()
        accuracy = paired_deltas(table, "answer_accuracy", chain=True, order=order, higher_is_better=True)
        net = pd.concat([paired_deltas(table[table["variant"].isin([order[0], order[-1]])], m, baseline=order[0],
                                       order=[order[0], order[-1]], higher_is_better=hib)
                         for m, hib in (("answer_loss", False), ("answer_accuracy", True), ("stored_kbit", True))],
                        ignore_index=True) if len(order) > 1 else pd.DataFrame()
        init = (table.groupby("variant", sort=False)[["init_std_before", "init_std", "init_target"]].mean()
                .reset_index().rename(columns={"variant": "row"}))
        figures = {
            "deltas_vs_paper": deltas_figure(deltas, PAPER_VAL_DELTAS,
                                             "Δ answer loss per change (lab, paired by seed) vs the paper's Δ val loss"),
            "answer_loss_per_row": variants_figure(table, "answer_loss", order, "Answer loss along Table 2"),
            "accuracy_per_row": variants_figure(table, "answer_accuracy", order, "Answer accuracy along Table 2"),
        }
        save_outputs(rd, NOTEBOOK, table, figures, {
            "deltas_vs_previous_row": deltas, "direction_vs_paper": directions, "accuracy_vs_previous_row": accuracy,
            "walk_net": net, "walk": walk, "row_notes": notes, "init_std_step0": init, "means": summary})
    return PaperTableResult(table, summary, deltas, directions, accuracy, net, walk, notes, init, figures)


# ----------------------------------------------------------------------------------------------
# Reading the run.
# ----------------------------------------------------------------------------------------------


def interpret(result: Any) -> str:
    """A paragraph on this walk, written from its tables: where the PKM row starts (off or on its
    ceiling), where the walk ends, which rows moved the answer loss (resolved, with direction against
    the paper's), the resolution against the paper's deltas, and what the walk does not resolve.

    ``result``: a :class:`PaperTableResult`, or anything with ``table`` (one row per (variant, seed)
    with ``answer_accuracy`` and ``answer_loss``) and ``deltas`` (a chained answer-loss paired-deltas
    table with ``paper_delta``)."""
    t, d = result.table, result.deltas
    order = list(dict.fromkeys(t["variant"]))
    acc = t.groupby("variant", sort=False)["answer_accuracy"].mean()
    loss = t.groupby("variant", sort=False)["answer_loss"].mean()
    first, last = order[0], order[-1]
    out = [f"The walk starts at {first} with answer accuracy {acc[first]:.2f} (answer loss {loss[first]:.2f} nats)"
           + (", off its ceiling, so a change can show either way" if 0.05 < acc[first] < 0.95 else
              ", at the edge of the measurable range, which hides effects in one direction")
           + f", and ends at {last} with {acc[last]:.2f} ({loss[last]:.2f} nats)."]
    if len(order) > 1:
        wide = t.pivot_table(index="seed", columns="variant", values="answer_accuracy")
        net = stats.paired_difference(wide[last].to_numpy(), wide[first].to_numpy())
        clear = len(wide) >= 2 and (net.ci_low > 0 or net.ci_high < 0)
        out.append(f"Net effect of the walk: {100 * net.mean:+.1f} accuracy points (95% CI {100 * net.ci_low:+.1f} .. "
                   f"{100 * net.ci_high:+.1f})" + (
                       ("; on this trunk the paper's changes together slow the learning of facts." if net.mean < 0
                        else "; the paper's changes together help here.") if clear
                       else ", not resolved at this n."))
    res = [r for r in d.to_dict("records") if str(r["verdict"]).startswith("resolved")]
    if res:
        parts = []
        for r in res:
            paper = r.get("paper_delta", float("nan"))
            way = ("" if not np.isfinite(paper) else
                   " (the paper's direction)" if np.sign(paper) == np.sign(r["delta_mean"]) else
                   f" (against the paper's {paper:+.3f})")
            parts.append(f"{r['variant']} {r['delta_mean']:+.3f} nats{way}")
        out.append(f"{len(res)} of {len(d)} changes are resolved after Holm correction: " + "; ".join(parts) + ".")
    else:
        out.append(f"None of the {len(d)} changes is resolved after Holm correction.")
    hint = [r for r in d.to_dict("records") if not str(r["verdict"]).startswith("resolved")
            and (r["ci_low"] > 0 or r["ci_high"] < 0)]
    if hint:
        out.append("Suggestive only (the 95% interval of the single comparison excludes zero, the Holm-corrected "
                   "test over the family does not): " + "; ".join(
                       f"{r['variant']} {r['delta_mean']:+.3f} nats" for r in hint) + ".")
    resolution = d["resolution"].to_numpy(dtype=float)
    paper = d.get("paper_delta", pd.Series(dtype=float)).to_numpy(dtype=float)
    finite = np.isfinite(resolution)
    if finite.any():
        out.append(f"The design resolves answer-loss changes of {np.nanmin(resolution):.3g} to "
                   f"{np.nanmax(resolution):.3g} nats at n={int(d['n'].max())} seeds")
        if np.isfinite(paper).any():
            need = d["seeds_needed"].to_numpy(dtype=float) if "seeds_needed" in d else np.array([np.nan])
            need_txt = (f"; about {int(np.nanmedian(need))} seeds (median) would resolve changes of the paper's size"
                        if np.isfinite(need).any() else "")
            out[-1] += (f", while the paper's deltas are {np.nanmin(np.abs(paper)):.3f} to "
                        f"{np.nanmax(np.abs(paper)):.3f} nats of validation loss (another quantity on another model: "
                        f"only their direction is compared){need_txt}.")
        else:
            out[-1] += "."
    return " ".join(out)
