"""The sweep report in a real browser (Debian chromium, see conftest.py) with the network cut off.

The report of a small ablation sweep (built by tests/viz/test_report.py, executed notebook from
tests/viz/test_offline_html.py) is opened from disk; every request that is not ``file:`` or
localhost is aborted and recorded. The index and the notebook page must load without any blocked
or failed request or script error, and their visible text must hold no raw TeX (``$...$``).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from labcore.viz.report import write_report

VIZ_TESTS = Path(__file__).resolve().parents[1] / "viz"
LOCAL = re.compile(r"https?://(localhost|127\.0\.0\.1)[:/]")
RAW_TEX = re.compile(r"\$[^$\s][^$]*\$")          # $x^2$, $$\sum$$ as text: TeX nobody rendered


def _load(name: str):
    """A helper module of the viz tests (the tests are not a package: --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location(f"_viz_{name}", VIZ_TESTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _open_offline(browser, path: Path, wait_for: str) -> dict:
    """Load ``path`` with non-local requests aborted; what the page requested, what failed, and
    its visible text."""
    blocked, failed, errors, requested = [], [], [], []

    def route(r):
        url = r.request.url
        if url.startswith("file:") or LOCAL.match(url):
            r.continue_()
        else:
            blocked.append(url)
            r.abort()

    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        ctx.route("**/*", route)
        pg = ctx.new_page()
        pg.on("requestfailed", lambda req: failed.append(f"{req.url}: {req.failure}"))
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.on("request", lambda req: requested.append(req.url))
        pg.goto(path.as_uri(), wait_until="load")
        pg.wait_for_selector(wait_for, timeout=30_000)
        pg.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")  # raw tables too
        text = pg.evaluate("document.body.innerText")
        broken_imgs = pg.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0)"
                                  ".map(i => i.src)")
        n_math = pg.locator("math").count()
    finally:
        ctx.close()
    return {"blocked": blocked, "failed": failed, "errors": errors, "requested": requested, "text": text,
            "broken_imgs": broken_imgs, "n_math": n_math}


@pytest.mark.ui
def test_report_pages_load_offline_without_raw_tex(browser, tmp_path):
    sweep = _load("test_report").build_ablation_sweep(tmp_path)
    index = write_report(sweep, tmp_path / "reports" / "walk")

    top = _open_offline(browser, index, "p.finding")
    assert top["blocked"] == [] and top["failed"] == [] and top["errors"] == [], top
    assert top["broken_imgs"] == [], top["broken_imgs"]
    assert any(u.endswith("/figures/deltas_vs_paper.png") for u in top["requested"]), top["requested"]
    assert "differences in val loss" in top["text"]                   # the finding is visible
    assert not RAW_TEX.search(top["text"]), RAW_TEX.search(top["text"])

    nb = _open_offline(browser, index.parent / "runs" / "05_paper_table-aaa" / "notebook.html",
                       ".plotly-graph-div svg.main-svg")
    assert nb["blocked"] == [] and nb["failed"] == [] and nb["errors"] == [], nb
    assert all(u.startswith("file:") for u in nb["requested"]), nb["requested"]
    assert any(u.endswith("/assets/plotly.min.js") for u in nb["requested"]), nb["requested"]
    assert "$" not in nb["text"] and "\\sum" not in nb["text"], nb["text"]
    assert nb["n_math"] == 5                                           # its TeX, drawn as MathML


@pytest.mark.ui
def test_notebook_page_renders_math_and_figure_offline(browser, tmp_path):
    """One page of labcore.viz.offline_html (the viz tests' notebook: inline and display math, a
    LaTeX output, a plotly figure): every request stays on disk, the math is laid out as MathML
    boxes, the figure draws its trace."""
    oh = _load("test_offline_html")
    page_dir = tmp_path / "runs" / "r1"
    page_dir.mkdir(parents=True)
    path = page_dir / "notebook.html"
    path.write_text(oh.notebook_to_offline_html(oh._notebook(widget=True), tmp_path / "assets", page_dir=page_dir))
    seen = _open_offline(browser, path, ".plotly-graph-div svg.main-svg")
    assert seen["blocked"] == [] and seen["failed"] == [] and seen["errors"] == [], seen
    assert any(u.endswith("/assets/plotly.min.js") for u in seen["requested"]), seen["requested"]
    assert all(u.startswith("file:") for u in seen["requested"]), seen["requested"]
    assert "$" not in seen["text"] and "\\sum" not in seen["text"], seen["text"]
    assert seen["n_math"] == 5
