"""The inference benchmark's figure: UltraMem's Figure 1 (docs/mechanisms.md §2.2) on this machine.

A ``labcore.bench.inference`` table in, a plotly Figure out. Each model's label and colour come from
the layer registry (``labcore.layers.registry``), the model order from the equal-budget family
(``labcore.lm.budget.family_names``); the benchmark passes its MoE / UltraMem ratio table. This
module does not import the benchmark: the benchmark imports it to write ``inference.html``.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labcore.layers.registry import get
from labcore.lm.budget import family_names

X_TITLE = "batch size B (sequences, one new token each)"
Y_TITLES = ("latency per decode step (ms)", "memory accessed per step (MB)", "latency MoE / UltraMem (x)")


def inference_figure(df: pd.DataFrame, ratio: pd.DataFrame, scope: str = "model") -> go.Figure:
    """Figure 1 on this machine: (a) latency vs B, (b) memory access vs B (measured solid, cost model
    dashed), (c) MoE / UltraMem latency ratio per batch size.

    df: the benchmark's table (one row per model x scope x batch); ratio: columns ``batch`` and
    ``latency_ratio`` for panel (c) (``labcore.bench.inference.moe_ultramem_ratio``)."""
    d = df[df["scope"] == scope].sort_values(["model", "batch"])
    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        f"(a) decode-step latency ({scope})", f"(b) memory access ({scope})", "(c) MoE / UltraMem latency"))
    for name in [m for m in family_names(every_memory=True) if m in set(d["model"])]:
        g = d[d["model"] == name]
        color, label = get(name).color, get(name).label
        iqr_ms = {"type": "data", "array": g["latency_iqr_s"] * 1e3, "visible": True}
        fig.add_trace(go.Scatter(x=g["batch"], y=g["latency_s"] * 1e3, mode="lines+markers", name=label,
                                 legendgroup=name, line={"color": color}, error_y=iqr_ms), row=1, col=1)
        fig.add_trace(go.Scatter(x=g["batch"], y=g["predicted_s"] * 1e3, mode="lines",
                                 name=f"{label} (roofline)", legendgroup=name,
                                 line={"color": color, "dash": "dash"}), row=1, col=1)
        fig.add_trace(go.Scatter(x=g["batch"], y=g["bytes_accessed"] / 1e6, mode="lines+markers",
                                 name=f"{label} memory access", legendgroup=name, line={"color": color},
                                 showlegend=False), row=1, col=2)
        fig.add_trace(go.Scatter(x=g["batch"], y=g["bytes_predicted"] / 1e6, mode="lines",
                                 name=f"{label} memory access (cost model)", legendgroup=name,
                                 line={"color": color, "dash": "dash"}, showlegend=False), row=1, col=2)
    if len(ratio):
        fig.add_trace(go.Scatter(x=ratio["batch"], y=ratio["latency_ratio"], mode="lines+markers+text",
                                 name="MoE / UltraMem latency",
                                 text=[f"{r:.1f}x" for r in ratio["latency_ratio"]],
                                 textposition="top center", line={"color": "black"}), row=1, col=3)
    for col in (1, 2, 3):
        fig.update_xaxes(type="log", title_text=X_TITLE, row=1, col=col)
        fig.update_yaxes(title_text=Y_TITLES[col - 1], row=1, col=col, type="log" if col < 3 else "linear")
    dev = d["device"].iloc[0] if len(d) else "?"
    fig.update_layout(title=f"Decode-step cost vs batch size on {dev} (equal activated compute; "
                            "MoE/PKM/UltraMem at equal total parameters; no KV cache)",
                      height=480, width=1500, legend={"orientation": "h", "y": -0.25})
    return fig
