"""Figures of the ablation notebooks: pure functions, a result table in, a plotly Figure out.

Every comparison shows its spread: one dot per seed, the mean with a 95% confidence interval.
Cost curves (latency and memory bytes vs decode batch size) are drawn on log-log axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labcore.experiments.core import mean_ci
from labcore.viz.style import label, layout

SEED_DOT = "#9aa5b1"
MEAN = "#1f77b4"
PAPER = "#ff7f0e"


def _layout(fig: go.Figure, title: str, x: str, y: str, **kw) -> go.Figure:
    return layout(fig, title, x, y, bottom=80, **kw)


def variants_figure(table: pd.DataFrame, metric: str, order: Sequence[str] | None = None,
                    title: str | None = None) -> go.Figure:
    """``metric`` per variant: seeds as grey dots, mean +- 95% CI in blue (2 traces)."""
    if metric not in table.columns:
        raise KeyError(f"variants_figure: column {metric!r} not in the table")
    order = list(order) if order is not None else list(dict.fromkeys(table["variant"]))
    means, cis = [], []
    for v in order:
        m, _, ci, _ = mean_ci(table.loc[table["variant"] == v, metric].tolist())
        means.append(m)
        cis.append(0.0 if not np.isfinite(ci) else ci)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=table["variant"], y=table[metric], mode="markers", name="seeds",
                             marker=dict(color=SEED_DOT, size=7), text=[f"seed {s}" for s in table["seed"]]))
    fig.add_trace(go.Scatter(x=order, y=means, mode="markers", name="mean ± 95% CI",
                             marker=dict(color=MEAN, size=11, symbol="diamond"),
                             error_y=dict(type="data", array=cis, visible=True)))
    fig.update_xaxes(categoryorder="array", categoryarray=order)
    return _layout(fig, title or f"{metric} per variant", "variant", label(metric))


def deltas_figure(deltas: pd.DataFrame, paper: Mapping[str, float] | None = None,
                  title: str | None = None, *, panel_ratio: float = 3.0) -> go.Figure:
    """Paired deltas (lab, mean ± 95% CI over seeds) and the paper's deltas, one bar per variant.

    Like is compared with like: when the lab's intervals are much wider than the paper's deltas (the
    median CI half-width is more than ``panel_ratio`` times the median |paper delta|), one shared
    axis would squash the paper's bars to nothing, so the paper's deltas get a second panel below
    with their own scale (same x). Otherwise the bars are grouped on one axis."""
    x = deltas["variant"].tolist()
    metric = deltas["metric"].iloc[0] if len(deltas) else "metric"
    ci = deltas["delta_ci95"].astype(float).fillna(0.0)
    lab = go.Bar(x=x, y=deltas["delta_mean"], name="lab (mean ± 95% CI over seeds)", marker_color=MEAN,
                 error_y=dict(type="data", array=ci, visible=True))
    paper_y = [paper.get(v, np.nan) for v in x] if paper else []
    paper_bar = go.Bar(x=x, y=paper_y, name="paper", marker_color=PAPER)
    finite = np.abs(np.asarray([p for p in paper_y if p is not None and np.isfinite(p)], dtype=float))
    wide = (len(finite) > 0 and float(np.median(finite)) > 0
            and float(np.nanmedian(deltas["delta_ci95"].astype(float))) > panel_ratio * float(np.median(finite)))
    ytitle = f"Δ {label(metric)}"
    if not wide:
        fig = go.Figure([lab, paper_bar] if paper else [lab])
        return _layout(fig, title or f"Δ {metric} per change", "change", ytitle, barmode="group")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12, row_heights=[0.6, 0.4],
                        subplot_titles=("lab: mean ± 95% CI over seeds",
                                        "paper (own scale: its deltas are much smaller than the lab's intervals)"))
    fig.add_trace(lab, row=1, col=1)
    fig.add_trace(paper_bar, row=2, col=1)
    fig = _layout(fig, title or f"Δ {metric} per change", "", ytitle, height=620)
    fig.update_xaxes(title_text="change", row=2, col=1)
    fig.update_yaxes(title_text=ytitle, row=2, col=1)
    return fig


def history_lines(history: pd.DataFrame, metric: str, title: str | None = None) -> go.Figure:
    """``metric`` over training steps: the mean over seeds per variant (one line each)."""
    h = history.dropna(subset=[metric]) if metric in history.columns else history.iloc[0:0]
    fig = go.Figure()
    for v, g in h.groupby("variant", sort=False):
        m = g.groupby("step")[metric].mean()
        fig.add_trace(go.Scatter(x=m.index, y=m.values, mode="lines", name=str(v)))
    return _layout(fig, title or f"{metric} during training (mean over seeds)", "step (optimiser steps)",
                   label(metric))


def xy_figure(summary: pd.DataFrame, x: str, y: str, text: str = "variant", title: str | None = None,
              log_x: bool = False) -> go.Figure:
    """Summary means: y (with its CI when ``<y>_ci95`` exists) against x, labelled by ``text``."""
    ym, yci = f"{y}_mean", f"{y}_ci95"
    xs = summary[f"{x}_mean"] if f"{x}_mean" in summary.columns else summary[x]
    fig = go.Figure(go.Scatter(x=xs, y=summary[ym], mode="markers+text+lines", text=summary[text],
                               textposition="top center", name=y,
                               error_y=dict(type="data", array=summary[yci].fillna(0.0), visible=True)
                               if yci in summary.columns else None))
    if log_x:
        fig.update_xaxes(type="log")
    return _layout(fig, title or f"{y} vs {x}", label(x), label(y))


def cost_curves_figure(cost: pd.DataFrame, y: str, title: str, x: str = "batch_size",
                       x_title: str = "batch size B (tokens per decode step)") -> go.Figure:
    """``y`` vs decode batch size, one line per variant, both axes logarithmic."""
    fig = go.Figure()
    for v, g in cost.groupby("variant", sort=False):
        fig.add_trace(go.Scatter(x=g[x], y=g[y], mode="lines+markers", name=str(v)))
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return _layout(fig, title, x_title, label(y))
