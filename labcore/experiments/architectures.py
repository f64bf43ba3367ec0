"""04_architectures: dense vs MoE vs PKM vs UltraMem at equal activated FLOPs, on the facts task.

The paper's comparison (arXiv 2411.12364 §4.2; docs/mechanisms.md §2, §7): every model has the dense
model's forward FLOPs per token (equal *activated* compute), and the sparse ones (MoE and the
memories) the same total parameters, ``(1 + ratio)`` x the dense model's.
:func:`labcore.lm.budget.equal_budget_family` sizes them within 2%; the UltraMem shape on the D = 32
trunk is the one that learns there (:func:`labcore.experiments.memory_family.layer_overrides`:
TDQKR rank 2 with 2 cores, full-width values, no IVE, no skip). Beside the parallel PKM (the
UltraMem paper's placement, next to an FFN), :func:`pkm_replacing_ffn` builds a PKM that *replaces*
the middle block's FFN (``SparsePlan.memory_replaces_ffn``; the placement of the PKM paper, arXiv
1907.05242 §3.2, and of Memory+, arXiv 2412.09764 §3; docs/mechanisms.md §4, §5), at the same
total parameters and FLOPs.

Held equal in every arm (confound-free defaults, :class:`~labcore.experiments.params.LabParams`):
the facts, the seeds (init and batch order: the arms pair by seed), forward FLOPs per token, total
parameters of the sparse arms, the value-LR multiplier (x M decaying to x1, docs/mechanisms.md §1.6)
in every memory arm, the memory init calibrated to the trunk's FFN output std at step 0, no weight
decay anywhere, the MoE balance loss averaged over layers (``SparsePlan.moe_aux_reduction="mean"``,
docs/mechanisms.md §7.1).

Measured: answer accuracy, answer loss and stored kbit on every stored fact; their paired
differences to dense and of each memory to MoE (:func:`labcore.experiments.core.paired_deltas`);
and the decode-step latency of each sparse layer vs batch size
(:func:`labcore.bench.inference.run_inference_bench`; docs/mechanisms.md §7.2: a handful of tokens
already touches almost every expert, while a memory touches B·H·K value rows out of N).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from labcore.bench.inference import moe_ultramem_ratio, run_inference_bench
from labcore.config import ConfigError
from labcore.experiments.common import lab_run, save_outputs
from labcore.experiments.core import Variant, paired_deltas, run_variants, summarize
from labcore.experiments.memory_family import layer_overrides
from labcore.experiments.params import ArchitecturesParams
from labcore.layers.moe import MoE, MoEConfig, route
from labcore.layers.pkm import PKM, PKMConfig, reference_query
from labcore.lm.budget import equal_budget_family, last_at_most, model_budget
from labcore.lm.model import ModelConfig, SparsePlan
from labcore.viz.figures import deltas_figure, variants_figure
from labcore.viz.plots import latency_vs_batch_figure

__all__ = ["ArchitecturesParams", "NOTEBOOK", "ARMS", "family", "pkm_replacing_ffn", "arm_variants",
           "budget_table", "init_table", "tiny_forward", "interpret", "run", "ArchitecturesResult"]

NOTEBOOK = "04_architectures"
ARMS = ("dense", "moe", "pkm", "pkm_replaces_ffn", "ultramem")
MEMORY_ARMS = ("pkm", "pkm_replaces_ffn", "ultramem")


def pkm_replacing_ffn(base: ModelConfig, parallel: ModelConfig, *, context_len: int, tol: float = 0.02,
                      multiple_of: int = 4) -> ModelConfig:
    """The PKM of ``parallel`` (a PKM model of the family) moved into the FFN's place: the memory
    replaces the FFN of the block it sits in (``SparsePlan.memory_replaces_ffn``), with ``n_keys``
    and the remaining blocks' ``d_ff`` searched so that total parameters equal ``parallel``'s and
    forward FLOPs per token equal ``base``'s, both within ``tol`` (ConfigError otherwise).

    Removing an FFN frees FLOPs and parameters: the other blocks' FFNs get wider (d_ff may exceed
    the base's) and the memory a little larger."""
    mem, place = parallel.plan.memory, parallel.plan.placements
    target_flops = model_budget(base, context_len=context_len).flops_per_token
    target_params = model_budget(parallel, context_len=context_len).total_params

    def cfg_of(n: int, d_ff: int) -> ModelConfig:
        plan = SparsePlan(kind="memory", memory=dataclasses.replace(mem, n_keys=n), placements=place,
                          memory_replaces_ffn=True)
        return dataclasses.replace(base, d_ff=d_ff, plan=plan)

    def d_ff_for(n: int) -> int:
        j = last_at_most(lambda j: model_budget(cfg_of(n, j * multiple_of), context_len=context_len).flops_per_token,
                         target_flops, 1, 8 * base.d_ff // multiple_of)
        return j * multiple_of

    def params_at(n: int) -> int:
        return model_budget(cfg_of(n, d_ff_for(n)), context_len=context_len).total_params

    n = last_at_most(params_at, target_params, mem.top_k, 4 * mem.n_keys)
    best, err = None, float("inf")
    for nn_ in (n, n + 1):
        d = d_ff_for(nn_)
        for dd in (d, d + multiple_of):
            b = model_budget(cfg_of(nn_, dd), context_len=context_len)
            e = max(abs(b.total_params / target_params - 1), abs(b.flops_per_token / target_flops - 1))
            if e < err:
                best, err = cfg_of(nn_, dd), e
    if best is None or err > tol:
        raise ConfigError(f"pkm_replacing_ffn: cannot match total_params={target_params:,} and "
                          f"flops_per_token={target_flops:,} within tol={tol:.1%} (closest off by {err:.2%})")
    return best


def family(P: ArchitecturesParams) -> dict[str, ModelConfig]:
    """The arms of :data:`ARMS` at equal forward FLOPs per token, the sparse ones at ``(1 + ratio)``
    x the dense parameters (d_ff and d_expert in multiples of 4)."""
    E = P.effective()
    base, C = E.model(), E.context_len
    own = {"ultramem": layer_overrides(E)["ultramem"]}
    fam = equal_budget_family(base, E.ratio, context_len=C, multiple_of=4, names=["dense", "moe", "pkm", "ultramem"],
                              **own)
    out = {k: fam[k] for k in ("dense", "moe", "pkm")}
    out["pkm_replaces_ffn"] = pkm_replacing_ffn(base, fam["pkm"], context_len=C)
    out["ultramem"] = fam["ultramem"]
    return out


def arm_variants(fam: dict[str, ModelConfig]) -> list[Variant]:
    """One Variant per arm of :func:`family`, no training overrides: every arm trains with the same
    ``P.train_config()`` (its value-LR multiplier acts on memory value tables only)."""
    return [Variant(name, cfg, tags={"arch": name}) for name, cfg in fam.items()]


def budget_table(fam: dict[str, ModelConfig], context_len: int) -> pd.DataFrame:
    """Per arm: total and active parameters, FLOPs per token, d_ff, value rows N, rows read per token,
    placement, and FLOPs / params relative to dense."""
    from labcore.experiments.facts_pilot import memory_reads

    rows = []
    dense = model_budget(fam["dense"], context_len=context_len)
    for name, cfg in fam.items():
        b = model_budget(cfg, context_len=context_len)
        n, reads = memory_reads(cfg)
        rows.append({"architecture": name, "total_params": b.total_params, "active_params": b.active_params,
                     "flops_per_token": b.flops_per_token, "flops_vs_dense": b.flops_per_token / dense.flops_per_token,
                     "params_vs_dense": b.total_params / dense.total_params, "d_ff": cfg.d_ff,
                     "n_values": n, "value_rows_read_per_token": reads,
                     "placement": "/".join(cfg.plan.placements) + (" (replaces FFN)" if cfg.plan.memory_replaces_ffn
                                                                  else "") if cfg.plan.kind == "memory" else "",
                     "moe_aux_reduction": cfg.plan.moe_aux_reduction if cfg.plan.kind == "moe" else ""})
    return pd.DataFrame(rows)


def init_table(table: pd.DataFrame) -> pd.DataFrame:
    """Step-0 memory output std per memory arm (mean over seeds): before calibration, after, and the
    target (the trunk's mean FFN output std)."""
    t = table[table["variant"].isin(MEMORY_ARMS)]
    return (t.groupby("variant", sort=False)[["init_std_before", "init_std", "init_target"]].mean()
            .reset_index().rename(columns={"variant": "architecture"}))


# ----------------------------------------------------------------------------------------------
# Teaching: one token through a tiny MoE and a tiny PKM.
# ----------------------------------------------------------------------------------------------


def tiny_forward(seed: int = 0, d_model: int = 8, tokens: int = 3) -> pd.DataFrame:
    """One forward pass of ``tokens`` tokens through a tiny MoE (4 experts, top-2) and a tiny PKM
    (n = 4 keys per side: 16 values, 1 head, top-2), step by step: rows (layer, step, tensor, shape,
    meaning). Each layer's output is checked against the layer's own forward (AssertionError if not)."""
    torch.manual_seed(seed)
    x = torch.randn(tokens, d_model)                                        # (T, D)
    rows: list[dict[str, Any]] = []

    def add(layer: str, step: str, t: torch.Tensor, meaning: str) -> None:
        rows.append({"layer": layer, "step": step, "shape": tuple(t.shape), "meaning": meaning})

    add("both", "x", x, "T tokens of width D")
    moe = MoE(MoEConfig(d_model=d_model, d_expert=4, n_experts=4, top_k=2)).eval()
    with torch.no_grad():
        logits = moe.router(x)                                              # (T, E)
        weights, idx = route(moe.cfg, logits, logits.softmax(-1))           # (T, K) each
        y_moe, _ = moe(x)                                                   # (T, D)
    add("MoE", "router logits x W_r^T", logits, "one score per expert (E = 4)")
    add("MoE", "top-K experts", idx, f"K = 2 experts per token, e.g. token 0 -> {idx[0].tolist()}")
    add("MoE", "gate weights", weights, "softmax probabilities of the chosen experts")
    add("MoE", "y = sum_j w_j FFN_idx_j(x)", y_moe, "each token runs K whole expert FFNs")

    pkm = PKM(PKMConfig(d_model=d_model, n_keys=4, heads=1, k_dim=8, top_k=2)).eval()
    c = pkm.cfg
    with torch.no_grad():
        q = reference_query(pkm, x)                                         # (T, H, 2, D_k/2)
        s_row = q[:, 0, 0] @ pkm.keys[0, 0].T                               # (T, n)
        s_col = q[:, 0, 1] @ pkm.keys[0, 1].T                               # (T, n)
        grid = (s_row[:, :, None] + s_col[:, None, :]).reshape(tokens, -1)  # (T, n^2)
        top, slots = grid.topk(c.top_k, dim=-1)                             # (T, K)
        w = torch.softmax(top, dim=-1)                                      # (T, K)
        rows_read = pkm.values.weight[slots]                                # (T, K, D_v)
        y = (w[..., None] * rows_read).sum(1)                               # (T, D)
        y_layer, _ = pkm(x)
    if not torch.allclose(y, y_layer, atol=1e-5):
        raise AssertionError("tiny_forward: the step-by-step PKM read differs from the layer's forward")
    add("PKM", "query q = LN(x W_q)", q, "H = 1 head, a row half and a column half of D_k/2 each")
    add("PKM", "row scores q_row K_row^T", s_row, "n = 4 row sub-keys")
    add("PKM", "column scores q_col K_col^T", s_col, "n = 4 column sub-keys")
    add("PKM", "grid s_row[i] + s_col[j]", grid, "n^2 = 16 value slots scored from 2n = 8 dot products")
    add("PKM", "top-K slots", slots, f"K = 2 value rows per token, e.g. token 0 -> {slots[0].tolist()}")
    add("PKM", "weights softmax(top scores)", w, "one weight per selected row")
    add("PKM", "rows read V[slots]", rows_read, "K rows of the value table (N = 16 rows of D_v)")
    add("PKM", "y = sum_k w_k V[slot_k]", y, "equals the layer's own forward")
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


@dataclass
class ArchitecturesResult:
    budget: pd.DataFrame
    table: pd.DataFrame       # one row per (arm, seed)
    summary: pd.DataFrame     # mean / std / 95% CI per arm
    deltas: pd.DataFrame      # headline: answer accuracy of each arm - dense, paired by seed
    vs_moe: pd.DataFrame      # answer accuracy of each memory - MoE, paired by seed
    stored: pd.DataFrame      # stored kbit of each arm - dense, paired by seed
    init: pd.DataFrame        # step-0 memory output stds
    inference: pd.DataFrame
    latency_ratio: pd.DataFrame
    figures: dict[str, Any]


def _device(E: ArchitecturesParams) -> str:
    return "cuda" if E.device == "cuda" or (E.device == "auto" and torch.cuda.is_available()) else "cpu"


def run(P: ArchitecturesParams) -> ArchitecturesResult:
    """Train every arm x seed on the facts, time the decode step, write run.json, history.jsonl,
    summary.parquet, the key tables (headline deltas first) and the figures into ``P.out_dir``."""
    E = P.effective()
    fam = family(E)
    order = list(fam)
    budget = budget_table(fam, E.context_len)
    variants = arm_variants(fam)
    with lab_run(P, NOTEBOOK) as rd:
        table = run_variants(variants, E.seeds, E.data_config(), E.train_config(), rd.path / "train", log=rd.log,
                             calibrate=E.calibrate_init)
        summary = summarize(table, ["answer_accuracy", "answer_loss", "stored_kbit", "total_params",
                                    "flops_per_token"])
        deltas = paired_deltas(table, "answer_accuracy", baseline="dense", order=order, higher_is_better=True)
        mems = [a for a in order if a in MEMORY_ARMS]
        vs_moe = paired_deltas(table[table["variant"].isin(["moe", *mems])], "answer_accuracy", baseline="moe",
                               order=["moe", *mems], higher_is_better=True)
        stored = paired_deltas(table, "stored_kbit", baseline="dense", order=order, higher_is_better=True)
        init = init_table(table)
        timed = {k: v for k, v in fam.items() if k != "pkm_replaces_ffn"}
        inference = run_inference_bench(list(E.batch_sizes), configs=timed, device=_device(E), warmup=1,
                                        repeats=2 if E.smoke else 5, scopes=("layer",), overlap=False, log=None)
        ratio = moe_ultramem_ratio(inference, scope="layer")
        figures = {
            "accuracy_deltas_vs_dense": deltas_figure(deltas, None, "Δ answer accuracy vs dense (paired by seed)"),
            "accuracy": variants_figure(table, "answer_accuracy", order, "Answer accuracy at equal activated FLOPs"),
            "stored_kbit": variants_figure(table, "stored_kbit", order, "Knowledge stored (kbit)"),
            "latency": latency_vs_batch_figure(inference.assign(latency_ms=1e3 * inference["latency_s"]),
                                               "latency_ms", "batch", "model",
                                               "Sparse-layer decode latency vs batch size (this machine)"),
        }
        save_outputs(rd, NOTEBOOK, table, figures, {
            "deltas_vs_dense": deltas, "memory_vs_moe": vs_moe, "stored_kbit_vs_dense": stored,
            "init_std_step0": init, "budget": budget, "means": summary, "moe_over_ultramem_latency": ratio,
            "inference": inference})
    return ArchitecturesResult(budget, table, summary, deltas, vs_moe, stored, init, inference, ratio, figures)


# ----------------------------------------------------------------------------------------------
# Reading the run.
# ----------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}"


def _diff_sentence(r: dict[str, Any], unit: str = "points") -> str:
    scale = 100.0 if unit == "points" else 1.0
    resolved = str(r["verdict"]).startswith("resolved")
    return (f"{r['variant']} - {r['reference']}: {scale * r['delta_mean']:+.1f} {unit} (95% CI "
            f"{scale * r['ci_low']:+.1f} .. {scale * r['ci_high']:+.1f}, resolution {scale * r['resolution']:.1f} "
            f"{unit} at n={int(r['n'])}; {'resolved' if resolved else 'not resolved'})")


def interpret(result: Any) -> str:
    """A paragraph on this run, written from its tables: how far each arm got, each memory against
    dense and against MoE (with interval and resolution), the placement comparison (PKM replacing
    vs beside the FFN), stability across seeds, and what the design does not resolve.

    ``result``: an :class:`ArchitecturesResult`, or anything with ``table`` (one row per (variant,
    seed) with ``answer_accuracy``) plus ``deltas`` and ``vs_moe`` (paired-deltas tables)."""
    t, d, m = result.table, result.deltas, result.vs_moe
    acc = t.groupby("variant", sort=False)["answer_accuracy"].agg(["mean", "min", "max"])
    out = []
    if "dense" in acc.index:
        dense = acc.loc["dense"]
        ceiling = "still far from its ceiling" if dense["mean"] < 0.9 else "near its ceiling"
        out.append(f"Dense reached {dense['mean']:.2f} answer accuracy ({ceiling}): at equal activated FLOPs it "
                   "has too few parameters to store the facts in this many steps.")
    best = acc["mean"].idxmax()
    out.append(f"The best arm is {best} at {acc.loc[best, 'mean']:.2f}.")
    rows = {r["variant"]: r for r in d.to_dict("records")}
    for a in MEMORY_ARMS + ("moe",):
        if a in rows:
            out.append(_diff_sentence(rows[a]) + ".")
    mrows = {r["variant"]: r for r in m.to_dict("records")}
    mem_better = [a for a, r in mrows.items() if str(r["verdict"]).startswith("resolved") and r["delta_mean"] > 0]
    if mrows:
        out.append("Against MoE at the same total parameters: " + "; ".join(_diff_sentence(r) for r in mrows.values())
                   + ". " + (f"{', '.join(mem_better)} store(s) more facts than MoE: MoE's extra parameters sit in "
                             "whole experts that each token runs K of, a memory's in rows it reads a few of."
                             if mem_better else "No memory is resolved better than MoE here."))
    if "pkm" in acc.index and "pkm_replaces_ffn" in acc.index:
        gap = acc.loc["pkm_replaces_ffn", "mean"] - acc.loc["pkm", "mean"]
        out.append(f"Placement: PKM replacing the FFN (PKM / Memory+ papers) vs beside it (UltraMem): "
                   f"{_pct(gap)} points; both have the same parameters and FLOPs, the replacing one a wider FFN in "
                   "the other block and no FFN where the memory is.")
    unstable = [v for v, r in acc.iterrows() if r["max"] - r["min"] > 0.2]
    if unstable:
        out.append("Unstable across seeds (range > 0.2 accuracy): " + ", ".join(
            f"{v} ({acc.loc[v, 'min']:.2f}..{acc.loc[v, 'max']:.2f})" for v in unstable) + ".")
    ceil = [v for v in MEMORY_ARMS if v in acc.index and acc.loc[v, "mean"] >= 0.98]
    if len(ceil) >= 2:
        out.append(f"{', '.join(ceil)} sit at the ceiling (>= 0.98): differences among them are not measurable "
                   "here; this design resolves memory vs dense and memory vs MoE, not memory vs memory.")
    res = np.nanmax(d["resolution"].to_numpy(dtype=float)) if len(d) else float("nan")
    if np.isfinite(res):
        out.append(f"Effects smaller than about {100 * res:.0f} accuracy points are not resolved at n="
                   f"{int(d['n'].max())} seeds.")
    return " ".join(out)
