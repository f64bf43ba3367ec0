"""labcore.viz.report on hand-made run directories (no kernels): tables, thumbnails, notebooks, failures."""

import importlib.util
import json
import shutil
import struct
import zlib
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from bs4 import BeautifulSoup

from labcore.experiments.core import paired_deltas, summarize
from labcore.results import RunDir, write_json_atomic
from labcore.viz.figures import deltas_figure, variants_figure
from labcore.viz.offline_html import external_resources
from labcore.viz.report import finding, informative, write_report

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


# ----------------------------------------------------------------------------------------------
# A report of an ablation run: findings first, generated from the run's paired-deltas table.
# ----------------------------------------------------------------------------------------------

def _load_sibling(name: str):
    """A test module beside this one (the tests are not a package: --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location(f"_report_{name}", Path(__file__).parent / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_png(width: int = 4, height: int = 2) -> bytes:
    """A valid grey PNG (drawn by the browser test, so it must decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


ROWS = ["PKM", "+rm softmax", "+TDQKR"]
PAPER = {"+rm softmax": -0.006, "+TDQKR": -0.008}


def walk_table() -> pd.DataFrame:
    """Three rows x four seeds: "+rm softmax" is 0.05 lower than PKM with tiny noise (resolved),
    "+TDQKR" differs from it by noise of sd ~0.03 only (not resolvable against the paper's 0.008)."""
    rng = np.random.default_rng(1)
    noise = [0.03, -0.02, 0.02, -0.025]           # +TDQKR - "+rm softmax": mean 0.00125, sd ~0.027
    rows = []
    for s in range(4):
        base = 3.0 + rng.normal(0, 0.1)
        soft = base - 0.05 + rng.normal(0, 0.002)
        rows += [{"variant": "PKM", "seed": s, "val_loss": base, "recall_qa": 0.0},
                 {"variant": "+rm softmax", "seed": s, "val_loss": soft, "recall_qa": 0.0},
                 {"variant": "+TDQKR", "seed": s, "val_loss": soft + noise[s], "recall_qa": 0.0}]
    return pd.DataFrame(rows)


def build_ablation_sweep(root: Path) -> Path:
    """A sweep directory with one finished 05_paper_table run (tables and figures as the notebook
    writes them, an executed notebook with math and a plotly figure) and one finished 00_tour run
    without paired comparisons. Returns the sweep directory."""
    sweep = root / "results" / "walk"
    table = walk_table()
    deltas = paired_deltas(table, "val_loss", chain=True, order=ROWS, paper=PAPER)
    run = RunDir(sweep / "05_paper_table-aaa").start({"rows": ROWS}, notebook="05_paper_table.ipynb", seed=0)
    run.write_summary(table.assign(notebook="05_paper_table.ipynb"))
    run.write_key_table("1_deltas_vs_previous_row", deltas)
    run.write_key_table("2_means", summarize(table, ["val_loss", "recall_qa"]))
    for name, fig in {"val_loss_per_row": variants_figure(table, "val_loss", ROWS),
                      "deltas_vs_paper": deltas_figure(deltas, PAPER)}.items():
        run.save_figure(fig, name, png=False)
        (run.figures_dir / f"{name}.png").write_bytes(tiny_png())
    nbformat.write(_load_sibling("test_offline_html")._notebook(), run.path / "executed.ipynb")
    run.finish()
    tour = RunDir(sweep / "00_tour-bbb").start({"d_model": 16}, notebook="00_tour.ipynb", seed=0)
    tour.write_summary({"metric": "coverage", "value": 0.5})
    tour.finish()
    write_json_atomic(sweep / "sweep.json", {"name": "walk", "runs": [
        {"run_id": "05_paper_table-aaa", "notebook": "05_paper_table.ipynb", "params": {}, "seed": 0},
        {"run_id": "00_tour-bbb", "notebook": "00_tour.ipynb", "params": {}, "seed": 0}]})
    return sweep


def test_report_sections_lead_with_the_finding_read_off_the_deltas(tmp_path):
    sweep = build_ablation_sweep(tmp_path)
    index = write_report(sweep, tmp_path / "reports" / "walk")
    page = index.read_text()
    soup = BeautifulSoup(page, "html.parser")
    d = paired_deltas(walk_table(), "val_loss", chain=True, order=ROWS, paper=PAPER).set_index("variant")
    soft, tdqkr = d.loc["+rm softmax"], d.loc["+TDQKR"]
    assert soft["verdict"].startswith("resolved") and tdqkr["verdict"].startswith("not resolvable")

    # the finding: direction, size, interval, seeds, resolution and verdict, from the numbers
    section = soup.find("h2", id="nb-05_paper_table.ipynb")
    first = section.find_next_sibling()
    assert first.name == "p" and "finding" in first["class"]
    text = " ".join(first.get_text(" ").split())
    assert text.startswith(
        f"1 of 2 differences in val loss (each change vs the previous row) are resolved at n=4 seeds; "
        f"resolution {soft['resolution']:.3g} to {tdqkr['resolution']:.3g} (80% power): +rm softmax vs PKM: "
        f"val loss lower by {abs(soft['delta_mean']):.3g} (95% CI {soft['ci_low']:+.3g} .. {soft['ci_high']:+.3g}).")
    # +rm softmax's resolution is far below 0.006, +TDQKR's far above 0.008: one of two unresolvable
    assert soft["resolution"] < 0.006 < 0.008 < tdqkr["resolution"]
    assert text.endswith(f"1 of 2 of the paper's deltas (median |Δ| 0.007) are smaller than the resolution of "
                         f"their comparison, so the lab cannot confirm or refute them; resolving them would "
                         f"take about {int(tdqkr['seeds_needed'])} seeds. 05_paper_table-aaa")
    # ... also listed at the top of the page, before the failures and the sections
    top = soup.find("h2", id="findings")
    assert top is not None and page.index("id='findings'") < page.index("id='failures'") < page.index("id='nb-05")
    assert "1 of 2 differences in val loss" in top.find_next_sibling("ul").get_text()

    # then the headline figure (the deltas figure) at full width, linked to its interactive page
    fig = first.find_next_sibling()
    assert fig.name == "figure"
    img = fig.find("img")
    assert img["src"] == "runs/05_paper_table-aaa/figures/deltas_vs_paper.png" and "headline" in img["class"]
    assert fig.find("a")["href"] == "runs/05_paper_table-aaa/figures/deltas_vs_paper.html"
    assert "img.headline { width: 100%" in page

    # then the compact lab-vs-paper table, 3 significant digits
    compact = fig.find_next_sibling()
    assert compact.name == "table" and "compact" in compact["class"]
    cells = [[c.get_text() for c in tr.find_all(["th", "td"])] for tr in compact.find_all("tr")]
    assert cells[0] == ["change", "lab Δ val_loss", "95% CI", "resolution", "Holm p", "paper Δ",
                        "seeds to resolve paper Δ", "verdict"]
    assert cells[2] == ["+TDQKR vs +rm softmax", f"{tdqkr['delta_mean']:+.3g}",
                        f"{tdqkr['ci_low']:+.3g} .. {tdqkr['ci_high']:+.3g}", f"{tdqkr['resolution']:.3g}",
                        f"{tdqkr['p_holm']:.3g}", "-0.008", str(int(tdqkr["seeds_needed"])),
                        "not resolvable at this n"]
    assert cells[1][-1] == "resolved" and cells[1][-2] == str(int(soft["seeds_needed"]))

    # raw tables follow, collapsed; all-zero metrics are not shown in them
    details = compact.find_next_siblings("details")
    assert [x.summary.get_text().split(" ")[0] for x in details] == ["Key", "Results", "Runs"]
    assert all(not x.has_attr("open") for x in details)
    raw_headers = [th.get_text() for x in details for th in x.find_all("th")]
    assert "val_loss_mean" in raw_headers and "delta_mean" in raw_headers
    assert not [h for h in raw_headers if h.startswith("recall_qa")]
    assert "not shown (all zero or missing): recall_qa_mean, recall_qa_std, recall_qa_ci95, recall_qa_n" in page

    assert "summary_seed" not in page.split("id='nb-00_tour.ipynb'")[1].split("id='nb-05")[0]  # 05's columns
    # a run without a paired comparison says so instead of inventing a finding
    tour = soup.find("h2", id="nb-00_tour.ipynb").find_next_sibling()
    assert "No paired comparison in this run" in tour.get_text()


def test_every_report_page_is_offline(tmp_path):
    sweep = build_ablation_sweep(tmp_path)
    index = write_report(sweep, tmp_path / "reports" / "walk")
    pages = sorted(index.parent.rglob("*.html"))
    rel = {p.relative_to(index.parent).as_posix() for p in pages}
    assert {"index.html", "runs/05_paper_table-aaa/notebook.html",
            "runs/05_paper_table-aaa/figures/deltas_vs_paper.html"} <= rel
    for p in pages:
        assert external_resources(p.read_text()) == [], p
    nb_page = (index.parent / "runs" / "05_paper_table-aaa" / "notebook.html").read_text()
    assert "<math" in nb_page and 'src="../../assets/plotly.min.js"' in nb_page   # MathML, local plotly.js
    assert (index.parent / "assets" / "plotly.min.js").stat().st_size > 1_000_000


def test_finding_of_a_single_comparison_and_of_an_old_table():
    d = paired_deltas(walk_table(), "val_loss", baseline="PKM", order=ROWS[:2])
    (r,) = d.to_dict("records")
    assert finding(d) == (f"+rm softmax vs PKM: val loss lower by {abs(r['delta_mean']):.3g} (95% CI "
                          f"{r['ci_low']:+.3g} .. {r['ci_high']:+.3g}), n=4 seeds; resolution "
                          f"{r['resolution']:.3g} (80% power): resolved.")
    # a resolved difference against the paper's direction is named
    d = d.assign(paper_delta=[0.5])                          # far above the resolution, opposite sign
    assert finding(d).endswith("The paper's deltas (median |Δ| 0.5) are all above the resolution, so the "
                               "comparison with the paper is meaningful at this n: +rm softmax vs PKM goes "
                               "against the paper (+0.5).")
    assert finding(d.assign(paper_delta=[-0.5])).endswith("at this n: 1 resolved difference(s) go the paper's way.")
    # a table written before the resolution existed: read from its CI, no resolution claimed
    old = pd.DataFrame({"variant": ["b", "c"], "reference": ["a", "a"], "metric": ["val_loss"] * 2,
                        "delta_mean": [0.01, -0.2], "delta_ci95": [0.05, 0.1], "n": [3, 3],
                        "verdict": ["inside seed noise", "lower"]})
    assert finding(old) == ("1 of 2 differences in val loss (each variant vs a) are resolved at n=3 seeds: "
                            "c vs a: val loss lower by 0.2 (95% CI -0.3 .. -0.1).")


def test_uninformative_columns_are_dropped():
    df = pd.DataFrame({"seed": [0, 0], "variant": ["a", "b"], "recall_qa": [0.0, 0.0], "x": [np.nan, np.nan],
                       "val_loss": [3.0, 0.0], "r_mean": [0.0, 0.0], "r_n": [3, 3], "v_mean": [1.0, 2.0],
                       "v_n": [3, 3]})
    assert list(informative(df).columns) == ["seed", "variant", "val_loss", "v_mean", "v_n"]


def test_finding_names_how_the_rows_compare():
    def table(pairs):
        return pd.DataFrame({"variant": [v for v, _ in pairs], "reference": [r for _, r in pairs],
                             "metric": ["stored_kbit"] * len(pairs), "delta_mean": [1.0] * len(pairs),
                             "delta_ci95": [5.0] * len(pairs), "n": [3] * len(pairs),
                             "verdict": ["inside seed noise"] * len(pairs)})
    # two chains (one per trunk): each row vs the row before it, or the start of its own chain
    two = table([("s 2", "s 1"), ("s 4", "s 2"), ("b 2", "b 1"), ("b 4", "b 2")])
    assert "(each change vs the previous row)" in finding(two)
    assert "(each change vs the previous row)" in finding(table([("b", "a"), ("c", "b")]))
    assert "(each variant vs dense)" in finding(table([("moe", "dense"), ("pkm", "dense")]))
    mixed = table([("pkm", "dense"), ("ultramem", "moe")])
    assert "(each variant vs its reference)" in finding(mixed)
