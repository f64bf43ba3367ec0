"""labcore.viz.widgets without a browser: set a control's value, read the redrawn figure's numbers."""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import papermill
import plotly.graph_objects as go
import pytest

from labcore.config import ConfigError
from labcore.results import RunDir
from labcore.viz.tour import TourParams, run_tour
from labcore.viz.widgets import (
    PLOTLY_MIME,
    ExplorerParams,
    FigurePane,
    ResultsExplorer,
    TourControls,
    axis_columns,
    load_results,
    metric_columns,
    notebook_counts,
    save_explorer,
)

_spec = importlib.util.spec_from_file_location(
    "results_fixture", Path(__file__).parents[1] / "ui" / "results_fixture.py")
fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture)

SMALL = TourParams(smoke=True, n_keys=6, top_k=3, batch_size=16, n_queries=200)


def _decode(v):
    """A plotly JSON array: a list, or a base64 typed array {"dtype", "bdata", "shape"}."""
    if isinstance(v, dict) and "bdata" in v:
        arr = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        shape = [int(s) for s in str(v.get("shape", len(arr))).split(",")]
        return arr.reshape(shape)
    return np.asarray(v)


# ----------------------------------------------------------------------------------------------
# FigurePane
# ----------------------------------------------------------------------------------------------


def test_figure_pane_puts_a_json_plotly_bundle_in_the_output_widget():
    z = np.arange(12.0).reshape(3, 4)
    pane = FigurePane(go.Figure(go.Heatmap(z=z)).update_layout(title=dict(text="T")))
    (out,) = pane.widget.outputs
    assert out["output_type"] == "display_data" and out["data"]["text/plain"] == "<Figure: T>"
    bundle = json.loads(json.dumps(out["data"][PLOTLY_MIME]))          # JSON-safe for the comm
    np.testing.assert_array_equal(_decode(bundle["data"][0]["z"]), z)
    pane.show(go.Figure(go.Bar(y=[1, 2])))
    assert len(pane.widget.outputs) == 1                                 # replaced, not appended
    assert pane.figure.data[0].type == "bar"
    assert _decode(pane.widget.outputs[0]["data"][PLOTLY_MIME]["data"][0]["y"]).tolist() == [1, 2]


# ----------------------------------------------------------------------------------------------
# TourControls
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def tour():
    return TourControls(SMALL)


def test_tour_controls_start_from_the_params(tour):
    assert tour.params == dataclasses.replace(SMALL.resolved(), smoke=False)   # sliders mirror params
    assert np.asarray(tour.figures["pkm"].data[0].z).shape == (6, 6)
    expected = run_tour(SMALL)
    np.testing.assert_allclose(np.asarray(tour.figures["pkm"].data[0].z), expected.pkm.grid)
    assert all(p.figure is not None for p in tour.panes.values())
    assert tour.status.value == "n=6, K=3, R=2, E=4, B=16, token 0, seed 0, H=2, L=3, g=2"


def test_n_keys_slider_resizes_grids_and_clamps_top_k(tour):
    tour.controls["top_k"].value = 5
    tour.controls["n_keys"].value = 4
    assert tour.controls["top_k"].value == 4 and tour.controls["top_k"].max == 4
    z = np.asarray(tour.figures["pkm"].data[0].z)
    assert z.shape == (4, 4)
    want = run_tour(TourParams(smoke=False, n_keys=4, top_k=4, batch_size=16, n_queries=200))
    np.testing.assert_allclose(z, want.pkm.grid)
    assert np.asarray(tour.figures["tdqkr"].data[0].z).shape == (4, 4)
    assert np.asarray(tour.figures["ive"].data[0].z).shape == (8, 8)        # sqrt(4) * 4 per side
    assert "n=4" in tour.figures["pkm"].layout.title.text
    assert tour.status.value.startswith("n=4, K=4,")                       # drawn, no "not redrawn" error
    assert tour.record.params.n_keys == 4 and tour.record.params.top_k == 4


def test_rank_expansion_and_shuffle_controls(tour):
    tour.controls["rank"].value = 3
    want = run_tour(TourParams(smoke=False, n_keys=6, top_k=3, rank=3, batch_size=16, n_queries=200))
    np.testing.assert_allclose(np.asarray(tour.figures["tdqkr"].data[0].z), want.tdqkr.grid)
    assert "R=3" in tour.figures["tdqkr"].layout.title.text
    bias = tour.figures["bias"].data[0]
    np.testing.assert_allclose(np.asarray(bias.y), want.bias["fraction"].to_numpy())
    tour.controls["expansion"].value = 9
    assert np.asarray(tour.figures["ive"].data[0].z).shape == (18, 18)
    assert np.asarray(tour.figures["ive"].data[0].z).max() == 8            # blocks 0..E-1
    tour.controls["ive_shuffle"].value = False
    assert "not shuffled" in tour.figures["ive"].layout.title.text
    z = np.asarray(tour.figures["ive"].data[0].z)
    assert (z == np.repeat(np.arange(9), 2)[:, None]).all()                # unshuffled: bands of N/n_s rows


def test_batch_token_and_moe_controls(tour):
    tour.controls["batch_size"].value = 64
    assert np.asarray(tour.figures["moe_load"].data[0].y).sum() == 64 * SMALL.moe_top_k
    assert np.asarray(tour.figures["pkm_load"].data[0].y).sum() == 64 * 3
    assert tour.controls["token"].max == 63
    tour.controls["token"].value = 50
    want = run_tour(TourParams(n_keys=6, top_k=3, batch_size=64, token=50, n_queries=200))
    np.testing.assert_allclose(np.asarray(tour.figures["moe"].data[0].y), want.moe.probs)
    tour.controls["moe_top_k"].value = 3
    assert np.asarray(tour.figures["moe_load"].data[0].y).sum() == 64 * 3
    tour.controls["batch_size"].value = 8                                  # token 50 no longer exists
    assert tour.controls["token"].value == 7 and tour.record.params.token == 7


def test_memory_family_controls_redraw_their_stations(tour):
    base = dict(smoke=False, n_keys=6, top_k=3, batch_size=16, n_queries=200)
    tour.controls["heads"].value = 3                                       # PEER and Memory+: H x K bars
    want = run_tour(TourParams(**base, heads=3))
    peer = tour.figures["peer"]
    assert len(peer.data[0].y) == 3 * 3 and "3x3 = 9 of N=36" in peer.layout.title.text
    np.testing.assert_allclose(np.asarray(peer.data[0].y), want.peer.weights.ravel())
    np.testing.assert_allclose(np.asarray(peer.data[1].y), want.peer.activations.ravel())
    np.testing.assert_allclose(np.asarray(tour.figures["memory_plus"].data[0].y), want.memory_plus.read)
    np.testing.assert_allclose(np.asarray(tour.figures["memory_plus"].data[2].y), want.memory_plus.gate)
    tour.controls["memory_layers"].value = 2                               # clamps ring share g <= L
    assert tour.controls["ring_share"].value == 2 and tour.controls["ring_share"].max == 2
    ring = tour.figures["ultramem_v2_ring"]
    z = np.asarray(ring.data[0].z)
    assert z.shape == (2, 2 * 36) and (z.sum(1) == 64).all()               # pool 2 n^2, windows 8^2 rows
    assert np.asarray(tour.figures["memory_plus_pool"].data[0].z).shape == (2, 36)
    tour.controls["ring_share"].value = 1                                  # each layer: its own segment
    z = np.asarray(tour.figures["ultramem_v2_ring"].data[0].z)
    assert (z.sum(1) == 36).all() and (z.sum(0) == 1).all()                # disjoint windows cover the pool
    want = run_tour(TourParams(**base, heads=3, memory_layers=2, ring_share=1))
    np.testing.assert_allclose(np.asarray(tour.figures["ultramem_v2"].data[1].y), want.ultramem_v2.pre)
    assert tour.record.ultramem_v2.windows.tolist() == [[0, 6], [36, 6]]


def test_tour_panel_shows_the_figures_controls(tour):
    box = tour.panel("pkm")
    controls, status, pane = box.children
    assert [c.description for c in controls.children] == ["n keys/side", "top-K", "token"]
    assert pane is tour.panes["pkm"].widget and status is tour.status
    assert len(tour.panel().children) == 2 + len(tour.panes)
    with pytest.raises(KeyError, match="nope"):
        tour.panel("nope")


# ----------------------------------------------------------------------------------------------
# ResultsExplorer
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = fixture.build_results(tmp_path_factory.mktemp("results"))
    return root, load_results(root)


def test_load_results_reads_finished_runs_and_names_a_missing_root(results, tmp_path):
    root, df = results
    assert len(df) == 6 + 9                                        # the unfinished run is ignored
    with pytest.raises(FileNotFoundError, match="results_root="):
        load_results(tmp_path / "missing")


def test_column_roles(results):
    _, df = results
    sub = df[df["notebook"] == fixture.TDQKR]
    assert metric_columns(sub) == ["val_loss", "recall", "duration_s"]
    assert axis_columns(sub)[:2] == ["param_rank", "param_scoring"]
    assert "param_layer" not in axis_columns(sub)                  # all-NaN for this notebook


def test_explorer_initial_figure_and_metric_dropdown(results):
    _, df = results
    ex = ResultsExplorer(df)
    assert ex.notebook.value == fixture.TDQKR                      # sorted: 01 before 05
    assert (ex.metric.value, ex.x.value) == ("val_loss", "param_rank")
    (trace,) = ex.figure.data
    assert [int(v) for v in trace.x] == [1, 2, 4]
    means = [np.mean([fixture.tdqkr_val_loss(r, s) for s in (0, 1)]) for r in (1, 2, 4)]
    np.testing.assert_allclose(list(trace.y), means)
    ex.metric.value = "recall"
    np.testing.assert_allclose(list(ex.figure.data[0].y),
                               [np.mean([fixture.tdqkr_recall(r, s) for s in (0, 1)]) for r in (1, 2, 4)])
    assert ex.figure.layout.yaxis.title.text.startswith("recall")


def test_explorer_notebook_and_colour_dropdowns(results):
    _, df = results
    ex = ResultsExplorer(df)
    ex.metric.value = "recall"
    ex.notebook.value = fixture.COMPARE
    assert "recall" not in ex.metric.options and ex.metric.value == "latency_ms"
    assert ex.x.value == "param_batch_size" and "param_rank" not in ex.x.options
    ex.color.value = "param_layer"
    by_name = {t.name: t for t in ex.figure.data}
    assert set(by_name) == {"param_layer=moe", "param_layer=pkm", "param_layer=ultramem"}
    t = by_name["param_layer=moe"]
    assert [int(v) for v in t.x] == [1, 16, 64]
    np.testing.assert_allclose(list(t.y), [fixture.compare_latency_ms("moe", b) for b in (1, 16, 64)])
    ex.x.value = "param_layer"                                     # categorical x: bars, colour dropped
    assert [tr.type for tr in ex.figure.data] == ["bar"] and list(ex.figure.data[0].x) == ["moe", "pkm", "ultramem"]
    assert ex.message.value.startswith(f"{(df['notebook'] == fixture.COMPARE).sum()} rows")


def test_explorer_initial_selection_and_errors(results):
    _, df = results
    ex = ResultsExplorer(df, notebook=fixture.COMPARE, metric="val_loss", x="param_layer")
    np.testing.assert_allclose(list(ex.figure.data[0].y), [2.8, 2.8, 3.3])
    with pytest.raises(ValueError, match="metric='nope'"):
        ResultsExplorer(df, metric="nope")


def test_explorer_on_an_empty_table():
    ex = ResultsExplorer(pd.DataFrame(columns=["run_id", "sweep", "notebook", "seed"]))
    assert "no finished runs" in ex.figure.layout.title.text and len(ex.figure.data) == 0


def test_explorer_params_and_save(results, tmp_path):
    with pytest.raises(ConfigError, match="ExplorerParams.smoke=1"):
        ExplorerParams(smoke=1)
    with pytest.raises(ConfigError, match="ExplorerParams.metric=3"):
        ExplorerParams(metric=3)
    _, df = results
    counts = notebook_counts(df)
    assert counts.set_index("notebook")["runs"].to_dict() == {fixture.TDQKR: 6, fixture.COMPARE: 9}
    ex = ResultsExplorer(df)
    path = save_explorer(ex, ExplorerParams(out_dir=str(tmp_path / "ex")), png=False)
    run = RunDir(path)
    assert run.is_done() and (run.figures_dir / "explorer.json").exists()
    assert run.summary()["rows"].sum() == 15
    again = save_explorer(ex, ExplorerParams(out_dir=str(tmp_path / "ex")), png=False)
    assert again.name == "ex-2" and RunDir(again).is_done()        # a finished run is never overwritten


@pytest.mark.slow   # ~10 s on an idle machine (a kernel start); the ui suite runs this notebook too
def test_explorer_notebook_runs_headless_on_a_results_fixture(results, tmp_path):
    root, _ = results
    nbdir = Path(__file__).resolve().parents[2] / "notebooks"
    out = tmp_path / "06.out.ipynb"
    papermill.execute_notebook(str(nbdir / "06_results_explorer.ipynb"), str(out), kernel_name="python3",
                               parameters={"smoke": True, "results_root": str(root),
                                           "out_dir": str(tmp_path / "run"), "notebook": fixture.COMPARE},
                               cwd=str(nbdir), progress_bar=False)
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("15 rows from 15 finished runs" in o.get("text", "") for o in outputs)
    run = RunDir(tmp_path / "run")
    assert run.is_done() and run.summary().set_index("notebook")["runs"].to_dict() == {
        fixture.TDQKR: 6, fixture.COMPARE: 9}
    saved = json.loads((run.figures_dir / "explorer.json").read_text())
    assert saved["layout"]["title"]["text"].startswith(fixture.COMPARE)   # the initial selection


def test_explorer_empty_results_root_means_this_sweep(tmp_path, monkeypatch):
    ExplorerParams(results_root="")                       # allowed: resolved at load time
    monkeypatch.delenv("LABCORE_SWEEP_DIR", raising=False)
    with pytest.raises(ValueError, match="LABCORE_SWEEP_DIR"):
        load_results("")
    run = RunDir(tmp_path / "sw" / "nb-1").start({"x": 1}, notebook="nb", seed=0)
    run.write_summary({"val_loss": 1.5})
    run.finish()
    monkeypatch.setenv("LABCORE_SWEEP_DIR", str(tmp_path / "sw"))
    df = load_results("")
    assert list(df["val_loss"]) == [1.5]
