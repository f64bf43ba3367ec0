"""Results figures: a ``labcore.results`` table in, a plotly Figure out. No I/O, no state.

Metric vs a swept parameter, training-history lines, latency vs batch size on log axes. Axis titles
come from :func:`labcore.viz.style.label` (the column with its unit). The tour's drawings are in
``labcore.viz.tour_plots``, the ablation notebooks' in ``labcore.viz.figures``.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from labcore.viz.style import label, layout


def metric_figure(df: pd.DataFrame, x: str, y: str, color: str | None = None,
                  title: str | None = None) -> go.Figure:
    """y vs x, one trace per value of ``color``. Numeric x: points joined in x order (mean over
    duplicates); categorical x: bars of the mean. Rows with a missing y are dropped."""
    for c in (x, y) + ((color,) if color else ()):
        if c not in df.columns:
            raise KeyError(f"metric_figure: column {c!r} not in the table; columns: {list(df.columns)}")
    d = df.dropna(subset=[y])
    groups = [(None, d)] if color is None else [(k, g) for k, g in d.groupby(color, sort=True, dropna=False)]
    numeric_x = pd.api.types.is_numeric_dtype(d[x]) and not pd.api.types.is_bool_dtype(d[x])
    fig = go.Figure()
    for key, g in groups:
        name = y if key is None else f"{color}={key}"
        mean = g.groupby(x, sort=True)[y].mean()
        if numeric_x:
            fig.add_trace(go.Scatter(x=mean.index.to_numpy(), y=mean.to_numpy(), mode="lines+markers", name=name))
        else:
            fig.add_trace(go.Bar(x=[str(v) for v in mean.index], y=mean.to_numpy(), name=name))
    return layout(fig, title or f"{y} vs {x}" + (f" by {color}" if color else ""), label(x), label(y),
                   barmode="group")


def history_figure(df: pd.DataFrame, y: str, x: str = "step", color: str | None = "run_id",
                   title: str | None = None) -> go.Figure:
    """Training-history lines: y vs x (steps), one line per run."""
    color = color if color in df.columns else None
    return metric_figure(df, x, y, color=color, title=title or f"{y} during training")


def latency_vs_batch_figure(df: pd.DataFrame, y: str = "latency_ms", x: str = "batch_size",
                            color: str | None = "layer", title: str | None = None) -> go.Figure:
    """Latency vs batch size, both axes logarithmic, one line per layer."""
    color = color if color in df.columns else None
    fig = metric_figure(df, x, y, color=color, title=title or f"{y} vs {x} (log-log)")
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return fig
