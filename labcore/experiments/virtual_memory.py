"""03_virtual_memory: implicit value expansion (IVE), E virtual values per physical value.

IVE (docs/mechanisms.md §1.4) gives the memory E x N *virtual* slots while storing only N physical values:
keys per side grow by √E, a fixed random permutation maps each virtual slot to (physical row,
projector block p), the selected values are summed per block, and E projectors — one linear map
E·D_v -> D — turn the E pooled vectors into the output. No extra value bytes are read; the extra
cost is the larger key tables, the bigger candidate grid and the projection (E·D_v·D per token).

This notebook trains E in {1, 4, 9, 16} at otherwise identical UltraMem configs and reports
quality against FLOPs per token (from labcore.lm.budget) and the coverage of virtual slots.
Paper (Table 3): E = 4 / 9 / 16 -> -0.017 / -0.025 / -0.027 val loss at +6.6 / +14.9 / +26.4% FLOPs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from labcore.experiments.common import lab_run, save_outputs
from labcore.experiments.core import Variant, paired_deltas, run_variants, summarize
from labcore.experiments.params import VirtualMemoryParams
from labcore.layers.ultramem import UltraMemConfig
from labcore.lm.model import SparsePlan
from labcore.viz.figures import deltas_figure, variants_figure, xy_figure

NOTEBOOK = "03_virtual_memory"
PAPER_VAL_DELTAS = {"E=4": -0.017, "E=9": -0.025, "E=16": -0.027}
PAPER_FLOPS_INCREASE = {"E=4": 0.066, "E=9": 0.149, "E=16": 0.264}


def ive_variants(P: VirtualMemoryParams) -> list[Variant]:
    D, mid = P.d_model, P.n_layers // 2
    base = UltraMemConfig(d_model=D, n_keys=P.n_keys, heads=2, k_dim=max(8, D // 2), top_k=P.top_k,
                          d_value=D // 2, rank=2, n_cores=2, expansion=1)
    return [Variant(f"E={e}", P.model(SparsePlan(kind="memory", memory=dataclasses.replace(base, expansion=e),
                                                 placements=(f"{mid}:{mid}",))),
                    tags={"expansion": e, "virtual_slots": e * P.n_keys ** 2, "keys_per_side": math.isqrt(e) * P.n_keys})
            for e in sorted(P.expansions)]


@dataclass
class VirtualMemoryResult:
    table: pd.DataFrame
    summary: pd.DataFrame
    deltas: pd.DataFrame
    figures: dict[str, Any]


def run(P: VirtualMemoryParams) -> VirtualMemoryResult:
    E = P.effective()
    variants = ive_variants(E)
    with lab_run(P, NOTEBOOK) as rd:
        table = run_variants(variants, E.seeds, E.data_config(), E.train_config(), rd.path / "train", log=rd.log)
        base_flops = float(table.loc[table["variant"] == "E=1", "flops_per_token"].iloc[0])
        table["flops_increase"] = table["flops_per_token"] / base_flops - 1.0
        summary = summarize(table, ["val_loss", "recall_qa", "coverage", "flops_per_token", "flops_increase"])
        deltas = paired_deltas(table, "val_loss", baseline="E=1")
        deltas["paper_delta"] = deltas["variant"].map(PAPER_VAL_DELTAS)
        deltas["paper_flops_increase"] = deltas["variant"].map(PAPER_FLOPS_INCREASE)
        deltas = deltas.merge(summary[["variant", "flops_increase_mean"]], on="variant")
        figures = {
            "loss_vs_flops": xy_figure(summary, "flops_per_token", "val_loss",
                                       title="Validation loss vs FLOPs per token (mean ± 95% CI)"),
            "deltas_vs_paper": deltas_figure(deltas, PAPER_VAL_DELTAS, "Δ val loss vs E=1: lab vs paper"),
            "coverage": variants_figure(table, "coverage", title="Virtual-slot coverage on validation batches"),
        }
        save_outputs(rd, NOTEBOOK, table, figures, {"deltas_vs_E1": deltas, "means": summary})
    return VirtualMemoryResult(table, summary, deltas, figures)
