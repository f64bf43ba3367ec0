"""04_architectures: Dense vs MoE vs the memory layers (PKM, UltraMem, any registered one) at equal budget.

The paper's comparison (docs/mechanisms.md §2.1, §7): all models have the same forward FLOPs per
token, and the sparse ones (MoE and every registered memory) the same total parameters (``ratio`` x
the dense model's parameters in sparse parts, the paper's "x12").
:func:`labcore.lm.budget.equal_budget_family` sizes them within 2%. This notebook trains each for
several seeds on the knowledge task (quality: validation loss and knowledge recall), and measures
inference cost vs batch size with :func:`labcore.bench.inference.run_inference_bench`, what
``labcore bench inference`` runs (decode-step latency, memory bytes read, the MoE/UltraMem latency
ratio; docs/mechanisms.md §7.2 explains why MoE reads more as B grows: a handful of tokens already
touches almost every expert, while memory layers touch B·H·K value rows out of N).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from labcore.bench.inference import moe_ultramem_ratio, run_inference_bench
from labcore.experiments.common import lab_run, save_outputs
from labcore.experiments.core import Variant, paired_deltas, run_variants, summarize
from labcore.experiments.params import ArchitecturesParams
from labcore.lm.budget import equal_budget_family, model_budget
from labcore.viz.figures import deltas_figure, variants_figure
from labcore.viz.plots import latency_vs_batch_figure

NOTEBOOK = "04_architectures"


def family(P: ArchitecturesParams) -> dict[str, Any]:
    # multiple_of=4: at lab widths (D = 32..64) multiples of 8 leave MoE > 2% off the FLOPs target.
    return equal_budget_family(P.model(), ratio=P.ratio, context_len=P.seq_len, multiple_of=4)


@dataclass
class ArchitecturesResult:
    budget: pd.DataFrame
    table: pd.DataFrame
    summary: pd.DataFrame
    deltas: pd.DataFrame
    inference: pd.DataFrame
    figures: dict[str, Any]


def run(P: ArchitecturesParams) -> ArchitecturesResult:
    E = P.effective()
    fam = family(E)
    budget = pd.DataFrame([{"architecture": k, **model_budget(cfg, context_len=E.seq_len).row()}
                           for k, cfg in fam.items()])
    variants = [Variant(k, cfg) for k, cfg in fam.items()]
    with lab_run(P, NOTEBOOK) as rd:
        table = run_variants(variants, E.seeds, E.data_config(), E.train_config(), rd.path / "train", log=rd.log)
        summary = summarize(table, ["val_loss", "recall_qa", "recall_bio", "total_params", "flops_per_token"])
        deltas = paired_deltas(table, "val_loss", baseline="dense")
        dev = "cuda" if E.device == "cuda" or (E.device == "auto" and torch.cuda.is_available()) else "cpu"
        inference = run_inference_bench(list(E.batch_sizes), configs=fam, device=dev, warmup=1,
                                        repeats=2 if E.smoke else 5, scopes=("layer",), overlap=False,
                                        log=None)
        figures = {
            "val_loss": variants_figure(table, "val_loss", list(fam), "Validation loss at equal budget"),
            "recall": variants_figure(table, "recall_qa", list(fam), "Knowledge recall (held-out questions)"),
            "deltas_vs_dense": deltas_figure(deltas, None, "Δ val loss vs dense (paired by seed)"),
            "latency": latency_vs_batch_figure(inference.assign(latency_ms=1e3 * inference["latency_s"]),
                                               "latency_ms", "batch", "model",
                                               "Sparse-layer decode latency vs batch size (this machine)"),
        }
        save_outputs(rd, NOTEBOOK, table, figures, {
            "budget": budget, "means": summary, "deltas_vs_dense": deltas,
            "moe_over_ultramem_latency": moe_ultramem_ratio(inference, scope="layer"), "inference": inference})
    return ArchitecturesResult(budget, table, summary, deltas, inference, figures)
