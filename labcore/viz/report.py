"""The static sweep report: one folder you can open offline, leading with the lab's findings.

``write_report(sweep_dir, out_dir)`` derives everything from the sweep's run directories (and its
``sweep.json``, which says which run ids belong to the sweep) and writes::

    <out_dir>/index.html            overview: counts, the findings (one line per notebook, linked),
                                    the failure table, then one section per notebook
    <out_dir>/runs/<run_id>/notebook.html   the executed notebook as an offline page
                                    (labcore.viz.offline_html: math as MathML, local plotly.js,
                                    no CDN script; never re-executed)
    <out_dir>/runs/<run_id>/figures/        copies of the run's figures (<name>.html, <name>.png)
    <out_dir>/assets/plotly.min.js  one shared copy of plotly.js for all figure and notebook pages

A notebook's section, per finished run, opens with its finding: one or two sentences generated
from the run's headline paired-deltas table (the first key table with a ``delta_mean`` column,
see :func:`labcore.experiments.core.paired_deltas`): direction, size, 95% interval, the design's
resolution and the verdict, and how the resolution compares with the paper's deltas. Then the
headline figure at full width (a deltas figure when the run has one), then a compact lab-vs-paper
table (3 significant digits). The raw tables (every key table, the results table, the runs with
their parameters, thumbnails and links) follow, collapsed. Columns that carry no information in
a table (all missing, or all zero) are left out of it.

Nothing is fetched from the network by any page (:func:`labcore.viz.offline_html.external_resources`
finds nothing to fetch). The folder is rebuilt from scratch on every call (``labcore report
SWEEP_DIR``); index.html is written last and atomically.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from labcore.results import PARAM_PREFIX, RunDir, collect, runs_table, write_atomic

__all__ = ["write_report"]

_PLOTLY_SRC = 'src="plotly.min.js"'

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #ccc; }
.meta { color: #666; margin-bottom: 1.5rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; position: sticky; top: 0; }
.scroll { max-height: 28rem; overflow: auto; display: inline-block; max-width: 100%; }
.done { color: #17652b; } .failed { color: #b00020; font-weight: bold; } .missing { color: #888; }
.thumbs img { height: 100px; border: 1px solid #ccc; margin: 2px; }
.finding { font-size: 1.05rem; max-width: 60rem; line-height: 1.45; }
.findings li { max-width: 60rem; margin-bottom: 0.4rem; }
figure { margin: 0.5rem 0 1rem 0; max-width: 60rem; }
img.headline { width: 100%; border: 1px solid #ddd; }
iframe.headline { width: 100%; height: 540px; border: 1px solid #ddd; }
figcaption { color: #666; font-size: 0.85rem; }
table.compact td, table.compact th { font-size: 0.9rem; }
details { margin: 0.5rem 0; } summary { cursor: pointer; color: #1f4f8b; }
.err { font-family: ui-monospace, monospace; white-space: pre-wrap; max-width: 50rem; }
code { font-size: 0.85rem; }
"""


def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _link(href: str | None, text: str) -> str:
    return f"<a href='{_e(href)}'>{_e(text)}</a>" if href else ""


def _missing(v) -> bool:
    """None, NaN or pd.NA (a scalar); lists and arrays are values, never missing."""
    try:
        return v is None or bool(pd.isna(v))
    except (TypeError, ValueError):  # array-like: pd.isna is element-wise
        return False


def _params_text(row: pd.Series) -> str:
    parts = []
    for col, v in row.items():
        if not col.startswith(PARAM_PREFIX) or _missing(v):
            continue
        parts.append(f"{col[len(PARAM_PREFIX):]}={v}")
    return " ".join(parts)


def _render_notebook(render, src: Path, dst: Path, assets: Path, title: str) -> bool:
    """Write ``src`` (an executed notebook) as the offline page ``dst``; False if there is none."""
    if not src.exists():
        return False
    try:
        body = render(src, assets, page_dir=dst.parent, title=title)
    except Exception as e:  # noqa: BLE001 - a broken notebook must not stop the report
        body = f"<html><body><p>could not render {_e(src)}: {_e(type(e).__name__)}: {_e(e)}</p></body></html>"
    write_atomic(dst, body)
    return True


def _copy_figures(src_dir: Path, dst_dir: Path, assets: Path) -> list[dict]:
    """Copy a run's figures, pointing their HTML at the shared plotly.js. Returns one dict per
    figure name: {"name", "html", "png"} with paths relative to the report root (or None)."""
    figs: dict[str, dict] = {}
    if not src_dir.is_dir():
        return []
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(src_dir.iterdir()):
        if f.suffix == ".html":
            text = f.read_text(errors="replace")
            if _PLOTLY_SRC in text:
                if not (assets / "plotly.min.js").exists() and (src_dir / "plotly.min.js").exists():
                    assets.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src_dir / "plotly.min.js", assets / "plotly.min.js")
                text = text.replace(_PLOTLY_SRC, 'src="../../../assets/plotly.min.js"')
            (dst_dir / f.name).write_text(text)
            figs.setdefault(f.stem, {"name": f.stem, "html": None, "png": None})["html"] = f.name
        elif f.suffix == ".png":
            shutil.copyfile(f, dst_dir / f.name)
            figs.setdefault(f.stem, {"name": f.stem, "html": None, "png": None})["png"] = f.name
    return list(figs.values())


def informative(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` without the columns that carry no information: all missing, or numeric and all zero
    (e.g. a recall that no run got above 0), with the statistics of such a metric in a summary
    table (``<m>_std``, ``_ci95``, ``_n`` when ``<m>_mean`` carries nothing). Identity columns
    (text, integers such as ``seed``) that are all zero stay."""
    empty = set()
    for c in df.columns:
        col = df[c]
        if col.isna().all() or (pd.api.types.is_float_dtype(col) and (col.fillna(0.0) == 0.0).all()):
            empty.add(c)
    for c in [c for c in empty if str(c).endswith("_mean")]:
        empty |= {c[: -len("_mean")] + s for s in ("_std", "_ci95", "_n")}
    return df[[c for c in df.columns if c not in empty]]


def _table_html(df: pd.DataFrame, max_rows: int) -> str:
    if df.empty:
        return "<p class='missing'>no rows</p>"
    note = ""
    if len(df) > max_rows:
        note = f"<p class='missing'>showing {max_rows} of {len(df)} rows; the full table is results.parquet</p>"
        df = df.head(max_rows)
    kept = informative(df)
    # columns with values that are all zero are named; all-missing ones (e.g. another notebook's
    # metrics in a shared results table) are just left out
    dropped = [c for c in df.columns if c not in kept.columns and not df[c].isna().all()]
    df = kept
    if dropped:
        note += (f"<p class='missing'>not shown (all zero or missing): "
                 f"{_e(', '.join(str(c).removeprefix(PARAM_PREFIX) for c in dropped))}</p>")
    df = df.rename(columns={c: c[len(PARAM_PREFIX):] for c in df.columns if c.startswith(PARAM_PREFIX)})
    return note + "<div class='scroll'>" + df.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.6g}",
                                                     border=0) + "</div>"


# ----------------------------------------------------------------------------------------------
# Findings: sentences and a compact table generated from a paired-deltas table
# ----------------------------------------------------------------------------------------------

def _num(r: dict, key: str) -> float:
    v = r.get(key)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return v


def _g(v: float, sign: bool = False) -> str:
    """3 significant digits (``+`` for signed deltas); an en dash when missing."""
    if math.isnan(v):
        return "\u2013"
    if math.isinf(v):
        return "\u221e"
    return f"{v:+.3g}" if sign else f"{v:.3g}"


def _interval(r: dict) -> tuple[float, float]:
    lo, hi = _num(r, "ci_low"), _num(r, "ci_high")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        m, h = _num(r, "delta_mean"), _num(r, "delta_ci95")
        lo, hi = m - h, m + h
    return lo, hi


def _status(r: dict) -> str:
    """resolved | inside seed noise | not resolvable at this n (older tables: read from the CI)."""
    v = str(r.get("verdict") or "")
    for s in ("resolved", "inside seed noise", "not resolvable at this n"):
        if v.startswith(s):
            return s
    lo, hi = _interval(r)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "not resolvable at this n"
    return "resolved" if lo > 0 or hi < 0 else "inside seed noise"


def headline_deltas(tables: dict[str, pd.DataFrame]) -> pd.DataFrame | None:
    """The first key table that is a paired-deltas table (has ``variant``, ``reference`` and
    ``delta_mean``), or None."""
    for t in tables.values():
        if {"variant", "reference", "delta_mean"} <= set(t.columns) and len(t):
            return t
    return None


def _effect(r: dict) -> str:
    m = _num(r, "delta_mean")
    lo, hi = _interval(r)
    metric = str(r.get("metric", "the metric")).replace("_", " ")
    size = "no different" if m == 0 else f"{'lower' if m < 0 else 'higher'} by {_g(abs(m))}"
    return (f"{r['variant']} vs {r['reference']}: {metric} {size} "
            f"(95% CI {_g(lo, True)} .. {_g(hi, True)})")


def finding(deltas: pd.DataFrame) -> str:
    """One or two sentences read off a paired-deltas table: what is resolved (direction, size,
    interval), how many seeds, the design's resolution, and whether that resolution is fine enough
    for the paper's deltas (and the seeds that would make it so)."""
    rows = deltas.to_dict("records")
    n = sorted({int(_num(r, "n")) for r in rows if math.isfinite(_num(r, "n"))})
    n_txt = f"n={n[0]} seeds" if len(n) == 1 else "n=" + "/".join(map(str, n)) + " seeds"
    metric = str(rows[0].get("metric", "the metric")).replace("_", " ")
    res = [_num(r, "resolution") for r in rows]
    res = [x for x in res if math.isfinite(x)]
    res_txt = ""
    if res:
        lo, hi = min(res), max(res)
        res_txt = (f"; resolution {_g(lo)}" if hi <= 1.1 * lo else f"; resolution {_g(lo)} to {_g(hi)}")
        res_txt += " (80% power)"
    # chained: each row compares with the row before it, or starts a new chain (e.g. one chain per trunk)
    variants = {r["variant"] for r in rows}
    links = [r["reference"] == p["variant"] for p, r in zip(rows, rows[1:])]
    chained = (len(rows) > 1 and any(links) and all(ok or r["reference"] not in variants
                                                      for ok, r in zip(links, rows[1:])))
    one_reference = len({r["reference"] for r in rows}) == 1
    resolved = sorted((r for r in rows if _status(r) == "resolved"), key=lambda r: -abs(_num(r, "delta_mean")))
    if len(rows) == 1:
        r = rows[0]
        first = f"{_effect(r)}, {n_txt}{res_txt}: {_status(r)}."
    else:
        what = ("each change vs the previous row" if chained else f"each variant vs {rows[0]['reference']}"
                if one_reference else "each variant vs its reference")
        if resolved:
            shown = "; ".join(_effect(r) for r in resolved[:2]) + (f"; and {len(resolved) - 2} more" if len(resolved) > 2 else "")
            first = (f"{len(resolved)} of {len(rows)} differences in {metric} ({what}) are resolved at "
                     f"{n_txt}{res_txt}: {shown}.")
        else:
            big = max(rows, key=lambda r: abs(_num(r, "delta_mean")) if math.isfinite(_num(r, "delta_mean")) else -1)
            first = (f"None of the {len(rows)} differences in {metric} ({what}) is resolved at {n_txt}{res_txt}; "
                     f"the largest is {_effect(big)}.")
    paper = [r for r in rows if math.isfinite(_num(r, "paper_delta"))]
    if not paper:
        return first
    below = [r for r in paper if math.isfinite(_num(r, "resolution"))
             and _num(r, "resolution") > abs(_num(r, "paper_delta"))]
    size = _g(float(np.median([abs(_num(r, "paper_delta")) for r in paper])))
    need = [_num(r, "seeds_needed") for r in below if math.isfinite(_num(r, "seeds_needed"))]
    if not below:
        second = (f"The paper's deltas (median |Δ| {size}) are all above the resolution, so the "
                  f"comparison with the paper is meaningful at this n")
        against = [r for r in paper if _status(r) == "resolved"
                   and np.sign(_num(r, "delta_mean")) != np.sign(_num(r, "paper_delta"))]
        agree = sum(1 for r in paper if _status(r) == "resolved") - len(against)
        second += (f": {agree} resolved difference(s) go the paper's way" if agree else "")
        if against:
            second += ("; " if agree else ": ") + ", ".join(
                f"{r['variant']} vs {r['reference']} goes against the paper ({_g(_num(r, 'paper_delta'), True)})"
                for r in against)
        second += "."
    else:
        med = " (median)" if len(need) > 1 else ""
        need_txt = (f"; resolving them would take about {int(np.median(need))} seeds{med}" if need
                    else "; no practical number of seeds would resolve them at this scale")
        second = (f"{len(below)} of {len(paper)} of the paper's deltas (median |Δ| {size}) are smaller than "
                  f"the resolution of their comparison, so the lab cannot confirm or refute them{need_txt}.")
    return f"{first} {second}"


def compact_table(deltas: pd.DataFrame) -> str:
    """Lab vs paper, one row per comparison, 3 significant digits; with several rows, their
    Holm-adjusted p-values (the verdicts use them)."""
    rows = deltas.to_dict("records")
    has_paper = any(math.isfinite(_num(r, "paper_delta")) for r in rows)
    has_res = any(math.isfinite(_num(r, "resolution")) for r in rows)
    metric = str(rows[0].get("metric", "")) if rows else ""
    has_holm = len(rows) > 1 and any(math.isfinite(_num(r, "p_holm")) for r in rows)
    head = ["change", f"lab Δ {metric}", "95% CI"] + (["resolution"] if has_res else []) + (
        ["Holm p"] if has_holm else []) + (
        ["paper Δ", "seeds to resolve paper Δ"] if has_paper else []) + ["verdict"]
    out = ["<table class='compact'><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        lo, hi = _interval(r)
        cells = [f"{r['variant']} vs {r['reference']}", _g(_num(r, "delta_mean"), True),
                 f"{_g(lo, True)} .. {_g(hi, True)}"]
        if has_res:
            cells.append(_g(_num(r, "resolution")))
        if has_holm:
            cells.append(_g(_num(r, "p_holm")))
        if has_paper:
            need = _num(r, "seeds_needed")
            cells += [_g(_num(r, "paper_delta"), True), "\u2013" if not math.isfinite(need) else f"{int(need)}"]
        st = _status(r)
        cells.append(st)
        cls = {"resolved": "done", "inside seed noise": "missing"}.get(st, "missing")
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells[:-1])
                   + f"<td class='{cls}' title='{_e(r.get('verdict', ''))}'>{_e(st)}</td></tr>")
    return "".join(out) + "</table>"


def _headline_figure(figs: list[dict], base: str) -> str:
    if not figs:
        return ""
    fig = next((f for f in figs if "delta" in f["name"]), figs[0])
    if fig["png"]:
        img = (f"<img class='headline' src='{_e(base + fig['png'])}' alt='{_e(fig['name'])}'>")
        inner = f"<a href='{_e(base + fig['html'])}'>{img}</a>" if fig["html"] else img
    else:
        inner = f"<iframe class='headline' src='{_e(base + fig['html'])}' title='{_e(fig['name'])}'></iframe>"
    cap = f"{fig['name'].replace('_', ' ')}" + (" (click for the interactive figure)" if fig["png"] and fig["html"]
                                                else "")
    return f"<figure>{inner}<figcaption>{_e(cap)}</figcaption></figure>"


def write_report(sweep_dir: str | Path, out_dir: str | Path, *, title: str | None = None,
                 max_rows: int = 500) -> Path:
    """Write the report of one sweep directory into ``out_dir``; returns the index.html path."""
    # here, not at the top: offline_html imports nbconvert (~1.5 s), and labcore.cli imports this
    # module for every command
    from labcore.viz.offline_html import notebook_to_offline_html

    sweep_dir, out_dir = Path(sweep_dir).resolve(), Path(out_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    meta = {}
    if (sweep_dir / "sweep.json").exists():
        meta = json.loads((sweep_dir / "sweep.json").read_text())
    planned = meta.get("runs")
    run_ids = [r["run_id"] for r in planned] if planned is not None else None
    runs = runs_table(sweep_dir, run_ids=run_ids)
    results = collect(sweep_dir, run_ids=run_ids)
    name = meta.get("name", sweep_dir.name)

    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / "runs", ignore_errors=True)
    shutil.rmtree(out_dir / "assets", ignore_errors=True)
    assets = out_dir / "assets"

    # Per run: rendered notebook and figures.
    per_run: dict[str, dict] = {}
    for _, row in runs.iterrows():
        rid, rdir = row["run_id"], Path(row["path"])
        rout = out_dir / "runs" / rid
        has_nb = _render_notebook(notebook_to_offline_html, rdir / "executed.ipynb", rout / "notebook.html",
                                  assets, f"{row['notebook']} ({rid})")
        figs = _copy_figures(rdir / "figures", rout / "figures", assets)
        per_run[rid] = {"notebook_html": f"runs/{rid}/notebook.html" if has_nb else None, "figures": figs}

    # Runs planned by sweep.json that have no directory at all.
    missing = []
    if planned is not None:
        present = set(runs["run_id"]) if not runs.empty else set()
        missing = [r for r in planned if r["run_id"] not in present]

    n_done = int((runs["status"] == "done").sum()) if not runs.empty else 0
    n_failed = int((runs["status"] == "failed").sum()) if not runs.empty else 0
    n_other = (len(runs) - n_done - n_failed) + len(missing)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title or 'sweep ' + name)}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{_e(title or 'Sweep ' + name)}</h1>",
             f"<div class='meta'>{_e(meta.get('description', ''))}<br>"
             f"{n_done} done, {n_failed} failed, {n_other} not finished &middot; results: "
             f"<code>{_e(sweep_dir / 'results.parquet')}</code> &middot; generated "
             f"{_e(_dt.datetime.now().strftime('%Y-%m-%d %H:%M:%S'))}"
             + (f" &middot; executor: {_e(meta.get('executor'))}" if meta.get("executor") else "") + "</div>"]

    # Per notebook (built first: the findings list at the top is collected on the way).
    findings: list[str] = []
    sections: list[str] = []
    notebooks = sorted(set(runs["notebook"].dropna())) if not runs.empty else []
    for nb in notebooks:
        sec = [f"<h2 id='nb-{_e(nb)}'>{_e(nb)}</h2>"]
        raw = []
        for _, r in runs[(runs["notebook"] == nb) & (runs["status"] == "done")].iterrows():
            rid = r["run_id"]
            tables = RunDir(r["path"]).key_tables()
            deltas = headline_deltas(tables)
            label = f" <small><code>{_e(rid)}</code></small>"
            if deltas is not None:
                text = finding(deltas)
                sec.append(f"<p class='finding'>{_e(text)}{label}</p>")
                findings.append(f"<li><a href='#nb-{_e(nb)}'>{_e(nb)}</a>: {_e(text)}</li>")
            else:
                sec.append(f"<p class='finding missing'>No paired comparison in this run; its tables are "
                           f"below.{label}</p>")
            sec.append(_headline_figure(per_run.get(rid, {}).get("figures", []), f"runs/{rid}/figures/"))
            if deltas is not None:
                sec.append(compact_table(deltas))
            if tables:
                raw.append(f"<h4>Key tables <small><code>{_e(rid)}</code></small></h4>")
                for tname, tdf in tables.items():
                    raw.append(f"<h5>{_e(tname.replace('_', ' '))}</h5>" + _table_html(tdf, max_rows))
        if raw:
            sec.append("<details><summary>Key results (raw tables)</summary>" + "".join(raw) + "</details>")
        res = results[results["notebook"] == nb].drop(columns=["notebook", "sweep"], errors="ignore") \
            if not results.empty else results
        # Parameters are listed per run below; the results table shows identities and metrics.
        res = res.drop(columns=[c for c in res.columns if c.startswith(PARAM_PREFIX)])
        sec.append("<details><summary>Results (one row per summary row; full table: results.parquet)</summary>"
                   + _table_html(res, max_rows) + "</details>")
        nb_runs = runs[runs["notebook"] == nb]
        sec.append(f"<details><summary>Runs ({len(nb_runs)}): parameters, figures, executed notebooks</summary>"
                   "<table><tr><th>run</th><th>seed</th><th>params</th><th>status</th>"
                   "<th>time (s)</th><th>figures</th><th>notebook</th></tr>")
        for _, r in nb_runs.sort_values(["status", "run_id"]).iterrows():
            info = per_run.get(r["run_id"], {})
            thumbs = []
            for fig in info.get("figures", []):
                base = f"runs/{r['run_id']}/figures/"
                target = base + (fig["html"] or fig["png"])
                inner = (f"<img src='{_e(base + fig['png'])}' alt='{_e(fig['name'])}' title='{_e(fig['name'])}'>"
                         if fig["png"] else _e(fig["name"]))
                thumbs.append(f"<a href='{_e(target)}'>{inner}</a>")
            link = info.get("notebook_html")
            dur = "" if pd.isna(r.get("duration_s")) else f"{r['duration_s']:.1f}"
            sec.append(
                f"<tr id='{_e(r['run_id'])}'><td><code>{_e(r['run_id'])}</code></td><td>{_e(r['seed'])}</td>"
                f"<td>{_e(_params_text(r))}</td><td class='{_e(r['status'])}'>{_e(r['status'])}</td>"
                f"<td>{dur}</td><td class='thumbs'>{' '.join(thumbs)}</td>"
                f"<td>{_link(link, 'executed notebook')}</td></tr>")
        sec.append("</table></details>")
        sections.append("\n".join(sec))

    if findings:
        parts.append("<h2 id='findings'>Findings</h2><ul class='findings'>" + "".join(findings) + "</ul>")

    # Failures.
    failed = runs[runs["status"] != "done"] if not runs.empty else runs
    parts.append("<h2 id='failures'>Failures</h2>")
    if failed.empty and not missing:
        parts.append("<p class='done'>none: every run finished</p>")
    else:
        rows = []
        for _, r in failed.iterrows():
            link = per_run.get(r["run_id"], {}).get("notebook_html")
            cell = "" if pd.isna(r.get("error_cell")) else int(r["error_cell"])
            rows.append(
                f"<tr><td><a href='#{_e(r['run_id'])}'>{_e(r['run_id'])}</a></td><td>{_e(r['notebook'])}</td>"
                f"<td>{_e(r['seed'])}</td><td>{_e(_params_text(r))}</td><td class='failed'>{_e(r['status'])}</td>"
                f"<td>{_e(cell)}</td><td>{_e(r.get('error_name'))}</td><td class='err'>{_e(r.get('error_message'))}</td>"
                f"<td>{_link(link, 'notebook')}</td></tr>")
        for r in missing:
            rows.append(f"<tr><td>{_e(r['run_id'])}</td><td>{_e(r['notebook'])}</td><td>{_e(r['seed'])}</td>"
                        f"<td>{_e(' '.join(f'{k}={v}' for k, v in r['params'].items()))}</td>"
                        "<td class='missing'>not run</td><td></td><td></td><td></td><td></td></tr>")
        parts.append("<table><tr><th>run</th><th>notebook</th><th>seed</th><th>params</th><th>status</th>"
                     "<th>cell</th><th>error</th><th>message</th><th></th></tr>" + "".join(rows) + "</table>")

    parts += sections
    if not notebooks:
        parts.append("<p class='missing'>no run directories yet</p>")
    parts.append("</body></html>")
    index = out_dir / "index.html"
    write_atomic(index, "\n".join(parts))
    return index
