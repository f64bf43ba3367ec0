"""What every labcore figure shares: the highlight colours, axis titles with units, the layout.

One notation across figures (B, T, D, E, K, H, N, R, n as in ``labcore/__init__.py``); every axis
title carries a unit (counts, fractions, ms, tokens, "a.u." for raw scores).
"""

from __future__ import annotations

import plotly.graph_objects as go

CHOSEN = "#d62728"      # selected experts / slots
OTHER = "#9aa5b1"       # not selected
EXACT = "#2ca02c"       # exact top-K (TDQKR)
CANDIDATE = "#ffffff"   # candidate cells outline

UNITS = {"loss": "nats", "val_loss": "nats", "train_loss": "nats", "ppl": "perplexity", "step": "steps",
         "tokens": "tokens", "latency_ms": "ms", "time_ms": "ms", "wall_s": "s", "batch_size": "tokens",
         "params": "count", "flops": "FLOPs", "bytes": "bytes", "gb": "GB", "accuracy": "fraction",
         "acc": "fraction", "coverage": "fraction", "recall": "fraction"}


def label(column: str) -> str:
    """Axis title for a table column: the column name with its unit when known, e.g. 'val_loss (nats)'."""
    for key in (column, column.split("/")[-1], column.split(".")[-1]):
        if key in UNITS:
            return f"{column} ({UNITS[key]})"
    for suffix, unit in (("_ms", "ms"), ("_s", "s"), ("_loss", "nats"), ("_frac", "fraction"),
                         ("_fraction", "fraction"), ("_count", "count"), ("_gb", "GB")):
        if column.endswith(suffix):
            return f"{column} ({unit})"
    return f"{column} (value)"


def layout(fig: go.Figure, title: str, x: str, y: str, *, bottom: int = 50, **kw) -> go.Figure:
    """Title, axis titles and the white template; ``bottom``: the lower margin in px (room for a legend)."""
    fig.update_layout(title=dict(text=title), xaxis_title=x, yaxis_title=y, template="plotly_white",
                      margin=dict(l=60, r=20, t=60, b=bottom), **kw)
    return fig
