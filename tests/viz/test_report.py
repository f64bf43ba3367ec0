"""labcore.viz.report on hand-made run directories (no kernels): tables, thumbnails, notebooks, failures."""

import json
import shutil
from pathlib import Path

import plotly.graph_objects as go

from labcore.results import RunDir, write_json_atomic
from labcore.viz.report import write_report

FIXTURES = Path(__file__).parents[1] / "sweep" / "fixtures"   # executed-notebook samples
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16  # only copied, never decoded


def test_report_has_tables_thumbnails_notebooks_and_failures(tmp_path):
    sweep = tmp_path / "results" / "demo"
    ok = RunDir(sweep / "echo-aaa").start({"k": 3}, notebook="echo.ipynb", seed=0)
    ok.write_summary({"metric": "k_squared", "value": 9.0})
    ok.save_figure(go.Figure(go.Scatter(x=[0, 1], y=[1, 4])), "curve", png=False)
    (ok.figures_dir / "curve.png").write_bytes(PNG)
    shutil.copy(FIXTURES / "echo.ipynb", ok.path / "executed.ipynb")
    ok.finish()
    bad = RunDir(sweep / "echo-bbb").start({"k": 4}, notebook="echo.ipynb", seed=1)
    bad.fail({"ename": "ValueError", "evalue": "k <b>too</b> big", "cell_index": 1})
    write_json_atomic(sweep / "sweep.json", {"name": "demo", "runs": [
        {"run_id": "echo-aaa", "notebook": "echo.ipynb", "params": {"k": 3}, "seed": 0},
        {"run_id": "echo-bbb", "notebook": "echo.ipynb", "params": {"k": 4}, "seed": 1},
        {"run_id": "echo-ccc", "notebook": "echo.ipynb", "params": {"k": 5}, "seed": 0}]})
    RunDir(sweep / "stale-zzz").start({"k": 1}, notebook="old.ipynb", seed=0).finish()  # not in sweep.json

    index = write_report(sweep, tmp_path / "reports" / "demo")
    html = index.read_text()
    out = index.parent
    assert "1 done, 1 failed, 1 not finished" in html
    assert "stale-zzz" not in html and "old.ipynb" not in html           # only this sweep's runs
    assert "k &lt;b&gt;too&lt;/b&gt; big" in html and "<b>too</b>" not in html  # escaped error text
    assert "echo-ccc" in html and "not run" in html                       # planned, never ran
    assert "<img src='runs/echo-aaa/figures/curve.png'" in html
    assert "href='runs/echo-aaa/figures/curve.html'" in html
    assert (out / "runs" / "echo-aaa" / "figures" / "curve.png").read_bytes() == PNG
    fig_html = (out / "runs" / "echo-aaa" / "figures" / "curve.html").read_text()
    assert 'src="../../../assets/plotly.min.js"' in fig_html
    assert (out / "assets" / "plotly.min.js").stat().st_size > 1_000_000
    nb_html = (out / "runs" / "echo-aaa" / "notebook.html").read_text()
    assert "EchoParams" in nb_html                                       # the notebook's code, rendered
    assert "k_squared" in html and "9" in html                            # the results table
    assert "https://" not in html and "http://" not in html

    # rebuilt from scratch: a run that disappeared leaves nothing behind
    shutil.rmtree(sweep / "echo-aaa")
    write_report(sweep, out)
    assert not (out / "runs" / "echo-aaa").exists()
    assert json.loads((sweep / "sweep.json").read_text())["name"] == "demo"
