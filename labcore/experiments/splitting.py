"""02_layer_splitting: one big memory vs several smaller ones with the same total values.

UltraMem's first structural change (docs/mechanisms.md §1.2) splits PKM's single big memory into S smaller
memory layers with the same total number of values, spread over the depth, each a skip-layer
"k:v" that reads block k's FFN input and adds its output after block v. Two reasons: quality
(Table 2: -0.015 val loss together with the skip links) and systems (each small lookup can overlap
with the dense blocks it spans; a single huge table unbalances devices).

For each (S memories, skip span) this notebook trains the model for several seeds and measures:
quality (validation loss, knowledge recall); the decode-step latency of the whole model on this
machine (labcore.profiling.time_fn, B tokens of one new position each); and the memory bytes
a decode step reads, from the analytical cost model (expected distinct values,
N·[1 - (1 - m/N)^B] per memory, plus each memory's keys and projections read once per step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from labcore.experiments.common import lab_run, save_outputs
from labcore.experiments.core import Variant, paired_deltas, run_variants, summarize
from labcore.experiments.params import SplittingParams
from labcore.layers.ultramem import UltraMemConfig
from labcore.lm.model import LM, ModelConfig, SparsePlan, spread_placements
from labcore.profiling.cost_model import layer_step_cost
from labcore.profiling.timer import time_fn
from labcore.viz.figures import cost_curves_figure, deltas_figure, variants_figure

NOTEBOOK = "02_layer_splitting"


def split_variants(P: SplittingParams) -> list[Variant]:
    D = P.d_model
    out = []
    for s in P.splits:
        n = math.isqrt(P.total_values // s)
        mem = UltraMemConfig(d_model=D, n_keys=n, heads=2, k_dim=max(8, D // 2), top_k=P.top_k,
                             d_value=D // 2, rank=2, n_cores=2, expansion=1)
        for span in P.spans:
            placements = spread_placements(s, P.n_layers, span)
            out.append(Variant(f"{s}x{n}² span {span}",
                               P.model(SparsePlan(kind="memory", memory=mem, placements=placements)),
                               tags={"memories": s, "span": span, "n_keys": n,
                                     "placements": "/".join(placements)}))
    return out


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
    table: pd.DataFrame
    summary: pd.DataFrame
    deltas: pd.DataFrame
    cost: pd.DataFrame
    figures: dict[str, Any]


def run(P: SplittingParams) -> SplittingResult:
    E = P.effective()
    variants = split_variants(E)
    with lab_run(P, NOTEBOOK) as rd:
        table = run_variants(variants, E.seeds, E.data_config(), E.train_config(), rd.path / "train", log=rd.log)
        summary = summarize(table, ["val_loss", "recall_qa", "flops_per_token"])
        deltas = paired_deltas(table, "val_loss", baseline=variants[0].name)
        dev = "cuda" if E.device == "cuda" or (E.device == "auto" and torch.cuda.is_available()) else "cpu"
        cost = pd.concat([decode_profile(v.model, list(E.batch_sizes), repeats=3 if E.smoke else 7, device=dev)
                          .assign(variant=v.name) for v in variants], ignore_index=True)
        figures = {
            "val_loss": variants_figure(table, "val_loss", title="Validation loss: one big memory vs split"),
            "deltas": deltas_figure(deltas, None, f"Δ val loss vs {variants[0].name} (paired by seed)"),
            "latency": cost_curves_figure(cost, "latency_ms", "Decode-step latency of the whole model (this machine)"),
            "memory_access": cost_curves_figure(cost, "memory_bytes", "Memory bytes read per decode step (cost model)"),
        }
        save_outputs(rd, NOTEBOOK, table, figures, {"means": summary, "deltas": deltas, "decode_cost": cost})
    return SplittingResult(table, summary, deltas, cost, figures)

