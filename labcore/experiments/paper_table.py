"""05_paper_table: the UltraMem paper's Table 2 walked at lab scale, one switch at a time.

Table 2 of the paper (docs/mechanisms.md §1.8) starts from a PKM model and adds UltraMem's changes one row
at a time, each row keeping all the previous ones. Here every row is an
:class:`~labcore.layers.ultramem.UltraMemConfig` (plus the model's placements and one training
switch), so the walk is a list of configs that differ in exactly one place:

====================  ================================================  =========================
row                   what changes (cumulative)                         paper Δ val loss
====================  ================================================  =========================
PKM                   additive product keys, softmax, D_v = D, 1 memory  (2.828)
+rm softmax           score_activation "softmax" -> "none"               -0.006
+half vdim + proj     D_v = D/2, twice the values (n·√2 keys), out proj  -0.022
+share query          heads share one query                              +0.003
+split big mem&skip   2 memories, half the values each, skip span 1      -0.015
+query/key LN         qk_norm on                                         +0.001
+IVE                  expansion E = 4 (virtual values, one projector)    -0.017
+TDQKR                Tucker scoring, rank R = 2                         -0.008
+MCS                  2 Tucker cores, each weights its value slice       -0.003
+improved init        init "paper" (values N(0, E/(2mHL)), gains calib.) -0.003
+value lr decay       value LR x4 -> x1 over the run (else constant x1)  -0.022
====================  ================================================  =========================

The paper's "+query conv" row (-0.001 train, 0.000 val) is not walked: the released layers do not
have it either (docs/mechanisms.md §1.6). Each row is trained for ``n_seeds`` seeds; differences to the
previous row are paired by seed, and a difference whose 95% CI contains zero is reported as inside
seed noise: at lab scale most single rows are, which is the honest reading of the table.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from labcore.experiments.common import lab_run, save_outputs
from labcore.experiments.core import Variant, paired_deltas, run_variants, summarize
from labcore.experiments.params import PAPER_VAL_DELTAS, ROWS, PaperTableParams
from labcore.layers.ultramem import UltraMemConfig
from labcore.lm.model import SparsePlan, spread_placements
from labcore.viz.figures import deltas_figure, history_lines, variants_figure

NOTEBOOK = "05_paper_table"


def table2_variants(P: PaperTableParams) -> list[Variant]:
    """The cumulative walk PKM -> UltraMem as Variants (only the rows in ``P.rows``)."""
    D, L = P.d_model, P.n_layers
    mid = L // 2
    mem = UltraMemConfig(d_model=D, n_keys=P.n_keys, heads=P.heads, k_dim=max(8, D // 2), top_k=P.top_k,
                         d_value=D, rank=1, n_cores=1, expansion=1, scoring="additive",
                         score_activation="softmax", qk_norm=False, share_query=False, value_proj=False,
                         init="release", n_model_layers=1)
    placements: tuple[str, ...] = (f"{mid}:{mid}",)
    value_lr = 1.0
    out: list[Variant] = []
    for row in ROWS:
        if row == "+rm softmax":
            mem = dataclasses.replace(mem, score_activation="none")
        elif row == "+half vdim + proj":  # halve D_v, double the number of values, add the projection
            mem = dataclasses.replace(mem, d_value=D // 2, value_proj=True,
                                      n_keys=round(mem.n_keys * math.sqrt(2)))
        elif row == "+share query":
            mem = dataclasses.replace(mem, share_query=True)
        elif row == "+split big mem & skip":  # two memories with half the values each, skip span 1
            n_half = max(P.top_k, round(mem.n_keys / math.sqrt(2)))
            mem = dataclasses.replace(mem, n_keys=n_half)
            placements = spread_placements(2, L, 1)
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
            value_lr = 4.0
        if row in P.rows:
            plan = SparsePlan(kind="memory", memory=mem, placements=placements)
            out.append(Variant(row, P.model(plan), train_overrides={"value_lr_multiplier": value_lr},
                               tags={"row": len(out)}))
    return out


@dataclass
class PaperTableResult:
    table: pd.DataFrame      # one row per (row, seed)
    summary: pd.DataFrame    # mean / std / 95% CI per row
    deltas: pd.DataFrame     # each row vs the previous one, paired by seed, with the paper's delta
    history: pd.DataFrame
    figures: dict[str, Any]


def run(P: PaperTableParams) -> PaperTableResult:
    """Train the walk, write summary.parquet, history.jsonl and figures into ``P.out_dir``."""
    E = P.effective()
    variants = table2_variants(E)
    order = [v.name for v in variants]
    with lab_run(P, NOTEBOOK) as rd:
        table = run_variants(variants, E.seeds, E.data_config(), E.train_config(), rd.path / "train",
                             log=rd.log)
        summary = summarize(table, ["val_loss", "recall_qa", "recall_bio", "flops_per_token",
                                    "total_params"])
        deltas = paired_deltas(table, "val_loss", chain=True, order=order)
        deltas["paper_delta"] = deltas["variant"].map(PAPER_VAL_DELTAS)
        history = rd.history()
        figures = {
            "val_loss_per_row": variants_figure(table, "val_loss", order, "Validation loss along Table 2"),
            "deltas_vs_paper": deltas_figure(deltas, PAPER_VAL_DELTAS,
                                             "Δ val loss per change: lab (paired by seed) vs paper"),
            "train_loss": history_lines(history, "loss", "Training loss per row"),
        }
        save_outputs(rd, NOTEBOOK, table, figures, {"deltas_vs_previous_row": deltas, "means": summary})
    return PaperTableResult(table, summary, deltas, history, figures)
