"""Executed notebooks as HTML pages that work fully offline.

``notebook_to_offline_html(nb, assets_dir, page_dir=...)`` renders a notebook with nbconvert's
``lab`` template, but:

- math is rendered at build time: ``$...$``, ``$$...$$``, ``\\(...\\)``, ``\\[...\\]`` and
  ``\\begin{env}...\\end{env}`` in markdown cells, ``text/markdown`` outputs and ``text/latex``
  outputs become MathML, which browsers draw natively (Chromium 109+, Firefox, Safari). No
  MathJax, no fonts, no script. TeX that cannot be converted is shown as its source in a
  ``<code class="lab-math-error">``;
- no CDN script at all: require.js, MathJax, mermaid and the ipywidgets embed manager are dropped
  from the page head (widget outputs fall back to their text form);
- plotly figures (``application/vnd.plotly.v1+json`` outputs, what plotly's default renderer
  sends from a kernel) are drawn by one local plotly.js, ``<assets_dir>/plotly.min.js``, loaded through a
  relative ``<script src>``; it is copied from the installed plotly package when missing.

Why MathML through ``latex2mathml``: it is a small pure-Python dependency, fast per formula, so
``make setup`` already provides it and nothing runs or downloads at report time. The alternatives
cost more: KaTeX or MathJax at build time need node at report time plus an npm install step
(KaTeX's HTML output also needs its CSS and fonts copied beside the page; MathJax's SVG output is
self-contained but its package is large and slower per formula), ``ziamath`` (SVG in pure Python)
is larger and much slower per formula on the same TeX parser, and bundling a client-side renderer
leaves raw TeX in the page until a script runs. The price: MathML covers common TeX (fractions,
scripts, sums, matrices, ``align``/``cases``) but not every MathJax macro, and its look depends
on the reader's math font (the page asks for STIX Two Math, Latin Modern Math or Cambria Math).
"""

from __future__ import annotations

import copy
import functools
import html
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import nbformat
from jinja2 import DictLoader, pass_context
from latex2mathml.converter import convert as _latex_to_mathml
from nbconvert import HTMLExporter
from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

from labcore.results import write_atomic

__all__ = ["PLOTLY_JS", "external_resources", "notebook_to_offline_html", "tex_to_html"]

PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"
PLOTLY_JS = "plotly.min.js"  # file name of the shared plotly.js inside assets_dir

_MATH_CSS = """
math { font-family: "STIX Two Math", "Latin Modern Math", "Cambria Math", math, serif; font-size: 1.05em; }
math[display="block"] { display: block math; margin: 0.6em 0; overflow-x: auto; overflow-y: hidden; }
.lab-math-error { color: #b00020; white-space: pre-wrap; }
"""

# The lab template with its CDN scripts replaced: require.js -> the local plotly.js (only when the
# notebook has plotly figures), MathJax -> math CSS, mermaid and the widget manager -> nothing.
_TEMPLATE = (
    "{%- extends 'index.html.j2' -%}\n"
    "{%- block html_head_js -%}\n"
    "{%- if resources.offline_plotly_src -%}"
    '<script src="{{ resources.offline_plotly_src }}"></script>'
    "{%- endif -%}\n"
    "{%- endblock html_head_js -%}\n"
    "{% block jupyter_widgets %}{% endblock jupyter_widgets %}\n"
    "{%- block html_head_js_mathjax -%}<style type=\"text/css\">{{ resources.offline_math_css }}</style>"
    "{%- endblock html_head_js_mathjax -%}\n"
    "{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}\n"
)
_TEMPLATE_FILE = "labcore_offline.html.j2"

_LABEL = re.compile(r"\\label\{[^{}]*\}")
_ALIGNED = re.compile(r"\\(begin|end)\{aligned\}")


def tex_to_html(tex: str, *, display: bool) -> str:
    """One formula (TeX without delimiters) as MathML; on a conversion error its escaped source in
    ``<code class="lab-math-error">`` (never raw ``$`` delimiters)."""
    src = _ALIGNED.sub(r"\\\1{align*}", _LABEL.sub("", tex)).strip()
    try:
        return _latex_to_mathml(src, display="block" if display else "inline")
    except Exception as e:  # noqa: BLE001 - one bad formula must not break the page
        title = html.escape(f"{type(e).__name__}: {e}", quote=True)
        return f'<code class="lab-math-error" title="{title}">{html.escape(tex.strip())}</code>'


class _MathMLRenderer(IPythonRenderer):
    """nbconvert's markdown renderer with math turned into MathML instead of MathJax input."""

    def block_math(self, body: str) -> str:
        return tex_to_html(body, display=True)

    def inline_math(self, body: str) -> str:
        return tex_to_html(body, display=False)

    def latex_environment(self, name: str, body: str) -> str:
        return tex_to_html(f"\\begin{{{name}}}{body}\\end{{{name}}}", display=True)


class _OfflineHTMLExporter(HTMLExporter):
    @pass_context
    def markdown2html(self, context, source):  # same as HTMLExporter's, with _MathMLRenderer
        cell = context.get("cell", {})
        renderer = _MathMLRenderer(
            escape=False,
            attachments=cell.get("attachments", {}),
            embed_images=self.embed_images,
            path=context.get("resources", {}).get("metadata", {}).get("path", ""),
            anchor_link_text=self.anchor_link_text,
            exclude_anchor_links=self.exclude_anchor_links,
            **self.lexer_options,
        )
        return MarkdownWithMath(renderer=renderer).render(source)


@functools.lru_cache(maxsize=1)
def _exporter() -> _OfflineHTMLExporter:
    return _OfflineHTMLExporter(template_name="lab", template_file=_TEMPLATE_FILE,
                                extra_loaders=[DictLoader({_TEMPLATE_FILE: _TEMPLATE})])


def _latex_output_html(latex: str) -> str:
    """A ``text/latex`` output (``$x$``, ``$$x$$``, ``\\begin{equation}...``) as HTML with MathML."""
    return '<div class="jp-RenderedLatex">' + MarkdownWithMath(
        renderer=_MathMLRenderer(escape=True)).render(latex) + "</div>"


def _plotly_output_html(bundle: dict) -> str:
    """The plotly mimetype bundle ({"data", "layout", "frames"?, "config"?}) as a div + script that
    calls the page's Plotly."""
    import plotly.io as pio  # heavy import: only for notebooks that have figures

    fig = {k: v for k, v in bundle.items() if k != "config"}
    # the height plotly's own notebook renderer uses (a notebook output has no height to fill)
    return pio.to_html(fig, config=bundle.get("config"), include_plotlyjs=False, include_mathjax=False,
                       full_html=False, validate=False, default_width="100%", default_height="525px")


def _offline_outputs(nb: nbformat.NotebookNode) -> tuple[nbformat.NotebookNode, bool]:
    """A copy of ``nb`` whose outputs need no network; also whether it has plotly figures."""
    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)  # the widget state needs the CDN widget manager
    has_plotly = False
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data")
            if not data:
                continue
            data.pop(WIDGET_VIEW_MIME, None)  # -> the text/plain fallback
            if PLOTLY_MIME in data:
                data["text/html"] = _plotly_output_html(data.pop(PLOTLY_MIME))
                has_plotly = True
            elif "text/latex" in data and "text/html" not in data:
                data["text/html"] = _latex_output_html(data.pop("text/latex"))
    return nb, has_plotly


def _ensure_plotly_js(assets_dir: Path) -> None:
    dst = assets_dir / PLOTLY_JS
    if dst.exists():
        return
    import plotly

    packaged = Path(plotly.__file__).parent / "package_data" / PLOTLY_JS
    if packaged.exists():
        write_atomic(dst, packaged.read_bytes())
    else:  # a plotly build without the packaged file
        from plotly.offline import get_plotlyjs

        write_atomic(dst, get_plotlyjs())


def notebook_to_offline_html(nb: nbformat.NotebookNode | str | Path, assets_dir: str | Path, *,
                             page_dir: str | Path, title: str | None = None) -> str:
    """Render an executed notebook (a node or an .ipynb path; never re-executed) as one HTML page
    that makes no network request. ``page_dir`` is the folder the page will be written to; the page
    loads ``<assets_dir>/plotly.min.js`` by a path relative to it (written there if the notebook has
    plotly figures and the file is missing). The page title is the notebook's metadata title, else
    ``title``, else the file name (stem). Returns the page's text; writes nothing else. The input
    notebook is not modified."""
    name = title or "Notebook"
    if isinstance(nb, str | Path):
        name = title or Path(nb).stem
        nb = nbformat.read(nb, as_version=4)
    nb, has_plotly = _offline_outputs(nb)
    resources: dict[str, Any] = {"offline_math_css": _MATH_CSS, "offline_plotly_src": "",
                                 "metadata": {"name": name}}
    if has_plotly:
        assets_dir = Path(assets_dir)
        _ensure_plotly_js(assets_dir)
        rel = os.path.relpath(assets_dir / PLOTLY_JS, Path(page_dir))
        resources["offline_plotly_src"] = Path(rel).as_posix()
    body, _ = _exporter().from_notebook_node(nb, resources=resources)
    return body


# ----------------------------------------------------------------------------------------------
# Checking a page: what would a browser fetch from the network?
# ----------------------------------------------------------------------------------------------

_EXTERNAL = re.compile(r"^\s*(https?:)?//", re.IGNORECASE)
_CSS_URL = re.compile(r"""url\(\s*['"]?\s*((?:https?:)?//[^'")\s]+)|@import\s+['"]((?:https?:)?//[^'"]+)""",
                      re.IGNORECASE)
# (tag, attribute) pairs a browser loads by itself; <a href> is navigation, not a request.
_FETCHED = {("script", "src"), ("link", "href"), ("img", "src"), ("img", "srcset"), ("iframe", "src"),
            ("source", "src"), ("source", "srcset"), ("video", "src"), ("video", "poster"),
            ("audio", "src"), ("embed", "src"), ("object", "data"), ("input", "src"), ("track", "src"),
            ("image", "href"), ("image", "xlink:href"), ("use", "href"), ("use", "xlink:href")}


class _ResourceScanner(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in_style = tag == "style"
        for name, value in attrs:
            if value is None:
                continue
            if (tag, name) in _FETCHED:
                urls = [u.strip().split(" ")[0] for u in value.split(",")] if name == "srcset" else [value]
                self.found += [u for u in urls if _EXTERNAL.match(u)]
            elif name == "style":
                self.found += [a or b for a, b in _CSS_URL.findall(value)]

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.found += [a or b for a, b in _CSS_URL.findall(data)]


def external_resources(page: str) -> list[str]:
    """The http(s) and protocol-relative URLs a browser would fetch while loading ``page``
    (script/link/img/... sources and CSS ``url()``/``@import``); links to click are not counted."""
    scanner = _ResourceScanner()
    scanner.feed(page)
    scanner.close()
    return scanner.found
