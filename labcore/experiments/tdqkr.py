"""01_tdqkr: additive product-key scoring (PKM) vs Tucker-decomposed query-key retrieval (TDQKR).

TDQKR (docs/mechanisms.md §1.3; arXiv 2411.12364 §3.2, restated as eqs. 6-7 of arXiv 2508.18756)
scores the slot (i, j) of the n x n grid with a bilinear form ``S_row[:, i]ᵀ C S_col[:, j]`` (rank
R) instead of PKM's sum ``s_row[i] + s_col[j]``. The exact top-K of a bilinear grid is not inside
the product of the per-side top-m lists, so the layer searches with the rank-1 approximation
``C ≈ λ₁ u tᵀ`` of the summed cores: top-m rows by ``uᵀ S_row``, top-m columns by ``tᵀ S_col``,
then the m² candidates are scored exactly ("signed" search, the release's). The "two-sided" search
also keeps the m most negative proxies per side (labcore's; exact for a rank-1 core with a positive
top-K).

The experiment trains on the facts task (:mod:`labcore.data.facts`, answer token only) and holds
everything but the scoring equal: every arm is the same D = 32 trunk with one UltraMem beside the
middle block's FFN, at equal total parameters and forward FLOPs per token (``match_ultramem``:
values N = n² and the trunk's d_ff solved per arm), rank-2 keys of ``k_dim`` features per side
against additive keys of ``R x k_dim`` features (the same key parameters and key-score FLOPs),
full-width values without projection, E = 1, raw scores (no softmax) in every arm, so that the only
change is how row and column scores combine (docs/mechanisms.md §1.8: the "+TDQKR" row of Table 2).
Memory init calibrated to the FFN output std at step 0, value LR ``value_lr_multiplier`` -> 1x in
every arm, no weight decay (:class:`~labcore.experiments.params.LabParams`).

Measured:

- the answer-token loss, accuracy and stored kbit, paired by seed, against the additive arm (the
  headline) and, for the search switches, against the release's R = 2 search;
- **search recall** of every trained Tucker layer: the fraction of the exact top-K (brute force over
  the whole grid, :meth:`~labcore.layers.ultramem.UltraMem.search_recall`) that the signed and the
  two-sided search return, on the inputs the layer really receives at the answer position, for the
  same weights (so their difference is paired per token, per layer and per seed), at step 0 and
  after training;
- the singular values λ₁, λ₂ of the summed core at the end (the aux loss keeps λ₂ below τ).

Paper (docs/mechanisms.md §1.3, §1.5, §1.8): R = 2 / 3 / 4 -> -0.008 / -0.0084 / -0.0082 validation
loss vs the additive row; + MCS (h = 2) another -0.003.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from labcore.config import ConfigError
from labcore.data.cache import load_dataset
from labcore.data.facts import inputs_targets
from labcore.experiments import stats
from labcore.experiments.common import lab_run, save_outputs
from labcore.experiments.core import Variant, paired_deltas, run_variants, summarize
from labcore.experiments.params import TDQKRParams
from labcore.layers.ultramem import UltraMem, UltraMemConfig
from labcore.lm.budget import match_ultramem, model_budget
from labcore.lm.model import LM, ModelConfig
from labcore.viz.figures import deltas_figure, history_lines, variants_figure

__all__ = ["TDQKRParams", "NOTEBOOK", "PAPER_DELTAS", "tdqkr_variants", "variants_table", "tiny_forward",
           "search_recalls", "recall_table", "interpret", "run", "TDQKRResult"]

NOTEBOOK = "01_tdqkr"
BASELINE = "additive"
RELEASE = "R=2"
# The paper's validation-loss deltas against the additive (IVE) row, same sign convention (variant -
# additive): arXiv 2411.12364 Table 3 rank sweep; "R=2 h=2" is Table 2's "+TDQKR" then "+MCS".
PAPER_DELTAS = {"R=2": -0.008, "R=3": -0.0084, "R=4": -0.0082, "R=2 h=2": -0.008 - 0.003}
FACTS_METRICS = ("answer_loss", "answer_accuracy", "stored_kbit")


# ----------------------------------------------------------------------------------------------
# The arms
# ----------------------------------------------------------------------------------------------


def memory_shape(P: TDQKRParams) -> dict[str, Any]:
    """The UltraMem shape every arm shares (``match_ultramem`` keywords): ``heads`` x ``top_k``
    reads, ``k_dim`` features per side, full-width values (D_v = D) without projection, E = 1,
    raw scores, one memory beside the middle block's FFN."""
    mid = P.n_layers // 2
    return dict(heads=P.heads, top_k=P.top_k, k_dim=P.k_dim, d_value=P.d_model, value_proj=False, expansion=1,
                n_cores=1, score_activation="none", placements=(f"{mid}:{mid}",))


def arm_configs(P: TDQKRParams) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """name -> (UltraMemConfig fields that differ from :func:`memory_shape`, tags), in notebook order."""
    add_k = P.k_dim * (2 if P.additive_equal_keys else 1)
    arms: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        BASELINE: (dict(scoring="additive", rank=1, k_dim=add_k), dict(scoring="additive", rank=0, cores=1,
                                                                      search="exact"))}
    for r in P.ranks:
        arms[f"R={r}"] = (dict(scoring="tucker", rank=r), dict(scoring="tucker", rank=r, cores=1, search="signed"))
    if P.two_sided:
        arms["R=2 two-sided"] = (dict(scoring="tucker", rank=2, proxy_search="two_sided"),
                                 dict(scoring="tucker", rank=2, cores=1, search="two_sided"))
    if P.multi_core:
        arms["R=2 h=2"] = (dict(scoring="tucker", rank=2, n_cores=2),
                           dict(scoring="tucker", rank=2, cores=2, search="signed"))
    if P.aux_loss:
        arms["R=2 +aux"] = (dict(scoring="tucker", rank=2, tucker_aux=True),
                            dict(scoring="tucker", rank=2, cores=1, search="signed"))
    return arms


def tdqkr_variants(P: TDQKRParams) -> list[Variant]:
    """The arms at equal total parameters ((1 + ``ratio``) x the dense trunk) and equal forward FLOPs
    per token (the dense trunk's), within 2%: ``match_ultramem`` solves the values (n_keys) and the
    trunk's d_ff per arm. The additive arm's keys have ``2 x k_dim`` features when
    ``additive_equal_keys`` (as many key parameters and key-score FLOPs as rank-2 keys)."""
    base = P.model()
    C = P.context_len
    target = round((1 + P.ratio) * model_budget(base, context_len=C).total_params)
    shape = memory_shape(P)
    out = []
    for name, (fields, tags) in arm_configs(P).items():
        cfg = match_ultramem(base, target, context_len=C, multiple_of=4, **{**shape, **fields})
        out.append(Variant(name, cfg, tags=tags))
    return out


def variants_table(P: TDQKRParams) -> pd.DataFrame:
    """What each arm is and what is held equal: scoring, rank, cores, search, key features per
    side, keys per side n, values N, trunk d_ff, total / activated parameters, forward FLOPs per
    token and values read per token (H*K)."""
    rows = []
    for v in tdqkr_variants(P):
        m = v.model.plan.memory
        b = model_budget(v.model, context_len=P.context_len)
        rows.append({"variant": v.name, **dict(v.tags), "k_dim": m.k_dim, "n_keys": m.n_keys,
                     "values_N": m.n_slots, "d_ff": v.model.d_ff, "total_params": b.total_params,
                     "active_params": b.active_params, "flops_per_token": b.flops_per_token,
                     "values_read_per_token": m.heads * m.top_k})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# The mechanism, one forward pass with shapes
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def tiny_forward(seed: int = 0, *, d_model: int = 8, n_keys: int = 6, k_dim: int = 4, rank: int = 2,
                 top_k: int = 3, n_tokens: int = 4) -> pd.DataFrame:
    """One TDQKR forward on a tiny UltraMem (1 head, E = 1, no projection), step by step with the
    layer's own parameters: (step, tensor, shape, meaning) rows. The last row checks that the steps
    reproduce ``layer(x)`` (max |difference|); the two rows before it give the search recall of the
    signed and of the two-sided search on these tokens."""
    torch.manual_seed(seed)
    cfg = UltraMemConfig(d_model=d_model, n_keys=n_keys, heads=1, k_dim=k_dim, top_k=top_k, d_value=d_model,
                         rank=rank, n_cores=1, expansion=1, value_proj=False, scoring="tucker")
    layer = UltraMem(cfg).eval()
    x = torch.randn(n_tokens, d_model)                                       # (T, D)
    s_row, s_col = layer.side_scores(x)                                      # (T, H, R, n) each
    C = layer.cores.sum(0)                                                   # (H, R, R)
    grid = torch.einsum("thai,hab,thbj->thij", s_row, C, s_col)              # S_rowᵀ C S_col: (T, H, n, n)
    u, t = layer.u, layer.t                                                  # (H, R) rank-1 proxy of C
    p_row = torch.einsum("ha,thai->thi", u, s_row)                           # uᵀ S_row: (T, H, n)
    p_col = torch.einsum("hb,thbj->thj", t, s_col)                           # tᵀ S_col: (T, H, n)
    rows_I = p_row.topk(cfg.m, dim=-1).indices                               # (T, H, m)
    cols_J = p_col.topk(cfg.m, dim=-1).indices
    slots, scores, core_scores = layer.search(s_row, s_col)                  # (T, H, K), (T, H, K), (T, H, K, h)
    exact = grid.flatten(-2).topk(top_k, dim=-1)                             # brute force over n² cells
    y_steps = layer.read(slots.flatten(1), core_scores.flatten(1, 2))        # Σ_k score_k V[slot_k]: (T, D)
    y_layer, _ = layer(x)
    recall = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / top_k
                            for a, b in zip(slots.flatten(1), exact.indices.flatten(1))]))
    recall_two = _twin(layer, "two_sided").search_recall(x)
    sh = lambda z: tuple(z.shape)  # noqa: E731
    rows = [
        ("input", "x", sh(x), "T tokens of width D"),
        ("query", "q_row, q_col = split(W_q x)", (n_tokens, 2, k_dim), "one D_k-vector per side (shared by the R key components)"),
        ("side scores", "S_row = K_row q_row", sh(s_row), "(T, H, R, n): R scores per row key"),
        ("side scores", "S_col = K_col q_col", sh(s_col), "(T, H, R, n): R scores per column key"),
        ("core", "C = Σ_c C^(c)", sh(C), "(H, R, R) Tucker core (summed over the h cores)"),
        ("grid (not computed by the layer)", "S_rowᵀ C S_col", sh(grid), "(T, H, n, n) bilinear score of every slot"),
        ("rank-1 proxy", "u, t = top singular vectors of C", sh(u), "(H, R) each; C ≈ λ₁ u tᵀ"),
        ("proxy scores", "uᵀ S_row, tᵀ S_col", sh(p_row), "(T, H, n) one number per row / column"),
        ("candidates", "I = TopM(uᵀ S_row)", sh(rows_I), f"(T, H, m): the m = {cfg.m} rows with the largest proxy"),
        ("candidates", "J = TopM(tᵀ S_col)", sh(cols_J), f"(T, H, m): m columns; I x J = m² = {cfg.m ** 2} cells"),
        ("selection", "top-K of S_rowᵀ C S_col over I x J", sh(slots), "(T, H, K) slots i·n + j, scored exactly"),
        ("scores", "s_k", sh(scores), "raw bilinear scores (no softmax)"),
        ("output", "y = Σ_k s_k V[slot_k]", sh(y_steps), "(T, D): K value rows of N = n² read per token"),
        ("search recall", f"|found ∩ exact top-K| / K = {recall:.3f}", (), "signed proxy vs brute force, these tokens"),
        ("search recall", f"two-sided: {recall_two:.3f}", (), "the same weights, also the m most negative proxies"),
        ("check", f"max |y - layer(x)| = {float((y_steps - y_layer).abs().max()):.1e}", (),
         "the steps above are the layer's forward"),
    ]
    return pd.DataFrame(rows, columns=["step", "tensor", "shape", "meaning"])


# ----------------------------------------------------------------------------------------------
# Search recall on the inputs the trained memory receives
# ----------------------------------------------------------------------------------------------


def _twin(layer: UltraMem, proxy_search: str) -> UltraMem:
    """The same weights with another search (the proxy buffers u, t travel in the state dict)."""
    twin = UltraMem(dataclasses.replace(layer.cfg, proxy_search=proxy_search))
    twin.load_state_dict(layer.state_dict())
    return twin.to(next(layer.parameters()).device).eval()


@torch.no_grad()
def search_recalls(model: nn.Module, x: torch.Tensor, answer_positions: torch.Tensor) -> dict[str, float]:
    """Recall of the exact top-K for the model's own search (``search_recall``) and, for Tucker
    layers, for the signed and the two-sided search on the same weights (``recall_signed``,
    ``recall_two_sided``; NaN for additive scoring, whose search is exact). Means over memory
    layers, heads and the answer positions of ``x`` (B, T) (the memory's inputs there are captured
    with a forward hook)."""
    layers = [m for m in model.modules() if isinstance(m, UltraMem)]
    captured: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, args[0].detach()))
             for i, m in enumerate(layers)]
    was = model.training
    try:
        model.eval()
        model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    own, signed, two = [], [], []
    for i, layer in enumerate(layers):
        h = captured[i][answer_positions]                                   # (n_answers, D)
        own.append(layer.search_recall(h))
        if layer.cfg.scoring == "tucker":
            signed.append(_twin(layer, "signed").search_recall(h))
            two.append(_twin(layer, "two_sided").search_recall(h))
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"search_recall": mean(own), "recall_signed": mean(signed), "recall_two_sided": mean(two)}


def recall_inputs(P: TDQKRParams, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``recall_rows`` stored facts as model inputs (B, row_len - 1) and the boolean mask
    of their answer positions (the token whose memory read must retrieve the answer)."""
    fs = load_dataset(P.data_config(), False).extras["facts"]
    ev = fs.eval_set("stored")
    x, y = inputs_targets(ev.tokens[:P.recall_rows], ev.answer_mask[:P.recall_rows])
    return x.to(device), (y != -100).to(device)


def init_recalls(v: Variant, seed: int, x: torch.Tensor, answer: torch.Tensor) -> dict[str, float]:
    """:func:`search_recalls` at step 0: the model built exactly as the training run builds it."""
    torch.manual_seed(seed)
    model = LM(v.model)
    return {f"init_{k}": val for k, val in search_recalls(model, x, answer).items()}


def recall_table(table: pd.DataFrame) -> pd.DataFrame:
    """Search recall per Tucker arm, paired per seed: the signed (release) and the two-sided search
    on the same trained weights, at step 0 and after training; ``delta_mean`` etc. are
    two-sided - signed after training (a paired t-interval over seeds, :func:`stats.paired_difference`)."""
    need = {"variant", "seed", "recall_signed", "recall_two_sided"}
    if not need <= set(table.columns):
        raise KeyError(f"recall_table: columns {sorted(need - set(table.columns))} missing")
    rows = []
    for v, g in table.groupby("variant", sort=False):
        g = g.dropna(subset=["recall_signed", "recall_two_sided"])
        if g.empty:
            continue
        d = stats.paired_difference(g["recall_two_sided"].to_numpy(), g["recall_signed"].to_numpy())
        row = {"variant": f"{v}: two-sided search", "reference": f"{v}: signed search", "metric": "search_recall",
               "n": d.n, "signed_mean": float(g["recall_signed"].mean()),
               "two_sided_mean": float(g["recall_two_sided"].mean())}
        for k in ("init_recall_signed", "init_recall_two_sided"):
            row[k.replace("recall_", "") + "_mean"] = float(g[k].mean()) if k in g else float("nan")
        row.update({"delta_mean": d.mean, "ci_low": d.ci_low, "ci_high": d.ci_high, "sd": d.sd,
                    "p_value": d.p_value,
                    "resolution": stats.min_detectable_effect(d.sd, d.n) if d.n >= 2 and d.sd > 0 else float("nan")})
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Interpretation
# ----------------------------------------------------------------------------------------------


def _row(deltas: pd.DataFrame, variant: str) -> Mapping[str, Any] | None:
    hit = deltas[deltas["variant"] == variant]
    return None if hit.empty else hit.iloc[0].to_dict()


def _ci(r: Mapping[str, Any], fmt: str = "+.3f") -> str:
    return f"95% CI {r['ci_low']:{fmt}} .. {r['ci_high']:{fmt}}"


def _said(r: Mapping[str, Any], unit: str, fmt: str = "+.3f") -> str:
    res = r.get("resolution", math.nan)
    res_txt = f", resolution {res:{fmt.lstrip('+')}} {unit}" if res is not None and math.isfinite(res) else ""
    return f"{r['delta_mean']:{fmt}} {unit} ({_ci(r, fmt)}{res_txt}, n = {int(r['n'])})"


def _resolved(r: Mapping[str, Any]) -> bool:
    return math.isfinite(r["ci_low"]) and (r["ci_low"] > 0 or r["ci_high"] < 0)


def interpret(result: Any) -> str:
    """A paragraph on this run, written from its tables: the answer-loss and accuracy effect of
    rank-2 scoring vs additive scoring, what the design resolves and what it does not, the search
    recall of the signed and two-sided searches and what the two-sided search bought in loss.
    ``result``: a :class:`TDQKRResult` (or anything with ``deltas``, ``accuracy_deltas``,
    ``recall`` and ``summary`` tables)."""
    d, acc, rec, summ = result.deltas, result.accuracy_deltas, result.recall, result.summary
    out = []
    r = _row(d, RELEASE)
    a = _row(acc, RELEASE)
    if r is not None:
        direction = "lower" if r["delta_mean"] < 0 else "higher"
        verdict = ("resolved" if _resolved(r) else "not resolved: the interval contains zero")
        out.append(f"Rank-2 Tucker scoring (R=2, the release's signed search) ends with a {direction} answer "
                   f"loss than additive scoring: Δ = {_said(r, 'nats')}; {verdict}.")
        if a is not None:
            pts = {k: 100 * a[k] for k in ("delta_mean", "ci_low", "ci_high", "resolution")}
            out.append(f"In exact-match accuracy that is {_said({**a, **pts}, 'points', '+.1f')}.")
        res = r.get("resolution", math.nan)
        if math.isfinite(res):
            out.append(f"With this many seeds the design detects an answer-loss effect of {res:.3f} nats or more "
                       f"with 80% power; smaller true effects, such as the paper's {PAPER_DELTAS[RELEASE]:+.3f} "
                       "(validation loss of a 151M-activated LM, not an answer-token loss on facts), are not "
                       "resolved here: only the direction can be compared with the paper's claim.")
        same = (r["delta_mean"] < 0) == (PAPER_DELTAS[RELEASE] < 0)
        out.append(f"The direction {'agrees' if same else 'disagrees'} with the paper's (TDQKR lowers loss)"
                   + ("." if _resolved(r) else ", but the sign of an unresolved difference is not evidence either way."))
    two = _row(d, "R=2 two-sided")
    if not rec.empty:
        rr = rec.iloc[0].to_dict()
        out.append(f"Search recall of the trained {rr['variant'].split(':')[0]} layer at the answer position: the "
                   f"signed search finds {rr['signed_mean']:.3f} of the exact top-K, the two-sided search "
                   f"{rr['two_sided_mean']:.3f} on the same weights (Δ {rr['delta_mean']:+.3f}, {_ci(rr)}).")
        init_s = rr.get("init_signed_mean", math.nan)
        if math.isfinite(init_s):
            change = rr["signed_mean"] - init_s
            how = ("training shaped the keys around the signed search, which misses less than at init"
                   if change > 0.05 else
                   "training did not teach the keys to avoid the signed search's misses" if abs(change) <= 0.05
                   else "the signed search misses more after training than at init")
            out.append(f"At step 0 the signed search found {init_s:.3f} and the two-sided "
                       f"{rr.get('init_two_sided_mean', math.nan):.3f}: {how} ({change:+.3f}).")
    if two is not None and r is not None:
        diff = two["delta_mean"] - r["delta_mean"]
        out.append(f"Whether the better search pays off in answer loss: two-sided minus signed is {diff:+.3f} nats "
                   "in the means (its paired interval is in the table against R=2); a search that finds more of "
                   "the exact top-K need not train better: training only sees the cells its own search selects, "
                   "and the cells the signed search misses need not be the ones an answer depends on.")
    if "lambda2_mean" in summ.columns and "lambda1_mean" in summ.columns:
        lam = summ[summ["variant"] == RELEASE]
        if not lam.empty and math.isfinite(lam["lambda2_mean"].iloc[0]) and lam["lambda2_mean"].iloc[0] > 0:
            ratio = lam["lambda1_mean"].iloc[0] / lam["lambda2_mean"].iloc[0]
            out.append(f"The summed core of R=2 ends with λ₁/λ₂ = {ratio:.1f}: "
                       + ("close to rank 1, where the proxy search is nearly exact." if ratio > 4 else
                          "far from rank 1, so the rank-1 proxy leaves room for misses."))
    out.append("What this does not resolve: effects smaller than the resolution above, anything about large "
               "models or long training (this is a 32-wide trunk trained for a few hundred steps), and IVE, "
               "half-width values or the skip layer, which every arm here leaves out.")
    return " ".join(out)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclass
class TDQKRResult:
    table: pd.DataFrame              # one row per (variant, seed)
    summary: pd.DataFrame            # per variant: mean, std, 95% CI of every metric
    deltas: pd.DataFrame             # headline: answer loss vs additive (with the paper's deltas)
    accuracy_deltas: pd.DataFrame    # answer accuracy vs additive
    kbit_deltas: pd.DataFrame        # stored kbit vs additive
    search_deltas: pd.DataFrame      # answer loss of the search / core switches vs R=2 (empty if none)
    recall: pd.DataFrame             # search recall, two-sided vs signed, per Tucker arm
    init: pd.DataFrame               # step-0 output std of the memory (before / after calibration) per arm
    variants: pd.DataFrame           # what each arm is and what is held equal
    history: pd.DataFrame
    figures: dict[str, Any]


SUMMARY_METRICS = (*FACTS_METRICS, "search_recall", "recall_signed", "recall_two_sided", "init_recall_signed",
                   "init_recall_two_sided", "lambda1", "lambda2", "coverage", "init_std_before", "init_std",
                   "init_target", "train_seconds")


def run(P: TDQKRParams) -> TDQKRResult:
    """Train every arm x seed on the facts task and build the tables and figures (see the module doc)."""
    if not isinstance(P, TDQKRParams):
        raise ConfigError(f"tdqkr.run: P={P!r} is not allowed: must be a TDQKRParams")
    E = P.effective()
    variants = tdqkr_variants(E)
    x_rec, ans = recall_inputs(E)
    with lab_run(P, NOTEBOOK) as rd:
        def extra(v: Variant, res: Any) -> dict[str, float]:
            dev = next(res.model.parameters()).device
            return search_recalls(res.model, x_rec.to(dev), ans.to(dev))

        tcfg = E.train_config(eval_every=max(1, E.steps // 4))
        table = run_variants(variants, E.seeds, E.data_config(), tcfg, rd.path / "train", log=rd.log,
                             extra_metrics=extra, calibrate=E.calibrate_init)
        at_init = pd.DataFrame([{"variant": v.name, "seed": s, **init_recalls(v, s, x_rec, ans)}
                                for v in variants for s in E.seeds])
        table = table.merge(at_init, on=["variant", "seed"], how="left", validate="one_to_one")
        summary = summarize(table, [m for m in SUMMARY_METRICS if m in table.columns])
        deltas = paired_deltas(table, "answer_loss", baseline=BASELINE, paper=PAPER_DELTAS)
        accuracy = paired_deltas(table, "answer_accuracy", baseline=BASELINE, higher_is_better=True)
        kbit = paired_deltas(table, "stored_kbit", baseline=BASELINE, higher_is_better=True)
        tucker = table[table["variant"] != BASELINE]
        search = (paired_deltas(tucker, "answer_loss", baseline=RELEASE)
                  if RELEASE in set(tucker["variant"]) and tucker["variant"].nunique() > 1 else pd.DataFrame())
        recall = recall_table(table)
        init = summary[["variant", "init_std_before_mean", "init_std_mean", "init_target_mean"]]
        history = rd.history()
        evals = history[history.get("kind", pd.Series(dtype=str)) == "eval"] if len(history) else history
        figures = {
            "deltas_vs_additive": deltas_figure(deltas, PAPER_DELTAS, "Δ answer loss vs additive scoring "
                                                "(lab, mean ± 95% CI over seeds) and the paper's Δ val loss"),
            "search_recall": _recall_figure(table),
            "answer_accuracy": variants_figure(table, "answer_accuracy", title="Answer accuracy per arm"),
            "accuracy_during_training": history_lines(evals, "answer_accuracy",
                                                      "Answer accuracy during training (mean over seeds)"),
        }
        key_tables = {"deltas_vs_additive": deltas, "search_recall": recall}
        if len(search):
            key_tables["deltas_vs_release_search"] = search
        key_tables.update({"accuracy_vs_additive": accuracy, "stored_kbit_vs_additive": kbit,
                           "init_std": init, "means": summary})
        save_outputs(rd, NOTEBOOK, table, figures, key_tables)
    return TDQKRResult(table, summary, deltas, accuracy, kbit, search, recall, init, variants_table(E), history,
                       figures)


def _recall_figure(table: pd.DataFrame) -> Any:
    """Search recall per arm: the signed and the two-sided search on the same trained weights, and at
    step 0 (seeds as dots, mean as a bar)."""
    import plotly.graph_objects as go

    t = table.dropna(subset=["recall_signed"])
    fig = go.Figure()
    for col, name in (("init_recall_signed", "signed, step 0"), ("init_recall_two_sided", "two-sided, step 0"),
                      ("recall_signed", "signed (release), trained"), ("recall_two_sided", "two-sided, trained")):
        if col in t:
            m = t.groupby("variant", sort=False)[col].mean()
            fig.add_trace(go.Bar(x=m.index, y=m.values, name=name))
    fig.update_layout(title="Search recall of the exact top-K at the answer position", barmode="group",
                      xaxis_title="arm (same weights, two searches)", yaxis_title="recall", yaxis_range=[0, 1.02],
                      template="plotly_white")
    return fig


def model_for(P: TDQKRParams, name: str) -> ModelConfig:
    """The ModelConfig of arm ``name`` (ConfigError naming the arms if there is none)."""
    vs = {v.name: v.model for v in tdqkr_variants(P)}
    if name not in vs:
        raise ConfigError(f"tdqkr.model_for: name={name!r} is not allowed: must be one of {list(vs)}")
    return vs[name]
