"""The static sweep report: one folder you can open offline.

``write_report(sweep_dir, out_dir)`` derives everything from the sweep's run directories (and its
``sweep.json``, which says which run ids belong to the sweep) and writes::

    <out_dir>/index.html            overview: counts, failure table, then per notebook each run's
                                    headline tables (RunDir.write_key_table), the results
                                    table (labcore.results.collect) and every run with its
                                    parameters, status, figure thumbnails and links
    <out_dir>/runs/<run_id>/notebook.html   the executed notebook rendered by nbconvert (never
                                    re-executed)
    <out_dir>/runs/<run_id>/figures/        copies of the run's figures (<name>.html, <name>.png)
    <out_dir>/assets/plotly.min.js  one shared copy of plotly.js for all figure pages

Nothing is fetched from the network by index.html or the figure pages. The nbconvert pages keep
nbconvert's optional CDN scripts (require.js, MathJax): offline they show plain text for LaTeX.
The folder is rebuilt from scratch on every call (``labcore report SWEEP_DIR``); index.html is
written last and atomically.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import shutil
from pathlib import Path

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
.thumbs img { height: 140px; border: 1px solid #ccc; margin: 2px; }
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


def _render_notebook(exporter, src: Path, dst: Path) -> bool:
    if not src.exists():
        return False
    try:
        body, _ = exporter.from_filename(str(src))
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


def _table_html(df: pd.DataFrame, max_rows: int) -> str:
    if df.empty:
        return "<p class='missing'>no rows</p>"
    note = ""
    if len(df) > max_rows:
        note = f"<p class='missing'>showing {max_rows} of {len(df)} rows; the full table is results.parquet</p>"
        df = df.head(max_rows)
    df = df.dropna(axis=1, how="all")
    df = df.rename(columns={c: c[len(PARAM_PREFIX):] for c in df.columns if c.startswith(PARAM_PREFIX)})
    return note + "<div class='scroll'>" + df.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.6g}",
                                                     border=0) + "</div>"


def write_report(sweep_dir: str | Path, out_dir: str | Path, *, title: str | None = None,
                 max_rows: int = 500) -> Path:
    """Write the report of one sweep directory into ``out_dir``; returns the index.html path."""
    # here, not at the top: nbconvert takes ~1.5 s to import, and labcore.cli imports this module
    # for every command
    from nbconvert import HTMLExporter

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
    exporter = HTMLExporter(template_name="lab")
    assets = out_dir / "assets"

    # Per run: rendered notebook and figures.
    per_run: dict[str, dict] = {}
    for _, row in runs.iterrows():
        rid, rdir = row["run_id"], Path(row["path"])
        rout = out_dir / "runs" / rid
        has_nb = _render_notebook(exporter, rdir / "executed.ipynb", rout / "notebook.html")
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

    # Per notebook.
    notebooks = sorted(set(runs["notebook"].dropna())) if not runs.empty else []
    for nb in notebooks:
        parts.append(f"<h2 id='nb-{_e(nb)}'>{_e(nb)}</h2>")
        res = results[results["notebook"] == nb].drop(columns=["notebook", "sweep"], errors="ignore") \
            if not results.empty else results
        for _, r in runs[(runs["notebook"] == nb) & (runs["status"] == "done")].iterrows():
            tables = RunDir(r["path"]).key_tables()
            if tables:
                parts.append(f"<h3>Key results <small><code>{_e(r['run_id'])}</code></small></h3>")
                for tname, tdf in tables.items():
                    parts.append(f"<h4>{_e(tname.replace('_', ' '))}</h4>" + _table_html(tdf, max_rows))
        # Parameters are listed per run below; the results table shows identities and metrics.
        res = res.drop(columns=[c for c in res.columns if c.startswith(PARAM_PREFIX)])
        parts.append("<h3>Results (one row per summary row; full table: results.parquet)</h3>"
                     + _table_html(res, max_rows))
        parts.append("<h3>Runs</h3><table><tr><th>run</th><th>seed</th><th>params</th><th>status</th>"
                     "<th>time (s)</th><th>figures</th><th>notebook</th></tr>")
        for _, r in runs[runs["notebook"] == nb].sort_values(["status", "run_id"]).iterrows():
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
            parts.append(
                f"<tr id='{_e(r['run_id'])}'><td><code>{_e(r['run_id'])}</code></td><td>{_e(r['seed'])}</td>"
                f"<td>{_e(_params_text(r))}</td><td class='{_e(r['status'])}'>{_e(r['status'])}</td>"
                f"<td>{dur}</td><td class='thumbs'>{' '.join(thumbs)}</td>"
                f"<td>{_link(link, 'executed notebook')}</td></tr>")
        parts.append("</table>")
    if not notebooks:
        parts.append("<p class='missing'>no run directories yet</p>")
    parts.append("</body></html>")
    index = out_dir / "index.html"
    write_atomic(index, "\n".join(parts))
    return index
