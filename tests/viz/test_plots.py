"""labcore.viz plots, tour_plots and style: figures carry the record's numbers (values, marked cells, axes with units)."""

from __future__ import annotations

import re
import struct
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import plotly.io as pio
import pytest

from labcore.viz import plots, style, tour_plots
from labcore.viz.tour import TourParams, ive_mapping, run_tour

UNIT = re.compile(r"\(.+\)")


@pytest.fixture(scope="module")
def record():
    return run_tour(TourParams(smoke=True, n_keys=6, top_k=3, batch_size=16, expansion=4))


def _trace(fig, name):
    found = [t for t in fig.data if t.name == name]
    assert len(found) == 1, [t.name for t in fig.data]
    return found[0]


def _cells(trace):
    return sorted(zip(np.asarray(trace.y).tolist(), np.asarray(trace.x).tolist()))


def test_every_tour_figure_has_axis_titles_with_units(record):
    figs = tour_plots.tour_figures(record)
    assert set(figs) == {"moe", "moe_load", "pkm", "pkm_load", "tdqkr", "bias", "ive", "ive_load", "peer",
                         "memory_plus", "memory_plus_pool", "ultramem_v2", "ultramem_v2_ring"}
    for name, fig in figs.items():
        assert UNIT.search(fig.layout.xaxis.title.text or ""), (name, fig.layout.xaxis.title.text)
        assert UNIT.search(fig.layout.yaxis.title.text or ""), (name, fig.layout.yaxis.title.text)
        assert fig.layout.title.text


def test_router_figure_bars_are_the_probabilities(record):
    fig = tour_plots.router_figure(record.moe)
    bar = fig.data[0]
    np.testing.assert_allclose(np.asarray(bar.y), record.moe.probs)
    red = [i for i, c in enumerate(bar.marker.color) if c == style.CHOSEN]
    assert sorted(red) == sorted(record.moe.chosen.tolist())


def test_score_grid_marks_selected_candidates_and_exact(record):
    td = record.tdqkr
    fig = tour_plots.tdqkr_figure(td)
    np.testing.assert_allclose(np.asarray(fig.data[0].z), td.grid)
    n = td.n
    assert _cells(_trace(fig, "selected")) == sorted((int(s) // n, int(s) % n) for s in td.slots)
    assert _cells(_trace(fig, "exact top-K")) == sorted((int(s) // n, int(s) % n) for s in td.exact_slots)
    cand = _cells(_trace(fig, "candidates"))
    assert len(cand) == len(td.rows) ** 2
    assert cand == sorted((int(i), int(j)) for i in td.rows for j in td.cols)
    assert f"{td.recall:.0%}" in fig.layout.title.text


def test_pkm_figure_grid_and_marks(record):
    fig = tour_plots.pkm_figure(record.pkm)
    np.testing.assert_allclose(np.asarray(fig.data[0].z), record.pkm.s_row[:, None] + record.pkm.s_col[None, :])
    n = record.pkm.n
    assert _cells(_trace(fig, "selected")) == sorted((int(s) // n, int(s) % n) for s in record.pkm.slots)
    assert "n=6" in fig.layout.title.text and "top-K=3" in fig.layout.title.text


def test_score_grid_without_optional_marks_has_only_the_heatmap():
    fig = tour_plots.score_grid_figure(np.arange(9.0).reshape(3, 3))
    assert [t.type for t in fig.data] == ["heatmap"]


def test_topology_bias_figure(record):
    fig = tour_plots.topology_bias_figure(record.bias)
    bar = fig.data[0]
    assert list(bar.x) == ["additive", "tucker", "random"]
    np.testing.assert_allclose(np.asarray(bar.y), record.bias["fraction"].to_numpy())
    base = [t for t in fig.data if t.name and t.name.startswith("random baseline")][0]
    np.testing.assert_allclose(np.asarray(base.y), [2 / 7] * 3)          # n = 6: 2(n-1)/(n^2-1)


def test_ive_figure_blocks_and_physical_rows():
    m = ive_mapping(4, 4, seed=1)
    slots = [0, 17, 63]
    fig = tour_plots.ive_figure(m, slots)
    side = m.side
    z, custom = np.asarray(fig.data[0].z), np.asarray(fig.data[0].customdata)
    assert z.shape == (side, side)
    for v in range(side * side):
        assert z[v // side, v % side] == m.perm[v] // 16 and custom[v // side, v % side] == m.perm[v] % 16
    assert _cells(_trace(fig, "selected")) == sorted((v // side, v % side) for v in slots)
    assert "shuffled" in fig.layout.title.text
    assert "not shuffled" in tour_plots.ive_figure(ive_mapping(4, 4, shuffle=False)).layout.title.text


def test_load_figure_values_and_touched_count():
    counts = np.array([3, 0, 5, 0, 2])
    fig = tour_plots.load_figure(counts, unit="expert")
    assert np.asarray(fig.data[0].y).tolist() == [3, 0, 5, 0, 2]
    assert "3 of 5 experts touched" in fig.layout.title.text


def _results_table():
    return pd.DataFrame({
        "run_id": [f"r{i}" for i in range(8)],
        "param_rank": [1, 2, 1, 2, 4, 4, 1, 2],
        "param_scoring": ["tucker", "tucker", "additive", "additive"] * 2,
        "val_loss": [3.0, 2.8, 3.2, 3.1, 2.7, 2.9, 2.0, np.nan],
    })


def test_metric_figure_numeric_x_means_per_group():
    df = _results_table()
    fig = plots.metric_figure(df, "param_rank", "val_loss", color="param_scoring")
    by_name = {t.name: t for t in fig.data}
    assert set(by_name) == {"param_scoring=additive", "param_scoring=tucker"}
    tuck = by_name["param_scoring=tucker"]
    # tucker rows: rank 1 -> 3.0; rank 2 -> 2.8; rank 4 -> 2.7, 2.9 (mean 2.8)
    assert list(tuck.x) == [1, 2, 4]
    np.testing.assert_allclose(list(tuck.y), [3.0, 2.8, 2.8])
    add = by_name["param_scoring=additive"]    # rank 1 -> 3.2, 2.0; rank 2 -> 3.1 and a NaN (dropped)
    assert list(add.x) == [1, 2] and list(add.y) == pytest.approx([2.6, 3.1])
    assert tuck.mode == "lines+markers"
    assert fig.layout.yaxis.title.text == "val_loss (nats)"


def test_metric_figure_categorical_x_is_bars():
    fig = plots.metric_figure(_results_table(), "param_scoring", "val_loss")
    assert [t.type for t in fig.data] == ["bar"]
    assert list(fig.data[0].x) == ["additive", "tucker"]
    np.testing.assert_allclose(list(fig.data[0].y), [np.mean([3.2, 3.1, 2.0]), np.mean([3.0, 2.8, 2.7, 2.9])])


def test_metric_figure_unknown_column_names_it():
    with pytest.raises(KeyError, match="'nope'"):
        plots.metric_figure(_results_table(), "nope", "val_loss")


def test_history_and_latency_figures():
    hist = pd.DataFrame({"step": [0, 10, 20, 0, 10, 20], "loss": [4, 3, 2.5, 4.2, 3.3, 2.9],
                         "run_id": ["a"] * 3 + ["b"] * 3})
    fig = plots.history_figure(hist, "loss")
    assert [t.name for t in fig.data] == ["run_id=a", "run_id=b"]
    assert list(fig.data[1].y) == [4.2, 3.3, 2.9] and fig.layout.xaxis.title.text == "step (steps)"
    lat = pd.DataFrame({"batch_size": [1, 8, 64, 1, 8, 64], "latency_ms": [1, 2, 9, 1, 1.1, 1.3],
                        "layer": ["moe"] * 3 + ["ultramem"] * 3})
    f2 = plots.latency_vs_batch_figure(lat)
    assert f2.layout.xaxis.type == "log" and f2.layout.yaxis.type == "log"
    assert f2.layout.yaxis.title.text == "latency_ms (ms)" and f2.layout.xaxis.title.text == "batch_size (tokens)"
    assert list(f2.data[0].y) == [1, 2, 9]


def test_label_units():
    assert style.label("val_loss") == "val_loss (nats)"
    assert style.label("decode_ms") == "decode_ms (ms)"
    assert style.label("weird") == "weird (value)"


def test_static_export_png_and_svg(record, tmp_path):
    """kaleido (Debian chromium) writes a PNG of the requested size and a well-formed SVG."""
    pio.defaults.mathjax = None
    fig = tour_plots.pkm_figure(record.pkm)
    png, svg = tmp_path / "pkm.png", tmp_path / "pkm.svg"
    try:
        pio.write_images([fig, fig], [png, svg], width=640, height=480, scale=1)   # one browser session
    except Exception as e:  # noqa: BLE001 - say what is missing instead of a kaleido traceback
        pytest.fail(f"kaleido static export failed (chromium at /usr/bin/chromium?): {type(e).__name__}: {e}")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (640, 480)
    root = ET.fromstring(svg.read_text())
    assert root.tag.endswith("svg")
    assert float(root.get("width")) == 640 and float(root.get("height")) == 480
    texts = "".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
    assert "column sub-key j" in texts                     # the axis title made it into the SVG
