"""03_virtual_memory: implicit value expansion (IVE), E virtual values per physical value.

IVE (docs/mechanisms.md §1.4; arXiv 2411.12364 §3.3, UltraMemV2 arXiv 2508.18756 eqs. 8-9) gives the
memory E x N *virtual* rows while storing only N physical values: the keys per side grow by
sqrt(E), a fixed random permutation maps each virtual slot to (physical row, projector block p),
the selected values are summed per block, and one linear map E*D_v -> D (the E projectors) turns
the E pooled vectors into the output. A token still reads H*K physical rows; the extra cost is the
larger key tables, the bigger search grid and the projection (E*D_v*D per token).

What every arm holds equal: the N physical values (rows) and the H*K rows a token reads, the
trunk, the data, calibrated init and the value-LR multiplier. What E grows: the virtual rows
(E*N), the keys per side, the projection, the FLOPs. Table 3 of the paper: E = 4 / 9 / 16 ->
-0.017 / -0.025 / -0.027 validation loss at +6.6 / +14.9 / +26.4% FLOPs (a 151M-activated LM).

The paper's IVE comes with half-width values behind a projection (Table 2 "+half vdim + proj",
-0.022). The reference arms (``references``) separate the two: "E=1 d_v=D" is the full-width,
projection-free memory the other facts notebooks use; "E=1 d_v=D +proj" adds only the projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from labcore.experiments.common import lab_run, save_outputs
from labcore.experiments.core import Variant, describe_deltas, paired_deltas, run_variants, summarize
from labcore.experiments.params import VirtualMemoryParams
from labcore.layers.ultramem import UltraMem, UltraMemConfig
from labcore.lm.budget import model_budget
from labcore.lm.model import SparsePlan
from labcore.viz.figures import deltas_figure, variants_figure, xy_figure

__all__ = ["NOTEBOOK", "PAPER_VAL_DELTAS", "PAPER_FLOPS_INCREASE", "PAPER_HALF_VDIM_DELTA", "REFERENCE_NAMES",
           "VirtualMemoryParams", "VirtualMemoryResult", "analyse", "describe", "held_equal", "interpret",
           "ive_memory", "ive_variants", "run", "tiny_forward"]

NOTEBOOK = "03_virtual_memory"
HEADS = 2
# arXiv 2411.12364 Table 3 (IVE sweep): validation-loss delta vs E = 1 and the FLOPs increase.
PAPER_VAL_DELTAS = {"E=4": -0.017, "E=9": -0.025, "E=16": -0.027}
PAPER_FLOPS_INCREASE = {"E=4": 0.066, "E=9": 0.149, "E=16": 0.264}
# arXiv 2411.12364 Table 2 "+half vdim + proj": half-width values + projection vs full width, no projection.
PAPER_HALF_VDIM_DELTA = -0.022
REFERENCE_NAMES = {"full_width": "E=1 d_v=D", "full_width_proj": "E=1 d_v=D +proj"}
METRICS = ("answer_accuracy", "answer_loss", "stored_kbit")


def ive_memory(P: VirtualMemoryParams, expansion: int, *, d_value: int | None = None,
               value_proj: bool = True) -> UltraMemConfig:
    """The memory of one arm: UltraMem with TDQKR (rank 2), 2 scoring cores, raw scores, ``HEADS``
    heads x top-``top_k``, D/4 key features per side, ``n_keys``^2 physical values of width
    ``d_value`` (default ``P.d_value``) and IVE factor ``expansion``."""
    D = P.d_model
    return UltraMemConfig(d_model=D, n_keys=P.n_keys, heads=HEADS, k_dim=max(1, D // 4), top_k=P.top_k,
                          d_value=P.d_value if d_value is None else d_value, value_proj=value_proj,
                          expansion=expansion, rank=2, n_cores=2)


def ive_variants(P: VirtualMemoryParams) -> list[Variant]:
    """"E=1" (the baseline), "E=<E>" for the other expansions, then the reference arms; one memory
    beside the FFN of the middle block in every arm."""
    P = P.effective()
    place = (f"{P.n_layers // 2}:{P.n_layers // 2}",)
    arms: list[tuple[str, UltraMemConfig]] = [(f"E={e}", ive_memory(P, e)) for e in sorted(set(P.expansions))]
    for ref in P.references:
        arms.append((REFERENCE_NAMES[ref], ive_memory(P, 1, d_value=P.d_model, value_proj=ref == "full_width_proj")))
    out = []
    for name, mem in arms:
        out.append(Variant(name, P.model(SparsePlan(kind="memory", memory=mem, placements=place)), tags={
            "expansion": mem.expansion, "d_value": mem.d_v, "value_proj": mem.value_proj,
            "physical_values": mem.n_slots, "virtual_values": mem.n_virtual, "keys_per_side": mem.n_side}))
    return out


def held_equal(variants: list[Variant], context_len: int) -> pd.DataFrame:
    """Per arm: physical and virtual rows, rows read per token, the layer's parameters by part
    (values, keys, projection) and the model's parameters and FLOPs per token, with the FLOPs
    increase over the first arm."""
    rows = []
    for v in variants:
        m = v.model.plan.memory
        c, b = m.cost(), model_budget(v.model, context_len=context_len)
        rows.append({"variant": v.name, "E": m.expansion, "d_value": m.d_v, "physical_values": m.n_slots,
                     "virtual_values": m.n_virtual, "keys_per_side": m.n_side,
                     "values_read_per_token": c.units_per_token, "value_params": c.params["values"],
                     "key_params": c.params["keys"], "proj_params": c.params["value_proj"],
                     "total_params": b.total_params, "flops_per_token": b.flops_per_token})
    df = pd.DataFrame(rows)
    df["flops_vs_E1"] = df["flops_per_token"] / df["flops_per_token"].iloc[0] - 1.0
    return df


@torch.no_grad()
def tiny_forward(n_keys: int = 4, expansion: int = 4, top_k: int = 3, d_model: int = 8, d_value: int = 4,
                 tokens: int = 2, seed: int = 0) -> pd.DataFrame:
    """One forward pass of a tiny IVE layer (one head, one scoring core), step by step, with the
    pooling and projection redone by hand from the layer's selections: rows (step, tensor, shape,
    meaning); the last row is the largest difference between the layer's output and the hand-made
    one (0 up to rounding)."""
    torch.manual_seed(seed)
    cfg = UltraMemConfig(d_model=d_model, n_keys=n_keys, heads=1, k_dim=4, top_k=top_k, d_value=d_value,
                         value_proj=True, expansion=expansion, rank=2, n_cores=1)
    layer = UltraMem(cfg)
    x = torch.randn(tokens, d_model)                                         # (N_tok, D)
    y, aux = layer(x)                                                        # (N_tok, D); aux.indices (N_tok, K)
    N, E, Dv = cfg.n_slots, cfg.expansion, cfg.d_v
    phys = layer.perm[aux.indices] % N                                       # physical row of each virtual slot
    block = layer.perm[aux.indices] // N                                     # projector block p
    pooled = torch.zeros(tokens, E, Dv)                                      # (N_tok, E, D_v)
    for t in range(tokens):
        for k in range(aux.indices.shape[1]):
            pooled[t, block[t, k]] += aux.scores[t, k] * layer.values.weight[phys[t, k]]
    y_hand = pooled.reshape(tokens, E * Dv) @ layer.value_proj.weight.T      # (N_tok, D)
    rows = [
        ("input", "x", tuple(x.shape), "N_tok tokens of width D"),
        ("keys", "keys", tuple(layer.keys.shape), f"(H, 2 sides, R, n_s, D_k): n_s = sqrt(E) * n = {cfg.n_side} "
                                                  "sub-keys per side"),
        ("search", "grid", (cfg.n_side, cfg.n_side), f"n_s^2 = E * N = {cfg.n_virtual} virtual slots"),
        ("search", "slots (aux.indices)", tuple(aux.indices.shape), "K virtual slots per token, in [0, E*N)"),
        ("shuffle", "perm", tuple(layer.perm.shape), "fixed random permutation P of the virtual slots"),
        ("shuffle", "row = P[v] mod N", tuple(phys.shape), f"physical row, in [0, N = {N})"),
        ("shuffle", "block = P[v] div N", tuple(block.shape), f"projector block p, in [0, E = {E})"),
        ("read", "values V", tuple(layer.values.weight.shape), "N physical rows of width D_v (all that is stored)"),
        ("read", "pooled", tuple(pooled.shape), "per block p: sum of score * V[row] over the slots in p"),
        ("project", "W (value_proj)", tuple(layer.value_proj.weight.shape), "E projectors as one map E*D_v -> D"),
        ("output", "y = W vec(pooled)", tuple(y.shape), "the memory output, width D"),
        ("check", "max |y - y by hand|", (), f"{float((y - y_hand).abs().max()):.1e}"),
    ]
    return pd.DataFrame([(s, t, str(sh), m) for s, t, sh, m in rows], columns=["step", "tensor", "shape", "meaning"])


@dataclass
class VirtualMemoryResult:
    table: pd.DataFrame            # one row per (variant, seed)
    summary: pd.DataFrame          # per variant: mean, std, 95% CI
    deltas: pd.DataFrame           # headline: answer loss of E > 1 vs E=1, paired by seed, paper Table 3
    accuracy_deltas: pd.DataFrame  # answer accuracy of E > 1 vs E=1
    kbit_deltas: pd.DataFrame      # stored kbit of E > 1 vs E=1
    width_deltas: pd.DataFrame     # answer accuracy of the E=1 arms vs the full-width reference
    width_loss_deltas: pd.DataFrame  # answer loss of the same, with Table 2's "+half vdim + proj"
    equal: pd.DataFrame            # what is held equal and what grows
    init: pd.DataFrame             # step-0 memory output std before / after calibration
    figures: dict[str, Any]


def analyse(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The notebook's tables from the per-(variant, seed) table alone (see :class:`VirtualMemoryResult`)."""
    names = list(dict.fromkeys(table["variant"]))
    ive = table[table["variant"].astype(str).str.match(r"^E=\d+$")]
    out: dict[str, pd.DataFrame] = {
        "deltas": paired_deltas(ive, "answer_loss", baseline="E=1", paper=PAPER_VAL_DELTAS),
        "accuracy_deltas": paired_deltas(ive, "answer_accuracy", baseline="E=1", higher_is_better=True),
        "kbit_deltas": paired_deltas(ive, "stored_kbit", baseline="E=1", higher_is_better=True),
    }
    ref = REFERENCE_NAMES["full_width"]
    width_names = [ref, *(n for n in (REFERENCE_NAMES["full_width_proj"], "E=1") if n in names)]
    empty = pd.DataFrame(columns=["variant", "reference", "metric", "n", "delta_mean", "ci_low", "ci_high",
                                  "resolution", "verdict"])
    if ref in names:
        w = table[table["variant"].isin(width_names)]
        out["width_deltas"] = paired_deltas(w, "answer_accuracy", baseline=ref, higher_is_better=True)
        out["width_loss_deltas"] = paired_deltas(w, "answer_loss", baseline=ref, paper={"E=1": PAPER_HALF_VDIM_DELTA})
    else:
        out["width_deltas"] = out["width_loss_deltas"] = empty
    cols = [c for c in ("coverage", "output_std", "flops_per_token", "total_params") if c in table.columns]
    out["summary"] = summarize(table, [*METRICS, *cols])
    init_cols = [c for c in ("init_std_before", "init_std", "init_target") if c in table.columns]
    out["init"] = table.groupby("variant", sort=False)[init_cols].mean().reset_index() if init_cols else pd.DataFrame()
    return out


def run(P: VirtualMemoryParams) -> VirtualMemoryResult:
    """Train every arm x seed on the facts task and compare, paired by seed."""
    E = P.effective()
    variants = ive_variants(E)
    with lab_run(P, NOTEBOOK) as rd:
        table = run_variants(variants, E.seeds, E.data_config(), E.train_config(), rd.path / "train",
                             log=rd.log, context_len=E.context_len, calibrate=E.calibrate_init)
        a = analyse(table)
        equal = held_equal(variants, E.context_len)
        figures = {
            "answer_loss_deltas": deltas_figure(a["deltas"], PAPER_VAL_DELTAS,
                                                "Δ answer loss vs E=1 (paired by seed) and the paper's Δ val loss"),
            "accuracy": variants_figure(table, "answer_accuracy", title="Answer accuracy per arm (seeds, mean ± 95% CI)"),
            "accuracy_vs_flops": xy_figure(a["summary"], "flops_per_token", "answer_accuracy",
                                           title="Answer accuracy vs FLOPs per token (mean ± 95% CI)"),
            "coverage": variants_figure(table, "coverage", title="Share of virtual slots read on the calibration batch"),
        }
        save_outputs(rd, NOTEBOOK, table, figures,
                     {"deltas": a["deltas"], "accuracy_deltas": a["accuracy_deltas"], "kbit_deltas": a["kbit_deltas"],
                      "width_deltas": a["width_deltas"], "width_loss_deltas": a["width_loss_deltas"],
                      "held_equal": equal, "init_std": a["init"], "means": a["summary"]})
    return VirtualMemoryResult(table, a["summary"], a["deltas"], a["accuracy_deltas"], a["kbit_deltas"],
                               a["width_deltas"], a["width_loss_deltas"], equal, a["init"], figures)


def describe(result: VirtualMemoryResult) -> str:
    """The headline deltas in words: answer loss (nats), then accuracy (fraction of facts)."""
    return (describe_deltas(result.deltas, "nats") + "\n"
            + describe_deltas(result.accuracy_deltas, "(accuracy, fraction of facts)"))


def _effect(r: dict[str, Any], unit: str, scale: float = 1.0, fmt: str = "+.3f") -> str:
    res = r.get("resolution", np.nan)
    res_txt = f", resolution {scale * res:.3g}" if np.isfinite(res) else ""
    return (f"{scale * r['delta_mean']:{fmt}} {unit} (95% CI {scale * r['ci_low']:{fmt}} .. "
            f"{scale * r['ci_high']:{fmt}}, n = {int(r['n'])}{res_txt})")


def _resolved(r: dict[str, Any]) -> bool:
    return str(r["verdict"]).startswith("resolved")


def _mean(summary: pd.DataFrame, variant: str, metric: str) -> float:
    r = summary[summary["variant"] == variant]
    col = f"{metric}_mean"
    return float(r[col].iloc[0]) if len(r) and col in r.columns else float("nan")


def interpret(result: Any) -> str:
    """A paragraph on this run's numbers: the IVE effect at equal physical values (accuracy and
    loss, interval, resolution, the paper's direction), the cost of half-width values and the
    projection (when the reference arms ran), what the coverage and FLOPs say, and what the design
    does not resolve. ``result``: a :class:`VirtualMemoryResult` or anything with the tables of
    :func:`analyse` as attributes (``accuracy_deltas``, ``deltas``, ``width_deltas``, ``summary``)."""
    acc, loss, summ = result.accuracy_deltas, result.deltas, result.summary
    width = getattr(result, "width_deltas", None)
    base = _mean(summ, "E=1", "answer_accuracy")
    out = [f"At E=1 (half-width values + projection) the memory answers {base:.1%} of the facts."]
    if base >= 0.95:
        out.append("That is at the ceiling: a better memory cannot show; train less or store more facts.")
    elif base <= 0.05:
        out.append("That is near chance: too little training to compare arms.")
    unresolved = []
    for r in acc.to_dict("records"):
        lr = loss[loss["variant"] == r["variant"]]
        lr = lr.iloc[0].to_dict() if len(lr) else None
        word = "more" if r["delta_mean"] > 0 else "fewer"
        out.append(f"{r['variant']} vs E=1: {_effect(r, 'accuracy points', 100, '+.1f')}, {word} facts answered "
                   f"({'resolved' if _resolved(r) else 'not resolved'})"
                   + (f"; answer loss {_effect(lr, 'nats')}" if lr else "") + ".")
        if not _resolved(r):
            unresolved.append(r)
        if lr is not None and _resolved(lr) and np.isfinite(lr.get("paper_delta", np.nan)):
            same = np.sign(lr["delta_mean"]) == np.sign(lr["paper_delta"])
            out.append(f"The paper's {r['variant']} lowers validation loss by {abs(lr['paper_delta'])} at scale; "
                       f"the lab's answer-loss change goes {'the same' if same else 'the opposite'} way. "
                       "Only the direction is comparable (a different loss, task and scale).")
    ive_up = [r for r in acc.to_dict("records") if _resolved(r) and r["delta_mean"] > 0]
    ive_down = [r for r in acc.to_dict("records") if _resolved(r) and r["delta_mean"] < 0]
    if ive_up:
        out.append("With the same physical rows, IVE stores more facts in the same steps: the search addresses E "
                   "times more virtual rows, and each physical row enters the output through E different "
                   "projections, so facts that collide on one physical row can still be told apart.")
    if ive_down:
        out.append("IVE costs accuracy here: the bigger search grid (sqrt(E) more keys per side) has to be learnt "
                   "with the same steps, and E virtual copies share one physical row's gradient.")
    width_loss = getattr(result, "width_loss_deltas", None)
    if width is not None and len(width):
        for r in width.to_dict("records"):
            what = ("Half-width values behind a projection" if r["variant"] == "E=1"
                    else "A projection alone (full-width values)")
            lr = None
            if width_loss is not None and len(width_loss):
                m = width_loss[width_loss["variant"] == r["variant"]]
                lr = m.iloc[0].to_dict() if len(m) else None
            out.append(f"{what} vs full-width values without projection ({r['reference']}): "
                       f"{_effect(r, 'accuracy points', 100, '+.1f')} "
                       f"({'resolved' if _resolved(r) else 'not resolved'})"
                       + (f"; answer loss {_effect(lr, 'nats')} ({'resolved' if _resolved(lr) else 'not resolved'})"
                          if lr else "") + ".")
            if not _resolved(r):
                unresolved.append(r)
        half = width[width["variant"] == "E=1"]
        half_loss = (width_loss[width_loss["variant"] == "E=1"] if width_loss is not None and len(width_loss)
                     else pd.DataFrame())
        slower = ((len(half) and _resolved(half.iloc[0].to_dict()) and half["delta_mean"].iloc[0] < 0)
                  or (len(half_loss) and _resolved(half_loss.iloc[0].to_dict())
                      and half_loss["delta_mean"].iloc[0] > 0))
        if slower:
            out.append("So what slows learning on this small trunk is the value width and projection the paper "
                       "pairs with IVE (Table 2 '+half vdim + proj', -0.022 val loss at scale), not IVE itself: "
                       "the answer has to pass through a product of two trained matrices (values at a high value "
                       "LR, the projection at the base LR), each value row has half the features, and a few "
                       "hundred steps on a D=32 model do not let that product catch up. It is a small-model, "
                       "short-run effect, opposite in direction to the paper's, whose claim is about loss at scale.")
    cov = {v: _mean(summ, v, "coverage") for v in summ["variant"]}
    if all(np.isfinite(c) for c in cov.values()) and "E=1" in cov:
        out.append("Share of slots read on the calibration batch: " + ", ".join(
            f"{v} {c:.0%}" for v, c in cov.items()) + " (of E*N virtual slots: a larger table is read more sparsely).")
    fl = {v: _mean(summ, v, "flops_per_token") for v in summ["variant"] if str(v).startswith("E=") and " " not in v}
    if "E=1" in fl and len(fl) > 1:
        out.append("FLOPs per token vs E=1: " + ", ".join(
            f"{v} {fl[v] / fl['E=1'] - 1:+.1%}" for v in fl if v != "E=1") + " (larger key tables and projection).")
    if unresolved:
        res = [100 * float(r["resolution"]) for r in unresolved if np.isfinite(r.get("resolution", np.nan))]
        res_txt = f" (resolution {min(res):.1f}-{max(res):.1f} points)" if res else ""
        out.append(f"Not resolved at n = {int(unresolved[0]['n'])} seeds{res_txt}: "
                   + ", ".join(f"{r['variant']} vs {r['reference']}" for r in unresolved)
                   + "; effects smaller than the resolution may exist either way.")
    out.append("Not measured here: validation loss of a large LM, and whether the gaps close with longer training "
               "(this is learning speed over a few hundred steps, not capacity).")
    return "\n".join(out)

