"""labcore.viz.figures: the ablation notebooks' figures carry the table's numbers (seeds, means with a
95% CI from a textbook t-interval, paired deltas, cost curves on log axes)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from labcore.viz.figures import cost_curves_figure, deltas_figure, history_lines, variants_figure

T975_DF2 = 4.302652729911275      # Student t, 97.5 % quantile, 2 degrees of freedom


def _table():
    return pd.DataFrame({"variant": ["a", "a", "a", "b", "b", "b"], "seed": [0, 1, 2] * 2,
                         "val_loss": [3.0, 3.2, 3.4, 2.0, 2.1, 2.3]})


def _trace(fig, name):
    (t,) = [t for t in fig.data if t.name == name]
    return t


def test_variants_figure_seed_dots_and_mean_with_t_interval():
    fig = variants_figure(_table(), "val_loss", order=["b", "a"])
    dots = _trace(fig, "seeds")
    assert list(dots.y) == [3.0, 3.2, 3.4, 2.0, 2.1, 2.3] and list(dots.x) == ["a"] * 3 + ["b"] * 3
    mean = _trace(fig, "mean ± 95% CI")
    assert list(mean.x) == ["b", "a"]
    np.testing.assert_allclose(list(mean.y), [(2.0 + 2.1 + 2.3) / 3, 3.2], rtol=1e-12)
    sd_b, sd_a = np.std([2.0, 2.1, 2.3], ddof=1), 0.2
    np.testing.assert_allclose(list(mean.error_y.array), [T975_DF2 * s / math.sqrt(3) for s in (sd_b, sd_a)],
                               rtol=2e-4)                           # the lab's t table: 4 digits
    assert fig.layout.yaxis.title.text == "val_loss (nats)"
    with pytest.raises(KeyError, match="'nope'"):
        variants_figure(_table(), "nope")


def test_deltas_figure_lab_next_to_paper():
    deltas = pd.DataFrame({"variant": ["x", "y"], "metric": ["val_loss"] * 2, "delta_mean": [-0.02, 0.01],
                           "delta_ci95": [0.005, np.nan]})
    fig = deltas_figure(deltas, {"x": -0.015})
    lab, paper = fig.data
    assert list(lab.y) == [-0.02, 0.01] and list(lab.error_y.array) == [0.005, 0.0]   # no CI drawn as 0
    assert list(paper.x) == ["x", "y"] and paper.y[0] == -0.015 and math.isnan(paper.y[1])
    assert [t.name for t in deltas_figure(deltas).data] == [lab.name]                  # no paper: one trace


def test_history_lines_mean_over_seeds_per_variant():
    h = pd.DataFrame({"variant": ["a"] * 4 + ["b"] * 2, "step": [0, 10, 0, 10, 0, 10],
                      "val_loss": [4.0, 3.0, 5.0, 2.0, 6.0, np.nan]})
    fig = history_lines(h, "val_loss")
    a, b = fig.data
    assert (a.name, list(a.x), list(a.y)) == ("a", [0, 10], [4.5, 2.5])
    assert (b.name, list(b.x), list(b.y)) == ("b", [0], [6.0])
    assert len(history_lines(h, "missing_metric").data) == 0


def test_cost_curves_one_log_log_line_per_variant():
    cost = pd.DataFrame({"variant": ["1x24²"] * 3 + ["4x12²"] * 3, "batch_size": [1, 16, 256] * 2,
                         "latency_ms": [1.0, 2.0, 8.0, 1.5, 2.5, 5.0]})
    fig = cost_curves_figure(cost, "latency_ms", "decode latency")
    assert [t.name for t in fig.data] == ["1x24²", "4x12²"]
    assert list(fig.data[1].x) == [1, 16, 256] and list(fig.data[1].y) == [1.5, 2.5, 5.0]
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert fig.layout.yaxis.title.text == "latency_ms (ms)"
    assert fig.layout.xaxis.title.text.startswith("batch size B")
    assert fig.layout.title.text == "decode latency"


def test_deltas_figure_puts_tiny_paper_deltas_in_their_own_panel():
    deltas = pd.DataFrame({"variant": ["x", "y"], "metric": ["val_loss"] * 2, "delta_mean": [-0.1, 0.2],
                           "delta_ci95": [0.3, 0.25]})
    fig = deltas_figure(deltas, {"x": -0.015, "y": 0.003})      # CI ~0.28 >> paper ~0.009
    lab, paper = fig.data
    assert (lab.yaxis, paper.yaxis) == ("y", "y2")                # two panels, each its own scale
    assert lab.xaxis != paper.xaxis and fig.layout.xaxis.matches == "x2"   # same x (shared)
    assert list(paper.y) == [-0.015, 0.003] and list(lab.error_y.array) == [0.3, 0.25]
    same = deltas_figure(deltas, {"x": -0.015, "y": 0.003}, panel_ratio=100.0)
    assert [t.yaxis for t in same.data] == [None, None]           # comparable: one axis, grouped bars
