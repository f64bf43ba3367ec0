"""The tour's drawings: a ``labcore.viz.tour`` record in, plotly Figures out; and the tour saved
as a run directory.

Figures: MoE router probabilities, score grids of PKM / TDQKR with the selected cells marked, the
topology-bias bars, the IVE virtual grid coloured by block, load bars (tokens per expert, hits
per value slot), PEER's selected neurons, Memory+'s gate and shared pool, UltraMemV2's pre-values
and ring windows. Axis titles carry units; notation as in ``labcore/__init__.py``. Static export
(PNG/SVG via kaleido) is the caller's business: ``fig.write_image(path)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from labcore.results import RunDir, free_run_dir, repo_path
from labcore.viz.style import CANDIDATE, CHOSEN, EXACT, OTHER, layout
from labcore.viz.tour import (
    IVEMapping,
    MemoryPlusStation,
    MoERouting,
    PEERStation,
    PKMRetrieval,
    TDQKRRetrieval,
    TourRecord,
    UltraMemV2Station,
)


def _cells(slots: Sequence[int], n: int) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(slots, dtype=np.int64)
    return s // n, s % n            # rows, cols of slot ids i*n + j


# ----------------------------------------------------------------------------------------------
# Tour figures.
# ----------------------------------------------------------------------------------------------


def router_figure(routing: MoERouting, title: str | None = None) -> go.Figure:
    """Bar chart of the router's softmax probabilities p_e over all E experts; the K chosen in red."""
    t = routing.table()
    colors = [CHOSEN if c else OTHER for c in t["chosen"]]
    text = [f"w={w:.2f}" if c else "" for c, w in zip(t["chosen"], t["weight"])]
    fig = go.Figure(go.Bar(x=t["expert"], y=t["prob"], marker_color=colors, text=text, name="p_e",
                           hovertemplate="expert %{x}<br>p=%{y:.3f}<extra></extra>"))
    K, E = len(routing.chosen), len(routing.probs)
    return layout(fig, title or f"MoE router: top-{K} of E={E} experts ({routing.router})",
                   "expert id e (index)", "router probability p_e (fraction)", xaxis=dict(dtick=1))


def load_figure(counts: Sequence[int] | np.ndarray, unit: str = "expert", title: str | None = None,
                y_title: str = "hits (count)") -> go.Figure:
    """Bar chart of hits per unit (tokens per expert, or hits per value slot) with the uniform mean."""
    c = np.asarray(counts)
    fig = go.Figure(go.Bar(x=np.arange(len(c)), y=c, marker_color=OTHER, name=f"hits per {unit}"))
    fig.add_hline(y=float(c.mean()), line_dash="dash", line_color=CHOSEN,
                  annotation_text=f"uniform {c.mean():.2f}", annotation_position="top left")
    touched = int((c > 0).sum())
    return layout(fig, title or f"Load: {touched} of {len(c)} {unit}s touched", f"{unit} id (index)", y_title)


def score_grid_figure(grid: np.ndarray, selected: Sequence[int] = (), title: str = "score grid",
                      candidates: np.ndarray | None = None, exact: Sequence[int] = (),
                      score_title: str = "score (a.u.)") -> go.Figure:
    """Heatmap of an (n, n) grid, rows i on y and columns j on x (slot id i*n + j).

    selected: slot ids marked with red crosses (trace "selected"); candidates: (n, n) bool mask
    drawn as open squares (trace "candidates"); exact: slot ids circled in green (trace "exact")."""
    g = np.asarray(grid)
    n = g.shape[0]
    fig = go.Figure(go.Heatmap(z=g, x=np.arange(n), y=np.arange(n), colorscale="Viridis", name="grid",
                               colorbar=dict(title=dict(text=score_title)),
                               hovertemplate="row i=%{y}, col j=%{x}<br>score=%{z:.3f}<extra></extra>"))
    if candidates is not None:
        ci, cj = np.nonzero(np.asarray(candidates))
        fig.add_trace(go.Scatter(x=cj, y=ci, mode="markers", name="candidates",
                                 marker=dict(symbol="square-open", size=18, color=CANDIDATE, line=dict(width=2))))
    if len(exact):
        ei, ej = _cells(exact, n)
        fig.add_trace(go.Scatter(x=ej, y=ei, mode="markers", name="exact top-K",
                                 marker=dict(symbol="circle-open", size=14, color=EXACT, line=dict(width=3))))
    if len(selected):
        si, sj = _cells(selected, n)
        fig.add_trace(go.Scatter(x=sj, y=si, mode="markers+text", name="selected",
                                 text=[str(r) for r in range(len(si))], textposition="top right",
                                 textfont=dict(color=CHOSEN),
                                 marker=dict(symbol="x", size=11, color=CHOSEN)))
    fig = layout(fig, title, "column sub-key j (index)", "row sub-key i (index)",
                  legend=dict(orientation="h", y=-0.15))
    return _square_grid_axes(fig, n)


def _square_grid_axes(fig: go.Figure, n: int) -> go.Figure:
    """Cells as squares, row 0 on top, axes exactly around the n x n cells (markers do not widen them)."""
    fig.update_yaxes(range=[n - 0.5, -0.5], scaleanchor="x", constrain="domain")
    fig.update_xaxes(range=[-0.5, n - 0.5], constrain="domain")
    return fig


def pkm_figure(pkm: PKMRetrieval) -> go.Figure:
    """PKM's additive grid s_row[i] + s_col[j] with the top-K slots marked."""
    return score_grid_figure(pkm.grid, selected=pkm.slots,
                             title=f"PKM: additive grid s_row[i] + s_col[j], n={pkm.n}, top-K={len(pkm.slots)}")


def tdqkr_figure(td: TDQKRRetrieval, title: str | None = None) -> go.Figure:
    """TDQKR's bilinear grid S_row^T C S_col: the m x m candidate cells of the rank-1 proxy (open
    squares), the proxy search's selection (crosses) and the exact top-K (green circles)."""
    m = len(td.rows)
    t = title or (f"TDQKR: S_row^T C S_col, n={td.n}, R={td.core.shape[0]}, m={m}: "
                  f"proxy finds {td.recall:.0%} of the exact top-{len(td.slots)}")
    return score_grid_figure(td.grid, selected=td.slots, candidates=td.candidate_mask,
                             exact=td.exact_slots, title=t)


def topology_bias_figure(table: pd.DataFrame) -> go.Figure:
    """Bars: fraction of queries whose 2nd-best slot shares a row/column with the best (with a
    2-standard-error bar), per scoring, and the random-order baseline 2(n-1)/(n^2-1) as a line."""
    fig = go.Figure(go.Bar(x=table["scoring"], y=table["fraction"], name="measured",
                           error_y=dict(type="data", array=2 * table["stderr"]),
                           marker_color=[CHOSEN if s == "additive" else OTHER for s in table["scoring"]],
                           text=[f"{f:.1%}" for f in table["fraction"]], textposition="outside"))
    base = float(table["random_baseline"].iloc[0])
    fig.add_trace(go.Scatter(x=table["scoring"], y=[base] * len(table), mode="lines", name=(
        f"random baseline 2(n-1)/(n^2-1) = {base:.3f}"), line=dict(dash="dash", color="#333333")))
    n, q = int(table["n"].iloc[0]), int(table["n_queries"].iloc[0])
    fig = layout(fig, f"Topology bias: 2nd-best slot in the best slot's row or column (n={n}, {q} queries)",
                  "scoring of the grid (method)", "queries sharing a row/column (fraction)",
                  legend=dict(orientation="h", y=-0.2))
    fig.update_yaxes(range=[0, 1.15])
    return fig


def ive_figure(mapping: IVEMapping, virtual_slots: Sequence[int] = (), title: str | None = None) -> go.Figure:
    """The virtual grid (sqrt(E) n per side) coloured by projector block; hover shows the physical
    row each virtual slot reads; the token's selected virtual slots are marked."""
    side = mapping.side
    block = mapping.block.reshape(side, side)            # (side, side)
    phys = mapping.physical_row.reshape(side, side)
    E = mapping.expansion
    fig = go.Figure(go.Heatmap(z=block, customdata=phys, colorscale="Turbo", zmin=-0.5, zmax=E - 0.5,
                               name="block", colorbar=dict(title=dict(text="block p (index)"), dtick=1),
                               hovertemplate="virtual row %{y}, col %{x}<br>block p=%{z}"
                                             "<br>physical row=%{customdata}<extra></extra>"))
    if len(virtual_slots):
        vi, vj = _cells(virtual_slots, side)
        fig.add_trace(go.Scatter(x=vj, y=vi, mode="markers", name="selected",
                                 text=[f"phys {p}" for p in mapping.physical_row[np.asarray(virtual_slots)]],
                                 marker=dict(symbol="x", size=11, color="white", line=dict(width=1))))
    shuffled = "shuffled" if mapping.shuffled else "not shuffled"
    fig = layout(fig, title or f"IVE: {E} x {mapping.n_physical} virtual slots -> blocks ({shuffled})",
                  "virtual column j (index)", "virtual row i (index)", legend=dict(orientation="h", y=-0.15))
    return _square_grid_axes(fig, side)


ACTIVATION = "#1f77b4"   # input-dependent factors (PEER activations, UltraMemV2 pre-values)


def _kib(b: float) -> str:
    return f"{b / 1024:.1f} KiB"


def peer_figure(st: PEERStation, title: str | None = None) -> go.Figure:
    """PEER's H*K selected single-neuron experts (x: head h, expert id): router weight g (softmax
    over the head's K), activation sigma(u_i^T x) and their product, the coefficient of v_i."""
    t = st.table()
    x = [f"h{h}: e{e}" for h, e in zip(t["head"], t["expert"])]
    fig = go.Figure([
        go.Bar(x=x, y=t["router_weight"], name="router weight g (softmax over K)", marker_color=OTHER),
        go.Bar(x=x, y=t["activation"], name="activation σ(u_i·x)", marker_color=ACTIVATION),
        go.Bar(x=x, y=t["coefficient"], name="coefficient g·σ(u_i·x) of v_i", marker_color=CHOSEN)])
    touched = st.touched().set_index("what")["bytes_read"]
    H, K = st.heads, st.top_k
    t0 = title or (f"PEER: {H}x{K} = {H * K} of N={st.n_experts} neurons<br>reads "
                   f"{_kib(touched.iloc[0])} (dense FFN width {H * K}: {_kib(touched.iloc[1])}, "
                   f"equal params: {_kib(touched.iloc[2])})")
    return layout(fig, t0, "head h: expert id i (index)", "value (dimensionless)", barmode="group",
                  bottom=140, legend=dict(orientation="h", y=-0.45))


def memory_plus_gate_figure(st: MemoryPlusStation, title: str | None = None) -> go.Figure:
    """Per feature d: the PKM read m_d, the gate SiLU(W_s x)_d and the gated read m_d * gate_d."""
    d = np.arange(len(st.read))
    fig = go.Figure([
        go.Bar(x=d, y=st.read, name="read m(x)", marker_color=OTHER),
        go.Bar(x=d, y=st.gated, name="gated m ⊙ SiLU(W_s x)", marker_color=CHOSEN),
        go.Scatter(x=d, y=st.gate, mode="markers", name="gate SiLU(W_s x)",
                   marker=dict(symbol="diamond", size=9, color=EXACT))])
    nrm = st.norms().iloc[0]
    t0 = title or (f"Memory+: gate per feature<br>|m| = {nrm['read |m|']:.3f} -> |m ⊙ gate| = "
                   f"{nrm['gated |m * gate|']:.3f} -> |y| = {nrm['output |y|']:.3f}")
    return layout(fig, t0, "feature d (index)", "value (dimensionless)", barmode="group",
                  legend=dict(orientation="h", y=-0.2))


def memory_plus_pool_figure(st: MemoryPlusStation, title: str | None = None) -> go.Figure:
    """Heatmap (layers x pool rows) of each layer's hits over the batch on the ONE shared value
    table; crosses: the rows this token reads at each layer."""
    L, N = st.pool_counts.shape
    fig = go.Figure(go.Heatmap(z=st.pool_counts, x=np.arange(N), y=np.arange(L), colorscale="Blues",
                               name="hits", colorbar=dict(title=dict(text="hits (count)")),
                               hovertemplate="layer %{y}, row %{x}<br>hits=%{z}<extra></extra>"))
    ly, lx = np.repeat(np.arange(L), st.layer_slots.shape[1]), st.layer_slots.ravel()
    fig.add_trace(go.Scatter(x=lx, y=ly, mode="markers", name="this token's rows",
                             marker=dict(symbol="x", size=10, color=CHOSEN)))
    shared = "one shared table" if st.shared else "separate tables"
    fig = layout(fig, title or f"Memory+: {L} layers read {shared} of N={N} value rows",
                 "value row (index)", "memory layer l (index)", bottom=90, legend=dict(orientation="h", y=-0.3))
    fig.update_yaxes(autorange="reversed", dtick=1)
    return fig


def ultramem_v2_figure(st: UltraMemV2Station, title: str | None = None) -> go.Figure:
    """UltraMemV2's K selected slots: retrieval score s, pre-value g = <P_pre[row], W_pre x> and the
    weight s * g that multiplies each value row (labels: virtual slot, block, pool row)."""
    t = st.table()
    x = [f"v{v} (p{b}, row {r})" for v, b, r in zip(t["virtual_slot"], t["block"], t["pool_row"])]
    fig = go.Figure([
        go.Bar(x=x, y=t["score s"], name="retrieval score s", marker_color=OTHER),
        go.Bar(x=x, y=t["pre-value g"], name="pre-value g = <P_pre[row], W_pre x>", marker_color=ACTIVATION),
        go.Bar(x=x, y=t["weight s*g"], name="weight s·g", marker_color=CHOSEN)])
    return layout(fig, title or (f"UltraMemV2: top-{len(t)} of E·N = {st.expansion}·{st.n_keys ** 2} virtual "
                                 "slots, weighted by pre-values"),
                  "virtual slot v (block p, pool row)", "value (dimensionless)", barmode="group",
                  bottom=140, legend=dict(orientation="h", y=-0.45))


def ultramem_v2_ring_figure(st: UltraMemV2Station, title: str | None = None) -> go.Figure:
    """Ring windows: which rows of the shared pool each layer reads (shaded), and the rows this
    token's selected slots read at each layer (crosses)."""
    mask = st.window_mask().astype(int)
    L, P = mask.shape
    fig = go.Figure(go.Heatmap(z=mask, x=np.arange(P), y=np.arange(L), colorscale=[[0, "#f4f4f4"], [1, "#aec7e8"]],
                               zmin=0, zmax=1, showscale=False, name="window",
                               hovertemplate="layer %{y}, pool row %{x}<br>in window=%{z}<extra></extra>"))
    ly, lx = np.repeat(np.arange(L), st.layer_rows.shape[1]), st.layer_rows.ravel()
    fig.add_trace(go.Scatter(x=lx, y=ly, mode="markers", name="this token's rows",
                             marker=dict(symbol="x", size=10, color=CHOSEN)))
    n = int(st.windows[0, 1])
    fig = layout(fig, title or (f"UltraMemV2 ring: {L} layers, windows of {n}² = {n * n} rows in a pool of {P}"),
                 "pool row (index)", "memory layer l (index)", bottom=90, legend=dict(orientation="h", y=-0.3))
    fig.update_yaxes(autorange="reversed", dtick=1)
    return fig


def tour_figures(record: TourRecord) -> dict[str, go.Figure]:
    """All figures of the tour for one record, by name (the panes of ``widgets.TourControls``)."""
    p = record.params
    return {
        "moe": router_figure(record.moe),
        "moe_load": load_figure(record.expert_counts, unit="expert", y_title="tokens routed (count)",
                                title=f"MoE load over B={p.batch_size} tokens: "
                                      f"{int((record.expert_counts > 0).sum())} of {p.n_experts} experts touched"),
        "pkm": pkm_figure(record.pkm),
        "pkm_load": load_figure(record.slot_counts, unit="value slot", y_title="hits (count)",
                                title=f"PKM slot hits over B={p.batch_size} tokens: "
                                      f"{int((record.slot_counts > 0).sum())} of {p.n_keys ** 2} slots touched"),
        "tdqkr": tdqkr_figure(record.tdqkr),
        "bias": topology_bias_figure(record.bias),
        "ive": ive_figure(record.ive_map, record.ive.slots),
        "ive_load": load_figure(record.physical_counts, unit="physical row", y_title="hits (count)",
                                title=f"IVE physical-row hits over B={p.batch_size} tokens "
                                      f"(each row serves E={p.expansion} virtual slots)"),
        "peer": peer_figure(record.peer),
        "memory_plus": memory_plus_gate_figure(record.memory_plus),
        "memory_plus_pool": memory_plus_pool_figure(record.memory_plus),
        "ultramem_v2": ultramem_v2_figure(record.ultramem_v2),
        "ultramem_v2_ring": ultramem_v2_ring_figure(record.ultramem_v2),
    }


# ----------------------------------------------------------------------------------------------
# Saving the tour as a run directory (figures and summary).
# ----------------------------------------------------------------------------------------------

TOUR_SAVED_FIGURES = ("moe", "pkm", "tdqkr", "bias", "ive", "peer", "memory_plus", "ultramem_v2_ring")


def save_tour(record: TourRecord, out_dir: str | Path, png: bool = True) -> Path:
    """Write the tour's summary and key figures into a run directory (labcore.results.RunDir).

    ``out_dir`` is resolved with :func:`repo_path`. If it already holds a finished run (an earlier
    interactive run), the next free ``<out_dir>-2``, ``-3``, ... is used; the path is returned.
    """
    path = free_run_dir(repo_path(out_dir))
    run = RunDir(path).start(record.params, notebook="00_tour.ipynb", seed=record.params.seed)
    try:
        run.write_summary(record.summary())
        figs = tour_figures(record)
        for name in TOUR_SAVED_FIGURES:
            run.save_figure(figs[name], name, png=png)
    except BaseException as e:
        run.fail(e)
        raise
    run.finish()
    return path
