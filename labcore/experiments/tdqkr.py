"""01_tdqkr: additive product keys (PKM) vs Tucker-decomposed query-key retrieval (TDQKR).

TDQKR (docs/mechanisms.md §1.3) scores the slot (i, j) of the n x n grid with a bilinear form
``S_row[:, i]ᵀ C S_col[:, j]`` (rank R) instead of PKM's sum ``s_row[i] + s_col[j]``. The exact
top-K of a bilinear grid is not inside the Cartesian product of the per-side top-m lists, so the
layer searches with the rank-1 approximation ``C ≈ λ₁ u tᵀ`` of the summed cores: top-m rows by
``uᵀ S_row``, top-m columns by ``tᵀ S_col``, then the m² candidates are scored exactly. This
notebook measures:

- **search recall**: the fraction of the exact top-K (brute force over the whole grid,
  :meth:`~labcore.layers.ultramem.UltraMem.search_recall`) that the approximate search returns, on
  the trained layer's real inputs (additive scoring is exact by construction: recall 1), for the
  release's signed search (the m largest proxies per side) and the two-sided search
  (``proxy_search="two_sided"``: also the m most negative per side, exact when the summed core is
  rank 1 and the top-K scores are positive);
- quality: validation loss and knowledge recall of additive vs R = 1..4, multi-core scoring h, and
  the Tucker auxiliary loss on/off (α = 0.001, τ = 0.15);
- the Tucker singular values λ₁, λ₂ of the summed core over training (the aux loss keeps λ₂ > τ
  from growing; UltraMemV2 saw λ₁ > 4 λ₂ without it).

Paper (Table 3, with IVE): R = 2 / 3 / 4 -> -0.008 / -0.0084 / -0.0082 val loss vs additive.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from labcore.experiments.common import lab_run, save_outputs
from labcore.experiments.core import Variant, paired_deltas, run_variants, summarize
from labcore.experiments.params import TDQKRParams
from labcore.layers.ultramem import UltraMem, UltraMemConfig
from labcore.lm.model import SparsePlan
from labcore.viz.figures import deltas_figure, history_lines, variants_figure

NOTEBOOK = "01_tdqkr"
PAPER_RANK_DELTAS = {"R=2": -0.008, "R=3": -0.0084, "R=4": -0.0082}


def tdqkr_variants(P: TDQKRParams) -> list[Variant]:
    D, mid = P.d_model, P.n_layers // 2
    base = UltraMemConfig(d_model=D, n_keys=P.n_keys, heads=2, k_dim=max(8, D // 2), top_k=P.top_k,
                          d_value=D // 2, rank=2, n_cores=1, expansion=1, scoring="tucker")
    place = (f"{mid}:{mid}",)

    def v(name: str, cfg: UltraMemConfig, **tags: Any) -> Variant:
        return Variant(name, P.model(SparsePlan(kind="memory", memory=cfg, placements=place)), tags=tags)

    out = [v("additive", dataclasses.replace(base, scoring="additive", rank=1), rank=0, cores=1)]
    out += [v(f"R={r}", dataclasses.replace(base, rank=r), rank=r, cores=1) for r in P.ranks]
    out += [v(f"R=2 h={h}", dataclasses.replace(base, n_cores=h), rank=2, cores=h) for h in P.cores if h != 1]
    if P.aux_loss:
        out.append(v("R=2 +aux", dataclasses.replace(base, tucker_aux=True), rank=2, cores=1))
    if P.exact_search:
        out.append(v("R=2 exact", dataclasses.replace(base, candidate_m=P.n_keys), rank=2, cores=1))
    if P.two_sided:
        out.append(v("R=2 two-sided", dataclasses.replace(base, proxy_search="two_sided"), rank=2, cores=1))
    return out


@torch.no_grad()
def search_recall(model: torch.nn.Module, idx: torch.Tensor, n_tokens: int = 64) -> float:
    """Mean over memory layers, tokens and heads of |approximate top-K ∩ exact top-K| / K, on the
    inputs the memory layers really receive when ``model`` reads ``idx`` (captured with hooks)."""
    layers = [m for m in model.modules() if isinstance(m, UltraMem)]
    captured: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: captured.setdefault(i, args[0].detach()))
             for i, m in enumerate(layers)]
    try:
        was = model.training
        model.eval()
        model(idx)
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    recalls = [layer.search_recall(captured[i].reshape(-1, layer.cfg.d_model)[:n_tokens])  # (n_tokens, D)
               for i, layer in enumerate(layers)]
    return float(sum(recalls) / len(recalls)) if recalls else float("nan")


@dataclass
class TDQKRResult:
    table: pd.DataFrame
    summary: pd.DataFrame
    deltas: pd.DataFrame
    history: pd.DataFrame
    figures: dict[str, Any]


def run(P: TDQKRParams) -> TDQKRResult:
    E = P.effective()
    variants = tdqkr_variants(E)
    data = E.data_config()
    with lab_run(P, NOTEBOOK) as rd:
        def extra(v: Variant, res: Any) -> dict[str, float]:
            x, _ = res.data.sampler("val", 4, E.seq_len, 0).micro_batches(0)[0]
            dev = next(res.model.parameters()).device
            return {"search_recall": search_recall(res.model, x.to(dev), E.recall_tokens)}

        tcfg = E.train_config(eval_every=max(1, E.steps // 4))
        table = run_variants(variants, E.seeds, data, tcfg, rd.path / "train", log=rd.log,
                             extra_metrics=extra)
        summary = summarize(table, ["val_loss", "recall_qa", "search_recall", "lambda1", "lambda2"])
        deltas = paired_deltas(table, "val_loss", baseline="additive")
        deltas["paper_delta"] = deltas["variant"].map(PAPER_RANK_DELTAS)
        history = rd.history()
        lam = history.filter(like="lambda2").columns.tolist()
        if lam:
            history["lambda2_mean"] = history[lam].mean(axis=1)
        figures = {
            "search_recall": variants_figure(table, "search_recall", title="Approximate search recall of the exact top-K"),
            "val_loss": variants_figure(table, "val_loss", title="Validation loss per scoring variant"),
            "deltas_vs_additive": deltas_figure(deltas, PAPER_RANK_DELTAS, "Δ val loss vs additive (PKM) scoring"),
            "lambda2": history_lines(history, "lambda2_mean" if lam else "val_loss",
                                     "λ₂ of the summed Tucker core during training"),
        }
        save_outputs(rd, NOTEBOOK, table, figures, {"means": summary, "deltas_vs_additive": deltas})
    return TDQKRResult(table, summary, deltas, history, figures)
