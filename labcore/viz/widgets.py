"""Widgets: ipywidgets controls wired to plotly figures, with the logic testable without a browser.

Two controllers, each a plain class holding its ipywidgets controls, its current figures and the
callback logic (set a control's ``.value`` in a test and read the new figure back):

- :class:`TourControls` (``notebooks/00_tour.ipynb``): sliders for n, top-K, rank R, IVE expansion
  E, batch size B, the followed token, the seed, heads H (PEER, Memory+), memory layers L sharing a
  pool and UltraMemV2's ring share g; every change re-runs the tour
  (``labcore.viz.tour.run_tour``) and redraws its figures (``labcore.viz.tour_plots.tour_figures``).
- :class:`ResultsExplorer` (``notebooks/06_results_explorer.ipynb``): dropdowns for notebook,
  metric, x and colour over a results table (``labcore.results.collect``); draws
  ``labcore.viz.plots.metric_figure``.

How figures reach the page: :class:`FigurePane` puts a figure's plotly mime bundle
(``application/vnd.plotly.v1+json``, rendered by JupyterLab's plotly extension) into an
``ipywidgets.Output`` widget by setting its ``outputs``; each update replaces the figure. plotly's
own ``FigureWidget`` would patch figures in place, but plotly >= 6 builds it on ``anywidget``,
which this environment does not have; the Output route needs only ipywidgets and plotly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import ipywidgets as W
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from labcore.experiments.params import ExplorerParams  # torch-free: the sweep validates it without torch
from labcore.results import RunDir, collect, free_run_dir, repo_path
from labcore.viz.plots import metric_figure
from labcore.viz.tour import TourParams, TourRecord, run_tour
from labcore.viz.tour_plots import tour_figures

PLOTLY_MIME = "application/vnd.plotly.v1+json"


class FigurePane:
    """One plotly figure shown in an ``ipywidgets.Output``; :meth:`show` replaces it.

    ``figure`` is the current ``go.Figure`` (what tests read); ``widget`` is what a notebook displays.
    """

    def __init__(self, figure: go.Figure | None = None, height: str | None = None):
        self.widget = W.Output(layout=W.Layout(width="100%", min_height=height or "0px"))
        self.figure: go.Figure | None = None
        if figure is not None:
            self.show(figure)

    def show(self, figure: go.Figure) -> None:
        # what plotly's "plotly_mimetype" renderer sends, without touching pio.renderers (whose
        # first use costs seconds): plain JSON, numpy arrays as base64 typed arrays
        data = json.loads(pio.to_json(figure, validate=False, remove_uids=False))
        title = figure.layout.title.text or "plotly figure"
        bundle = {PLOTLY_MIME: data, "text/plain": f"<Figure: {title}>"}
        self.figure = figure
        self.widget.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)


# ----------------------------------------------------------------------------------------------
# The tour.
# ----------------------------------------------------------------------------------------------

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
EXPANSIONS = (1, 4, 9, 16)
# Which controls each tour figure depends on (a panel shows those above the figure).
TOUR_PANELS: dict[str, tuple[str, ...]] = {
    "moe": ("seed", "token", "moe_top_k"),
    "moe_load": ("batch_size", "moe_top_k"),
    "pkm": ("n_keys", "top_k", "token"),
    "pkm_load": ("batch_size", "n_keys", "top_k"),
    "tdqkr": ("n_keys", "top_k", "rank", "token"),
    "bias": ("n_keys", "rank"),
    "ive": ("n_keys", "top_k", "expansion", "ive_shuffle", "token"),
    "ive_load": ("batch_size", "expansion", "ive_shuffle"),
    "peer": ("n_keys", "top_k", "heads", "token"),
    "memory_plus": ("n_keys", "top_k", "heads", "token"),
    "memory_plus_pool": ("batch_size", "memory_layers"),
    "ultramem_v2": ("n_keys", "top_k", "rank", "expansion", "token"),
    "ultramem_v2_ring": ("memory_layers", "ring_share"),
}


class _Guarded:
    """Re-entrancy guard for widget callbacks: while ``_hold()`` is active, ``_busy`` is True and
    callbacks triggered by programmatic value changes return early."""

    _busy = False

    @contextlib.contextmanager
    def _hold(self) -> Iterator[None]:
        self._busy = True
        try:
            yield
        finally:
            self._busy = False


class TourControls(_Guarded):
    """Sliders over :class:`labcore.viz.tour.TourParams` wired to the tour's figures.

    ``controls`` maps a TourParams field to its widget; ``panes`` maps a figure name
    (``tour_plots.tour_figures``) to its :class:`FigurePane`; ``record`` is the current tour record.
    Changing any control re-runs the tour once (dependent limits, e.g. top-K <= n, are clamped
    first) and redraws every pane.
    """

    def __init__(self, params: TourParams | None = None):
        # smoke caps apply once, to the starting sizes; afterwards the sliders decide
        p = dataclasses.replace((params or TourParams()).resolved(), smoke=False)
        self.base = p
        style = {"description_width": "110px"}
        lay = W.Layout(width="360px")
        batches = sorted(set(BATCH_SIZES) | {p.batch_size})
        self.controls: dict[str, W.ValueWidget] = {
            "n_keys": W.IntSlider(value=p.n_keys, min=2, max=max(32, p.n_keys), description="n keys/side",
                                  style=style, layout=lay, continuous_update=False),
            "top_k": W.IntSlider(value=p.top_k, min=1, max=p.n_keys, description="top-K",
                                 style=style, layout=lay, continuous_update=False),
            "rank": W.IntSlider(value=p.rank, min=1, max=max(4, p.rank), description="rank R",
                                style=style, layout=lay, continuous_update=False),
            "expansion": W.SelectionSlider(options=list(EXPANSIONS), value=p.expansion,
                                           description="IVE E", style=style, layout=lay,
                                           continuous_update=False),
            "batch_size": W.SelectionSlider(options=batches, value=p.batch_size, description="batch B",
                                            style=style, layout=lay, continuous_update=False),
            "token": W.IntSlider(value=p.token, min=0, max=p.batch_size - 1, description="token",
                                 style=style, layout=lay, continuous_update=False),
            "moe_top_k": W.IntSlider(value=p.moe_top_k, min=1, max=p.n_experts, description="MoE top-K",
                                     style=style, layout=lay, continuous_update=False),
            "seed": W.BoundedIntText(value=p.seed, min=0, max=2**31 - 1, description="seed",
                                     style=style, layout=W.Layout(width="220px")),
            "ive_shuffle": W.Checkbox(value=p.ive_shuffle, description="IVE shuffle", indent=False),
            "heads": W.IntSlider(value=p.heads, min=1, max=max(8, p.heads), description="heads H",
                                 style=style, layout=lay, continuous_update=False),
            "memory_layers": W.IntSlider(value=p.memory_layers, min=1, max=max(6, p.memory_layers),
                                         description="memory layers L", style=style, layout=lay,
                                         continuous_update=False),
            "ring_share": W.IntSlider(value=p.ring_share, min=1, max=p.memory_layers, description="ring share g",
                                      style=style, layout=lay, continuous_update=False),
        }
        self.panes = {name: FigurePane() for name in TOUR_PANELS}
        self.status = W.HTML()
        self.record: TourRecord | None = None
        for w in self.controls.values():
            w.observe(self._on_change, names="value")
        self.refresh()

    # -- state --------------------------------------------------------------------------------
    @property
    def params(self) -> TourParams:
        """The TourParams the controls currently describe (validated)."""
        values = {name: w.value for name, w in self.controls.items()}
        return dataclasses.replace(self.base, **values)

    def _clamp(self) -> None:
        """Dependent limits: top-K <= n keys per side, token < batch size, ring share g <= layers L."""
        c = self.controls
        c["top_k"].max = c["n_keys"].value           # lowering max clamps value (ipywidgets)
        c["token"].max = c["batch_size"].value - 1
        c["ring_share"].max = c["memory_layers"].value

    def _on_change(self, change: dict) -> None:
        if self._busy:
            return
        with self._hold():
            self._clamp()
        self.refresh()

    def refresh(self) -> None:
        """Re-run the tour with the current controls and redraw every pane."""
        try:
            self.record = run_tour(self.params)
        except ValueError as e:                       # ConfigError included: say it, keep old figures
            self.status.value = f"<b>not redrawn:</b> {e}"
            return
        for name, fig in tour_figures(self.record).items():
            self.panes[name].show(fig)
        p = self.record.params
        self.status.value = (f"n={p.n_keys}, K={p.top_k}, R={p.rank}, E={p.expansion}, B={p.batch_size}, "
                             f"token {p.token}, seed {p.seed}, H={p.heads}, L={p.memory_layers}, g={p.ring_share}")

    @property
    def figures(self) -> dict[str, go.Figure]:
        return {name: pane.figure for name, pane in self.panes.items()}

    # -- layout -------------------------------------------------------------------------------
    def panel(self, *names: str) -> W.VBox:
        """The controls the named figures depend on, then the figures (all figures if none named).
        Controls shown in several panels are the same widget: moving one moves all."""
        names = names or tuple(TOUR_PANELS)
        unknown = [n for n in names if n not in TOUR_PANELS]
        if unknown:
            raise KeyError(f"TourControls.panel: unknown figure(s) {unknown}; known: {list(TOUR_PANELS)}")
        ctrl = [c for n in names for c in TOUR_PANELS[n]]
        ctrl = list(dict.fromkeys(ctrl))              # unique, in order
        box = W.HBox([self.controls[c] for c in ctrl], layout=W.Layout(flex_flow="row wrap"))
        return W.VBox([box, self.status] + [self.panes[n].widget for n in names])


# ----------------------------------------------------------------------------------------------
# The results explorer.
# ----------------------------------------------------------------------------------------------

NONE = "(none)"
ID_COLUMNS = ("run_id", "sweep", "notebook")


def load_results(results_root: str | Path) -> pd.DataFrame:
    """``labcore.results.collect`` of a results directory (resolved with ``repo_path``).

    A missing directory is an error naming the parameter; an existing one without finished runs
    gives an empty table (the explorer then says so)."""
    if results_root == "":  # "this sweep": the runner tells the kernel where its results are
        if not os.environ.get("LABCORE_SWEEP_DIR"):
            raise ValueError("results_root='' means the sweep this notebook runs in, but LABCORE_SWEEP_DIR "
                             "is not set (not run by `labcore sweep`); pass a results directory, e.g. runs/quick")
        results_root = os.environ["LABCORE_SWEEP_DIR"]
    root = repo_path(results_root)
    if not root.is_dir():
        raise FileNotFoundError(f"results_root={str(results_root)!r}: no such directory ({root}); pass a "
                                "sweep results directory, e.g. runs/quick")
    return collect(root)


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric result columns (not identity, seed or parameter columns), in table order; the
    run's wall time ``duration_s`` last."""
    cols = [c for c in df.columns
            if c not in ID_COLUMNS and c != "seed" and not c.startswith("param_")
            and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
            and df[c].notna().any()]
    return sorted(cols, key=lambda c: c == "duration_s")


def axis_columns(df: pd.DataFrame) -> list[str]:
    """Candidate x / colour columns: parameters that vary first, then the other parameters,
    seed, run_id and non-numeric summary columns with a few distinct values."""
    params = [c for c in df.columns if c.startswith("param_") and df[c].notna().any()]
    varying = [c for c in params if df[c].nunique(dropna=True) > 1]
    rest = [c for c in params if c not in varying]
    other = [c for c in df.columns if c not in params and c not in ID_COLUMNS and c != "seed"
             and not pd.api.types.is_numeric_dtype(df[c]) and 1 < df[c].nunique(dropna=True) <= 50]
    ids = [c for c in ("seed", "run_id") if c in df.columns and df[c].notna().any()]
    return varying + rest + ids + other


class ResultsExplorer(_Guarded):
    """Dropdowns (notebook, metric, x, colour) over a results table, drawing ``metric_figure``.

    Changing the notebook re-derives the other dropdowns' options from that notebook's rows
    (keeping the current choice when it is still available); any change redraws ``pane``.
    """

    def __init__(self, df: pd.DataFrame, notebook: str | None = None, metric: str | None = None,
                 x: str | None = None, color: str | None = None):
        self.df = df.reset_index(drop=True)
        notebooks = sorted(self.df["notebook"].dropna().unique().tolist()) if "notebook" in self.df else []
        lay = W.Layout(width="330px")
        self.notebook = W.Dropdown(options=notebooks or [NONE], description="notebook", layout=lay)
        self.metric = W.Dropdown(options=[NONE], description="metric", layout=lay)
        self.x = W.Dropdown(options=[NONE], description="x", layout=lay)
        self.color = W.Dropdown(options=[NONE], description="colour", layout=lay)
        self.pane = FigurePane()
        self.message = W.HTML()
        with self._hold():
            if notebook:
                self._set(self.notebook, notebook)
            self._sync_options(metric=metric, x=x, color=color)
        for w in (self.notebook, self.metric, self.x, self.color):
            w.observe(self._on_change, names="value")
        self.refresh()

    @staticmethod
    def _set(dd: W.Dropdown, value: str) -> None:
        if value not in dd.options:
            raise ValueError(f"ResultsExplorer: {dd.description}={value!r} is not available; "
                             f"choose one of {list(dd.options)}")
        dd.value = value

    def subset(self) -> pd.DataFrame:
        """The rows of the selected notebook (all rows when the table has no notebook column)."""
        if "notebook" not in self.df or self.notebook.value == NONE:
            return self.df
        return self.df[self.df["notebook"] == self.notebook.value]

    def _sync_options(self, metric: str | None = None, x: str | None = None, color: str | None = None) -> None:
        sub = self.subset()
        metrics = metric_columns(sub) or [NONE]
        axes = axis_columns(sub) or [NONE]
        for dd, options, wanted in ((self.metric, metrics, metric), (self.x, axes, x),
                                    (self.color, [NONE] + axes, color)):
            keep = wanted if wanted else dd.value
            dd.options = options
            if wanted:
                self._set(dd, wanted)
            elif keep in options:
                dd.value = keep
            else:
                dd.value = options[0]
        if self.color.value == self.x.value:
            self.color.value = NONE

    def _on_change(self, change: dict) -> None:
        if self._busy:
            return
        if change["owner"] is self.notebook:
            with self._hold():
                self._sync_options()
        self.refresh()

    def refresh(self) -> None:
        sub = self.subset()
        y, x = self.metric.value, self.x.value
        color = None if self.color.value in (NONE, x) else self.color.value
        if sub.empty or NONE in (y, x):
            fig = go.Figure().update_layout(title=dict(text="no finished runs with numeric results here"),
                                            xaxis_title="(no data)", yaxis_title="(no data)")
            self.message.value = f"{len(sub)} rows"
        else:
            fig = metric_figure(sub, x, y, color=color,
                                title=f"{self.notebook.value}: {y} vs {x}" + (f" by {color}" if color else ""))
            self.message.value = f"{len(sub)} rows, {sub['run_id'].nunique() if 'run_id' in sub else len(sub)} runs"
        self.pane.show(fig)

    @property
    def figure(self) -> go.Figure:
        return self.pane.figure

    def widget(self) -> W.VBox:
        return W.VBox([W.HBox([self.notebook, self.metric]), W.HBox([self.x, self.color]),
                       self.message, self.pane.widget])


def notebook_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Rows and runs per notebook of a results table (the explorer's run summary)."""
    if df.empty or "notebook" not in df:
        return pd.DataFrame({"notebook": pd.Series(dtype=str), "rows": pd.Series(dtype=int),
                             "runs": pd.Series(dtype=int)})
    g = df.groupby("notebook", dropna=False)
    return pd.DataFrame({"rows": g.size(), "runs": g["run_id"].nunique()}).reset_index()


def save_explorer(explorer: ResultsExplorer, params: ExplorerParams, png: bool = True,
                  names: Sequence[str] = ("explorer",)) -> Path:
    """Save the explorer's current figure and the per-notebook counts as a run directory."""
    path = free_run_dir(repo_path(params.out_dir))
    run = RunDir(path).start(params, notebook="06_results_explorer.ipynb", seed=params.seed)
    try:
        run.write_summary(notebook_counts(explorer.df))
        for name in names:
            run.save_figure(explorer.figure, name, png=png)
    except BaseException as e:
        run.fail(e)
        raise
    run.finish()
    return path
