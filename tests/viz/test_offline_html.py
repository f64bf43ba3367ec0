"""labcore.viz.offline_html: executed notebooks as HTML pages that make no network request.

The notebook is built by hand with the outputs a kernel sends (plotly's mimetype renderer, IPython's
Latex display), so no kernel runs. The static tests read the page's HTML; the ``ui`` test opens it
in Debian's chromium with every non-local request aborted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import plotly
import plotly.graph_objects as go
import plotly.io as pio
import pytest
from bs4 import BeautifulSoup
from nbconvert import HTMLExporter

from labcore.viz.offline_html import PLOTLY_JS, external_resources, notebook_to_offline_html, tex_to_html

PLOTLY_MIME = "application/vnd.plotly.v1+json"
MARKDOWN = "Inline $x^2$ and display\n\n$$\\sum_i a_i$$\n\nand an environment \\begin{equation}E = m c^2\\end{equation}"
LATEX_OUTPUT = "$$\\alpha^2 + \\beta$$"
Y = [1, 3, 2]


def _notebook(*, plotly_figure: bool = True, widget: bool = False) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell(MARKDOWN))
    nb.cells.append(nbformat.v4.new_code_cell(
        "display(Latex(...))", execution_count=1,
        outputs=[nbformat.v4.new_output("display_data", data={"text/latex": LATEX_OUTPUT,
                                                              "text/plain": "<IPython.core.display.Latex>"})]))
    nb.cells.append(nbformat.v4.new_code_cell(
        "Markdown(...)", execution_count=2,
        outputs=[nbformat.v4.new_output("execute_result", execution_count=2, data={
            "text/markdown": "Recall: $y_1$", "text/plain": "<IPython.core.display.Markdown>"})]))
    if plotly_figure:
        fig = go.Figure(go.Scatter(y=Y, name="curve"))
        data = json.loads(pio.to_json(fig, validate=False))  # what plotly's mimetype renderer sends
        data["config"] = {"displaylogo": False}                # fig.show(config=...) adds this
        nb.cells.append(nbformat.v4.new_code_cell(
            "fig", execution_count=3,
            outputs=[nbformat.v4.new_output("display_data", data={PLOTLY_MIME: data})]))
    if widget:
        view = {"model_id": "abc", "version_major": 2, "version_minor": 0}
        nb.cells.append(nbformat.v4.new_code_cell(
            "slider", execution_count=4,
            outputs=[nbformat.v4.new_output("display_data", data={
                "application/vnd.jupyter.widget-view+json": view, "text/plain": "IntSlider(value=3)"})]))
        nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {
            "version_major": 2, "version_minor": 0, "state": {}}}
    nbformat.validate(nb)
    return nb


def _rendered_text(page: str) -> str:
    """The text a reader sees in markdown cells and outputs (no code, scripts, styles or MathML)."""
    soup = BeautifulSoup(page, "html.parser")
    for tag in soup(["script", "style", "math"]):
        tag.decompose()
    parts = soup.select(".jp-RenderedMarkdown, .jp-OutputArea-output")
    assert parts, "no rendered markdown or outputs found"
    return " ".join(p.get_text(" ") for p in parts)


@pytest.fixture
def site(tmp_path):
    """(page text, page path, assets dir) for the test notebook, laid out like the sweep report."""
    assets, page_dir = tmp_path / "assets", tmp_path / "runs" / "r1"
    page = notebook_to_offline_html(_notebook(widget=True), assets, page_dir=page_dir)
    page_dir.mkdir(parents=True)
    (page_dir / "notebook.html").write_text(page)
    return page, page_dir / "notebook.html", assets


def test_external_resources_finds_what_a_browser_would_fetch():
    page = ("<html><head><script src='https://cdn.example/a.js'></script><link rel=stylesheet href=//cdn.example/b.css>"
            "<style>@import 'http://cdn.example/c.css'; .x { background: url(\"https://cdn.example/d.png\") }</style>"
            "</head><body><img srcset='local.png 1x, https://cdn.example/e.png 2x'>"
            "<a href='https://arxiv.org/abs/2411.12364'>paper</a><script src='../assets/plotly.min.js'></script>"
            "<div style='background:url(local.png)'></div></body></html>")
    assert external_resources(page) == ["https://cdn.example/a.js", "//cdn.example/b.css",
                                         "http://cdn.example/c.css", "https://cdn.example/d.png",
                                         "https://cdn.example/e.png"]


def test_nbconvert_lab_page_is_not_offline():
    """What the check guards against: nbconvert's own lab page loads require.js and MathJax from a CDN
    and keeps the TeX as raw $...$ for MathJax."""
    page, _ = HTMLExporter(template_name="lab").from_notebook_node(_notebook(plotly_figure=False))
    assert any("require" in u for u in external_resources(page))
    assert any("mathjax" in u for u in external_resources(page))
    assert "$x^2$" in _rendered_text(page)


def test_page_has_no_external_requests(site):
    page, _, _ = site
    assert external_resources(page) == []
    # belt and braces: no http(s) or protocol-relative URL in any src/href attribute at all
    assert not re.findall(r"""\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, flags=re.IGNORECASE)
    for cdn_script in ("require.min.js", "mathjax", "mermaid.esm", "html-manager", "embed-amd"):
        assert cdn_script not in page.lower(), cdn_script


def test_math_is_rendered_to_mathml(site):
    page, _, _ = site
    text = _rendered_text(page)
    assert "$" not in text and "\\sum" not in text and "\\begin" not in text, text
    soup = BeautifulSoup(page, "html.parser")
    maths = soup.find_all("math")
    assert [m.get("display") for m in maths] == ["inline", "block", "block", "block", "inline"]
    inline, display, env, latex_out, markdown_out = maths
    assert inline.find("msup") is not None and [t.get_text() for t in inline.find("msup").children] == ["x", "2"]
    assert "\u2211" in display.get_text()                    # the summation sign
    assert [t.get_text() for t in display.find_all("mi")] == ["i", "a", "i"]
    assert env.get_text() == "E=mc2"
    assert latex_out.find_parent(class_="jp-OutputArea-output") is not None  # the text/latex output
    assert "\u03b1" in latex_out.get_text() and "\u03b2" in latex_out.get_text()
    assert markdown_out.find("msub") is not None and markdown_out.get_text() == "y1"  # text/markdown output


def test_tex_that_cannot_be_converted_is_shown_as_source():
    out = tex_to_html("x^", display=False)
    assert out.startswith('<code class="lab-math-error"') and out.endswith(">x^</code>")
    assert "$" not in out
    ok = tex_to_html("\\frac{1}{2}", display=True)
    assert ok.startswith("<math") and 'display="block"' in ok and "<mfrac>" in ok
    # \label is dropped, aligned is drawn as an align* table
    assert "label" not in tex_to_html("x \\label{eq:1}", display=True)
    assert "<mtable" in tex_to_html("\\begin{aligned} a &= b \\\\ c &= d \\end{aligned}", display=True)


def test_plotly_figure_uses_the_local_plotly_js(site):
    page, page_path, assets = site
    soup = BeautifulSoup(page, "html.parser")
    srcs = [s["src"] for s in soup.find_all("script", src=True)]
    assert srcs == ["../../assets/plotly.min.js"]
    assert (page_path.parent / srcs[0]).resolve() == (assets / PLOTLY_JS).resolve()
    packaged = Path(plotly.__file__).parent / "package_data" / PLOTLY_JS
    assert (assets / PLOTLY_JS).read_bytes() == packaged.read_bytes()
    divs = soup.select(".jp-OutputArea-output .plotly-graph-div")
    assert len(divs) == 1
    script = divs[0].find_next("script").get_text()
    assert re.search(r'Plotly\.newPlot\(\s*"' + re.escape(divs[0]["id"]) + '"', script)
    assert '"y":[1,3,2]' in script.replace(" ", "")
    assert '"displaylogo":false' in script.replace(" ", "")


def test_existing_plotly_js_is_kept_and_no_figure_needs_none(tmp_path):
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / PLOTLY_JS).write_text("/* the report's shared copy */")
    page = notebook_to_offline_html(_notebook(), assets, page_dir=tmp_path / "deep" / "er" / "dir")
    assert '<script src="../../../assets/plotly.min.js">' in page
    assert (assets / PLOTLY_JS).read_text() == "/* the report's shared copy */"

    bare = tmp_path / "bare"
    page = notebook_to_offline_html(_notebook(plotly_figure=False), bare, page_dir=tmp_path)
    assert "<script src" not in page and not bare.exists()


def test_widgets_fall_back_to_text_and_input_is_not_modified(site, tmp_path):
    page, _, _ = site
    assert "IntSlider(value=3)" in _rendered_text(page)
    assert "widget-state" not in page
    nb = _notebook(widget=True)
    before = nbformat.writes(nb)
    page = notebook_to_offline_html(nb, tmp_path / "assets", page_dir=tmp_path)
    assert nbformat.writes(nb) == before
    nbformat.write(nb, tmp_path / "executed.ipynb")                    # a path works the same
    from_file = notebook_to_offline_html(tmp_path / "executed.ipynb", tmp_path / "assets", page_dir=tmp_path)
    assert _rendered_text(from_file) == _rendered_text(page)
    assert "<title>executed</title>" in from_file and "<title>Notebook</title>" in page
    titled = notebook_to_offline_html(tmp_path / "executed.ipynb", tmp_path / "assets", page_dir=tmp_path,
                                      title="run <1>")
    assert "<title>run &lt;1&gt;</title>" in titled
    assert from_file.count("<math") == page.count("<math") == 5
    assert from_file.count('class="plotly-graph-div"') == page.count('class="plotly-graph-div"') == 1
