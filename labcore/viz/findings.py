"""The lab's published findings: a compact snapshot of one finished sweep, readable without running it.

``write_findings(sweep_dir, out_dir)`` (``labcore findings SWEEP_DIR --out docs``) reads the sweep's
run directories (:mod:`labcore.results`) and writes::

    <out_dir>/findings.md                       the page: provenance, then one section per notebook
    <out_dir>/findings/<name>_headline.csv      a run's headline paired-deltas table, rounded
    <out_dir>/findings/<name>_headline.png      a copy of the run's headline figure
    <out_dir>/findings/snapshot.json            provenance and section texts the page is rendered from

``<name>`` is the notebook (``01_tdqkr``), or the run id when a sweep ran a notebook more than once.
The headline table of a run is the one the report leads with
(:func:`labcore.viz.report.headline_deltas`: the first key table with ``variant``, ``reference`` and
``delta_mean``, the columns of :func:`labcore.experiments.core.paired_deltas`), so any notebook that
writes such a table gets a section; the paper's claim and citations come from :data:`MECHANISMS`
(matched on the notebook's name), and the paper's numbers from the table's ``paper_delta`` column.

The page is mechanically checkable. Each headline CSV holds its numbers in display units (``unit``:
accuracies as points, losses in nats, stored knowledge in kbit), rounded to 3 significant digits,
with the plain verdict and the explanation of each row computed from those rounded values. The page
is a pure function of ``snapshot.json`` and the CSVs (:func:`render_markdown`): each table row is
rendered from exactly one CSV row, and the section's sentence is :func:`labcore.viz.report.finding`
read off the CSV. :func:`check_findings` re-renders the page and compares it, recomputes each row's
verdict and explanation, and checks that every number in a table row is a value of its CSV row.

Verdicts (per row, against the paper's delta, same sign convention: variant - reference):

- **reproduced**: the lab resolves a difference (Holm-adjusted p < 0.05, the report's "resolved")
  in the paper's direction. Sizes are not comparable when the lab's metric is not the paper's;
- **opposite**: the lab resolves a difference against the paper's direction;
- **not resolved at this scale**: the lab's difference is inside seed noise, or not resolvable at
  this number of seeds (the explanation says which, with the seeds that would resolve it).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from labcore.results import RunDir, read_run_json, runs_table, write_atomic, write_json_atomic
from labcore.viz.report import _status, finding, headline_deltas  # the report's readers: page == report

__all__ = ["MECHANISMS", "Mechanism", "write_findings", "render_markdown", "check_findings", "headline_csv",
           "plain_verdict", "explain_row", "DISPLAY_UNITS"]

SNAPSHOT = "snapshot.json"
SUBDIR = "findings"
PAGE = "findings.md"
CSV_MARK = "<!-- findings-csv: {} -->"
_CSV_MARK_RE = re.compile(r"<!-- findings-csv: (\S+) -->")
_NUMBER_RE = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")

# metric -> (unit shown, factor from the stored value): fractions become points.
DISPLAY_UNITS: dict[str, tuple[str, float]] = {
    "answer_accuracy": ("points", 100.0), "recall_qa": ("points", 100.0), "recall_bio": ("points", 100.0),
    "search_recall": ("points", 100.0), "answer_loss": ("nats", 1.0), "val_loss": ("nats", 1.0),
    "train_loss": ("nats", 1.0), "stored_kbit": ("kbit", 1.0),
}
# A row whose two arms are both past these (in display units) sits at the ceiling of its metric.
_CEILING = {"answer_accuracy": ("above", 98.0), "recall_qa": ("above", 98.0), "recall_bio": ("above", 98.0),
            "search_recall": ("above", 98.0), "answer_loss": ("below", 0.05)}
_DELTA_COLS = ("delta_mean", "ci_low", "ci_high", "resolution", "sd", "paper_delta")
CSV_COLUMNS = ["variant", "reference", "metric", "unit", "n", "delta_mean", "ci_low", "ci_high", "resolution",
               "sd", "p_holm", "paper_delta", "seeds_needed", "status", "reference_mean", "variant_mean",
               "paper_verdict", "why"]


@dataclass(frozen=True)
class Mechanism:
    """What a notebook tests: a title, the paper's claim in words (its numbers are the headline
    table's ``paper_delta`` column), the paper's sources, the docs/mechanisms.md sections and the
    paper's metric."""

    title: str
    claim: str
    sources: str
    mechanisms: str
    paper_metric: str = "validation loss (nats)"


# Matched in this order on the notebook's name (a substring), so renumbered notebooks still match.
MECHANISMS: dict[str, Mechanism] = {
    "tdqkr": Mechanism(
        "TDQKR: Tucker-decomposed query-key retrieval, and multi-core scoring",
        "Scoring PKM's grid of row and column keys with a rank-R Tucker core, instead of the sum of the "
        "two scores, lowers validation loss (U1 Table 3, rank sweep, with IVE on); a sum of several cores, "
        "each weighting its own slice of the values (multi-core scoring), lowers it slightly further "
        "(U1 Table 3, core sweep).",
        "arXiv 2411.12364 Table 3", "§1.3, §1.5"),
    "split": Mechanism(
        "Layer splitting with skip-layer links",
        "Splitting one big memory into several smaller ones spread over the depth, each joined by a "
        "skip-layer link, lowers validation loss while lowering FLOPs (U1 Table 2, row "
        "\"+split big mem & skip\").",
        "arXiv 2411.12364 Table 2", "§1.2"),
    "virtual": Mechanism(
        "IVE: implicit value expansion",
        "Reading E virtual blocks projected from the same physical values lowers validation loss for a "
        "few percent more FLOPs and no extra value reads; the gain grows with E and flattens "
        "(U1 Table 3, expansion sweep).",
        "arXiv 2411.12364 Table 3", "§1.4"),
    "architecture": Mechanism(
        "Dense, MoE, PKM and UltraMem at equal activated FLOPs",
        "At matched activated FLOPs, a memory with about 12x the dense model's parameters lowers "
        "validation loss well below the dense model's and, from the 680M scale up, matches or beats an "
        "MoE of equal parameters (U1 Table 1); the MoE decodes 2-6x slower than UltraMem because of "
        "memory access (U1 Fig. 1).",
        "arXiv 2411.12364 Table 1, Fig. 1", "§2.1, §2.2, §7.2"),
    "paper_table": Mechanism(
        "UltraMem's Table 2, walked from PKM",
        "Each change from PKM to UltraMem, added one at a time, lowers validation loss or leaves it "
        "unchanged; the paper reports single runs without error bars (U1 Table 2).",
        "arXiv 2411.12364 Table 2", "§1.8"),
    "capacity": Mechanism(
        "Capacity: knowledge stored vs memory size",
        "Memory values add parameters without adding compute, so at fixed activated FLOPs the knowledge "
        "a model stores should grow with the number of values (PKM), past what a dense model of the same "
        "compute stores (about 2 bits per parameter, Allen-Zhu & Li).",
        "arXiv 1907.05242; arXiv 2404.05405", "§4", paper_metric="knowledge stored"),
    "facts_task": Mechanism(
        "The facts task itself: how much a dense trunk stores",
        "A language model stores about 2 bits of knowledge per parameter once each fact has been seen "
        "about 1,000 times (about 1 bit per parameter at 100 exposures); past that capacity more facts "
        "add no stored bits (Allen-Zhu & Li, Physics of Language Models Part 3.3).",
        "arXiv 2404.05405", "", paper_metric="stored bits"),
    "family": Mechanism(
        "The memory family: PKM, UltraMem, UltraMemV2, Memory+, PEER and MoE",
        "Each architecture's paper reports an advantage over a dense model or an MoE at matched compute "
        "(PKM, UltraMemV2, Memory+, PEER); the run's paper-claims table quotes each claim.",
        "arXiv 1907.05242; arXiv 2508.18756; arXiv 2412.09764; arXiv 2407.04153; arXiv 2101.03961",
        "§3, §4, §5, §6, §7.1", paper_metric="each paper's own metric"),
}


def mechanism_for(notebook: str) -> Mechanism | None:
    name = notebook.lower()
    return next((m for key, m in MECHANISMS.items() if key in name), None)


# ----------------------------------------------------------------------------------------------
# Numbers: rounding and formatting
# ----------------------------------------------------------------------------------------------

def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def sig3(v: Any) -> float:
    """``v`` rounded to 3 significant digits (NaN stays NaN)."""
    v = _f(v)
    return v if not math.isfinite(v) or v == 0 else float(f"{v:.3g}")


def fmt(v: Any, sign: bool = False) -> str:
    """A rounded number as the page shows it: positional, at most 3 significant digits, trailing
    zeros dropped; an en dash when missing."""
    v = _f(v)
    if math.isnan(v):
        return "\u2013"
    if math.isinf(v):
        return ("-" if v < 0 else "+" if sign else "") + "\u221e"
    return np.format_float_positional(v, precision=3, unique=False, fractional=False, trim="-", sign=sign)


def _fmt_int(v: Any) -> str:
    v = _f(v)
    return "\u2013" if not math.isfinite(v) else str(int(v))


# ----------------------------------------------------------------------------------------------
# One headline table -> the CSV (display units, rounded, with verdicts)
# ----------------------------------------------------------------------------------------------

def plain_verdict(row: dict) -> str:
    """reproduced | opposite | not resolved at this scale, against ``paper_delta``; rows without a
    paper number say so; a paper delta of 0 (no change) is "consistent" or "differs"."""
    status, delta, paper = str(row.get("status")), _f(row.get("delta_mean")), _f(row.get("paper_delta"))
    resolved = status == "resolved"
    if math.isnan(paper):
        return "no paper number; " + ("resolved" if resolved else "not resolved at this scale")
    if paper == 0:
        return "differs (paper: no change)" if resolved else "consistent (paper: no change)"
    if not resolved:
        return "not resolved at this scale"
    return "reproduced" if np.sign(delta) == np.sign(paper) else "opposite"


def _at_ceiling(row: dict) -> bool:
    rule = _CEILING.get(str(row.get("metric")))
    a, b = _f(row.get("reference_mean")), _f(row.get("variant_mean"))
    if rule is None or not (math.isfinite(a) and math.isfinite(b)):
        return False
    side, bound = rule
    return (a >= bound and b >= bound) if side == "above" else (a <= bound and b <= bound)


def _task_differs(metric: str, paper_metric: str) -> str:
    if metric.startswith("answer_"):
        return "task differs: answer tokens of the synthetic facts task, not LM loss"
    if metric != "val_loss" or not paper_metric.startswith("validation loss"):
        return f"metric differs: the lab's {metric.replace('_', ' ')}, the paper's {paper_metric}"
    return "same metric at a far smaller scale (model, data, steps)"


def explain_row(row: dict, paper_metric: str = "validation loss (nats)") -> str:
    """What explains the difference between the lab's row and the paper's, from the row's own
    numbers (every number in the text is one of the row's values): a ceiling, a resolution coarser
    than the paper's delta (with the seeds that would resolve it), a task that differs from LM loss."""
    n, res = _f(row.get("n")), _f(row.get("resolution"))
    paper, need = _f(row.get("paper_delta")), _f(row.get("seeds_needed"))
    verdict = str(row.get("paper_verdict") or plain_verdict(row))
    metric = str(row.get("metric"))
    out = []
    if _at_ceiling(row):
        out.append(f"both arms at the ceiling ({fmt(row.get('reference_mean'))}, {fmt(row.get('variant_mean'))} "
                   f"{row.get('unit') or ''})".replace(" )", ")"))
    if math.isfinite(n) and n < 2:
        out.append(f"{_fmt_int(n)} seed: no estimate of the seed noise")
    elif verdict == "not resolved at this scale" and math.isfinite(res) and math.isfinite(paper):
        if res > abs(paper):
            seeds = (f"about {_fmt_int(need)} seeds would resolve it" if math.isfinite(need)
                     else "no practical number of seeds would resolve it")
            out.append(f"resolution {fmt(res)} > |paper \u0394| {fmt(abs(paper))}: {seeds}")
        else:
            out.append(f"resolution {fmt(res)} \u2264 |paper \u0394| {fmt(abs(paper))}: an effect of the paper's "
                       "size would have shown, none did at this scale")
    elif verdict.startswith("no paper number") and "not resolved" in verdict and math.isfinite(res):
        out.append(f"smaller than the resolution {fmt(res)} at {_fmt_int(n)} seeds")
    if verdict in ("reproduced", "opposite") and math.isfinite(paper):
        out.append(_task_differs(metric, paper_metric) if verdict == "opposite" or metric != "val_loss"
                   else "same direction as the paper")
    return "; ".join(out) if out else "\u2013"


def _means(rd: RunDir, tables: dict[str, pd.DataFrame], metric: str) -> dict[str, float]:
    """Per variant, the mean of ``metric`` in the run: from a key table with ``variant`` and
    ``<metric>_mean``, else from summary.parquet (one row per variant and seed); {} if neither."""
    col = f"{metric}_mean"
    for t in tables.values():
        if {"variant", col} <= set(t.columns):
            return {str(k): _f(v) for k, v in zip(t["variant"], t[col])}
    s = rd.summary()
    if {"variant", metric} <= set(s.columns):
        return {str(k): _f(v) for k, v in s.groupby("variant", sort=False)[metric].mean().items()}
    return {}


def headline_csv(deltas: pd.DataFrame, means: dict[str, float] | None = None,
                 paper_metric: str = "validation loss (nats)") -> pd.DataFrame:
    """A paired-deltas table as the findings CSV (:data:`CSV_COLUMNS`): deltas, intervals,
    resolution, sd and the paper's delta in display units (``unit``), 3 significant digits; the
    lab's status (resolved / inside seed noise / not resolvable at this n, as the report reads it);
    the two arms' means when known; then the plain verdict and the explanation, computed from the
    rounded row."""
    means = means or {}
    rows = []
    for r in deltas.to_dict("records"):
        metric = str(r.get("metric", ""))
        unit, k = DISPLAY_UNITS.get(metric, ("", 1.0))
        out: dict[str, Any] = {"variant": str(r["variant"]), "reference": str(r["reference"]), "metric": metric,
                               "unit": unit, "n": _f(r.get("n"))}
        lo, hi = _f(r.get("ci_low")), _f(r.get("ci_high"))
        if not (math.isfinite(lo) and math.isfinite(hi)):  # older tables: the half-width only
            m, h = _f(r.get("delta_mean")), _f(r.get("delta_ci95"))
            r = {**r, "ci_low": m - h, "ci_high": m + h}
        for c in _DELTA_COLS:
            out[c] = sig3(_f(r.get(c)) * k)
        out["p_holm"] = _f(f"{_f(r.get('p_holm')):.2g}")
        out["seeds_needed"] = _f(r.get("seeds_needed"))
        out["status"] = _status(r)
        out["reference_mean"] = sig3(means.get(out["reference"], float("nan")) * k)
        out["variant_mean"] = sig3(means.get(out["variant"], float("nan")) * k)
        out["paper_verdict"] = plain_verdict(out)
        out["why"] = explain_row(out, paper_metric)
        rows.append(out)
    df = pd.DataFrame(rows, columns=CSV_COLUMNS)
    for c in ("n", "seeds_needed"):
        df[c] = df[c].round().astype("Int64")
    return df


def read_headline_csv(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"variant": str, "reference": str, "metric": str, "unit": str,
                                    "status": str, "paper_verdict": str, "why": str},
                       keep_default_na=False, na_values=[""])


# ----------------------------------------------------------------------------------------------
# Rendering (a pure function of snapshot.json and the CSVs)
# ----------------------------------------------------------------------------------------------

def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


TABLE_HEAD = ["change", "lab: reference \u2192 variant", "lab \u0394", "95% CI", "resolution", "seeds", "paper \u0394",
              "verdict", "what explains the difference"]


def render_row(r: dict) -> str:
    """One table row from one CSV row."""
    means = (f"{fmt(r.get('reference_mean'))} \u2192 {fmt(r.get('variant_mean'))}"
             if math.isfinite(_f(r.get("reference_mean"))) or math.isfinite(_f(r.get("variant_mean"))) else "\u2013")
    cells = [f"{r['variant']} vs {r['reference']}", means, fmt(r.get("delta_mean"), sign=True),
             f"[{fmt(r.get('ci_low'), sign=True)}, {fmt(r.get('ci_high'), sign=True)}]", fmt(r.get("resolution")),
             _fmt_int(r.get("n")), fmt(r.get("paper_delta"), sign=True), str(r.get("paper_verdict")),
             str(r.get("why") if isinstance(r.get("why"), str) else "\u2013")]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _section_why(rows: list[dict], paper_metric: str) -> str:
    """The section's "what explains the difference" line, from its rows."""
    paper = [r for r in rows if math.isfinite(_f(r.get("paper_delta")))]
    parts = []
    coarse = [r for r in paper if math.isfinite(_f(r.get("resolution")))
              and _f(r["resolution"]) > abs(_f(r["paper_delta"]))]
    if coarse:
        parts.append(f"the design's resolution is coarser than the paper's delta in {len(coarse)} of "
                     f"{len(paper)} rows, so those rows cannot confirm or refute the paper")
    ceiling = [r for r in rows if _at_ceiling(r)]
    if ceiling:
        parts.append(f"{len(ceiling)} of {len(rows)} rows have both arms at the ceiling of the metric")
    against = [r for r in rows if r.get("paper_verdict") == "opposite"]
    if against:
        parts.append(f"{len(against)} row(s) resolve a difference against the paper's direction")
    if paper:
        metric = str(rows[0].get("metric"))
        if metric.startswith("answer_"):
            parts.append(f"the lab measures {metric.replace('_', ' ')} on the answer tokens of a synthetic facts "
                         f"task, where a small trunk cannot hold every fact; the paper measures {paper_metric} "
                         "of a language model, so only directions compare, not sizes")
        elif metric != "val_loss" or not paper_metric.startswith("validation loss"):
            parts.append(f"the lab measures {metric.replace('_', ' ')}, the paper {paper_metric}: only directions "
                         "compare, not sizes")
        else:
            parts.append("the lab's models, data and training runs are far smaller than the paper's")
    elif rows:
        k = sum(1 for r in rows if r.get("status") == "resolved")
        parts.append(f"no paper number to compare with; {k} of {len(rows)} differences are resolved at this "
                     "number of seeds")
    if not parts:
        return ""
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


def _finding_text(df: pd.DataFrame) -> str:
    """:func:`labcore.viz.report.finding` read off the CSV (units in the metric's name; the status
    as its verdict, so the report's rule of what is resolved applies)."""
    t = df.copy()
    t["metric"] = [f"{m} ({u})" if isinstance(u, str) and u else m for m, u in zip(t["metric"], t["unit"])]
    t["verdict"] = t["status"]
    return finding(t)


def _duration(s: Any) -> str:
    s = _f(s)
    if not math.isfinite(s):
        return "unknown"
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    txt = f"{h} h {m:02d} min" if h else (f"{m} min {sec:02d} s" if m else f"{sec} s")
    return f"{txt} ({int(round(s))} s)"


def render_markdown(out_dir: str | Path) -> str:
    """findings.md from ``<out_dir>/findings/snapshot.json`` and the CSVs it names."""
    out_dir = Path(out_dir)
    snap = json.loads((out_dir / SUBDIR / SNAPSHOT).read_text())
    sw = snap["sweep"]
    commits = ", ".join(f"`{g['commit'][:12]}`" + (" (with uncommitted changes)" if g.get("dirty") else "")
                        for g in snap["git"]) or "not recorded"
    c = snap["counts"]
    lines = [
        "# What the lab found",
        "",
        "The paper's claims next to the lab's measurements, per mechanism, from one finished sweep. This "
        "page is generated (`labcore findings SWEEP_DIR --out docs`); each table row is rendered from one row "
        "of the CSV linked below the table, and `tests/viz/test_findings.py` checks that they match.",
        "",
        f"- sweep: `{sw['file']}` (`{sw['name']}`){': ' + sw['description'] if sw.get('description') else ''}",
        f"- code: commit {commits}",
        f"- machine: {snap['machine']}" + (f"; executor: {sw['executor']}" if sw.get("executor") else ""),
        f"- wall time of the sweep: {_duration(snap['wall_time_s'])}, from the first run's start to the last "
        f"run's end; {_duration(snap['run_time_s'])} of run time summed over runs",
        f"- date: {snap['date']} (UTC, when the last run finished)",
        f"- runs: {c['done']} done, {c['failed']} failed, {c['not_finished']} not finished",
        "",
        "How to read a row: **lab \u0394** is variant minus reference, paired by seed, with its 95% interval; "
        "**resolution** is the smallest difference the design detects with 80% power at its seed noise; "
        "**paper \u0394** is the paper's number in the same convention. **Verdict**: *reproduced* (the lab "
        "resolves a difference in the paper's direction), *opposite* (resolved, against it) or *not "
        "resolved at this scale*. Resolved means Holm-adjusted p < 0.05 over the rows of a table. "
        "Accuracies are in points (percent), losses in nats (natural log), stored knowledge in kbit.",
        "",
    ]
    if snap.get("failed"):
        lines += ["Failed runs: " + "; ".join(f"{f['notebook']} (`{f['run_id']}`): {f['error']}"
                                               for f in snap["failed"]), ""]
    if snap.get("without_headline"):
        lines += ["Runs without a headline comparison (not findings): "
                  + ", ".join(f"{nb}" for nb in snap["without_headline"]) + ".", ""]
    for sec in snap["sections"]:
        lines += [f"## {sec['title']}", "", f"Notebook `{sec['notebook']}`, run `{sec['run_id']}`.", ""]
        df = read_headline_csv(out_dir / sec["csv"]) if sec.get("csv") else None
        has_paper = df is not None and bool(df["paper_delta"].notna().any())
        numbers = (f" The table's *paper \u0394* column holds its numbers, in {sec['paper_metric']}." if has_paper
                   else " The paper gives no number for the comparisons below." if df is not None else "")
        if sec.get("claim"):
            ref = f"; [docs/mechanisms.md](mechanisms.md) {sec['mechanisms']}" if sec.get("mechanisms") else ""
            lines += [f"**The paper** ({sec['sources']}{ref}): {sec['claim']}{numbers}", ""]
        else:
            lines += ["**The paper**: no claim is recorded for this notebook (labcore.viz.findings.MECHANISMS)."
                      + numbers, ""]
        if df is not None:
            rows = df.to_dict("records")
            lines += [f"**The lab**: {_finding_text(df)}", ""]
            why = _section_why(rows, sec.get("paper_metric") or "validation loss (nats)")
            if why:
                lines += [f"**What explains the difference**: {why}", ""]
            lines += [CSV_MARK.format(sec["csv"]),
                      "| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" * len(TABLE_HEAD)]
            lines += [render_row(r) for r in rows]
            lines.append("")
        else:
            lines += [f"**The lab**: {sec.get('note') or 'no paired comparison in this run.'}", ""]
        links = []
        if sec.get("png"):
            lines += [f"![{sec['figure']}]({sec['png']})", ""]
            links.append(f"headline figure: [{Path(sec['png']).name}]({sec['png']})")
        if sec.get("csv"):
            links.append(f"table: [{Path(sec['csv']).name}]({sec['csv']})")
        if links:
            lines += ["; ".join(links)[0].upper() + "; ".join(links)[1:] + ".", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------------------------
# Building the snapshot from a sweep directory
# ----------------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _machine(runs: pd.DataFrame) -> str:
    """The machine the runs report (device, threads, host); the CPU model and core count come from
    this platform when the runs were made on this host."""
    devices, hosts, threads = [], set(), set()
    for p in runs["path"]:
        rj = read_run_json(p) or {}
        dev = rj.get("device") or {}
        d = dev.get("device")
        if d == "cuda" and dev.get("gpu_name"):
            d = f"cuda ({dev['gpu_name']})"
        if d and not str(d).startswith("unknown") and d not in devices:
            devices.append(d)
        if rj.get("host"):
            hosts.add(rj["host"])
        if dev.get("torch_threads") is not None:
            threads.add(int(dev["torch_threads"]))
    parts = []
    if hosts == {socket.gethostname()}:
        parts.append(f"{_cpu_model()}, {os.cpu_count()} cores ({platform.system()} {platform.machine()})")
    elif hosts:
        parts.append("host " + ", ".join(sorted(hosts)) + " (CPU model not recorded)")
    if devices:
        parts.append("device " + ", ".join(devices))
    if threads:
        parts.append("torch threads per run " + "/".join(map(str, sorted(threads))))
    return "; ".join(parts) or "not recorded"


def _sweep_file(meta: dict, sweep_dir: Path) -> str:
    src = meta.get("source")
    if not src:
        return f"{sweep_dir.name} (sweep file not recorded)"
    p = Path(src)
    return "/".join(p.parts[p.parts.index("sweeps"):]) if "sweeps" in p.parts[:-1] else p.name


def _headline_png(rd: RunDir) -> tuple[str, Path] | None:
    """The run's headline figure as the report picks it (a figure named like "delta", else the
    first), among the figures that have a PNG."""
    pngs = sorted(rd.figures_dir.glob("*.png")) if rd.figures_dir.is_dir() else []
    if not pngs:
        return None
    p = next((f for f in pngs if "delta" in f.stem), pngs[0])
    return p.stem, p


def _nb_name(nb: Any) -> str:
    return str(nb).removesuffix(".ipynb")


def write_findings(sweep_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``<out_dir>/findings.md`` with its CSVs, PNGs and snapshot.json for one finished sweep
    directory (see the module docstring); returns the page's path. Earlier ``*_headline.*`` files
    and the snapshot in ``<out_dir>/findings/`` are replaced; the page is written last."""
    sweep_dir, out_dir = Path(sweep_dir).resolve(), Path(out_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; must be a directory (e.g. docs)")
    meta = json.loads((sweep_dir / "sweep.json").read_text()) if (sweep_dir / "sweep.json").exists() else {}
    planned = meta.get("runs")
    runs = runs_table(sweep_dir, run_ids=[r["run_id"] for r in planned] if planned is not None else None)
    if runs.empty or not (runs["status"] == "done").any():
        raise ValueError(f"sweep directory {sweep_dir} has no finished run (run.json status done)")
    runs = runs.assign(nb=runs["notebook"].map(_nb_name)).sort_values(["nb", "run_id"])

    done = runs[runs["status"] == "done"]
    per_nb = done["nb"].value_counts()
    files: dict[str, bytes] = {}
    sections, without = [], []
    for _, r in done.iterrows():
        rd = RunDir(r["path"])
        tables = rd.key_tables()
        deltas = headline_deltas(tables)
        mech = mechanism_for(r["nb"])
        if deltas is None and (mech is None or not tables):
            without.append(r["nb"])
            continue
        stem = r["nb"] if per_nb[r["nb"]] == 1 else r["run_id"]
        sec: dict[str, Any] = {"notebook": r["nb"], "run_id": r["run_id"],
                               "title": mech.title if mech else r["nb"], "claim": mech.claim if mech else None,
                               "sources": mech.sources if mech else None,
                               "mechanisms": mech.mechanisms if mech else None,
                               "paper_metric": mech.paper_metric if mech else "validation loss (nats)",
                               "csv": None, "png": None, "figure": None, "note": None}
        if deltas is not None:
            metric = str(deltas["metric"].iloc[0]) if "metric" in deltas.columns else ""
            csv = headline_csv(deltas, _means(rd, tables, metric), sec["paper_metric"])
            sec["csv"] = f"{SUBDIR}/{stem}_headline.csv"
            files[sec["csv"]] = csv.to_csv(index=False).encode()
        else:
            sec["note"] = ("this run has no paired comparison table; its key tables ("
                           + ", ".join(tables) + ") are in the sweep's report.")
        fig = _headline_png(rd)
        if fig is not None:
            sec["figure"], sec["png"] = fig[0], f"{SUBDIR}/{stem}_headline.png"
            files[sec["png"]] = fig[1].read_bytes()
        sections.append(sec)

    t0 = pd.to_numeric(runs["started_unix"], errors="coerce").min()
    t1 = pd.to_numeric(runs["finished_unix"], errors="coerce").max()
    commits: list[dict] = []
    for p in done["path"]:
        g = (read_run_json(p) or {}).get("git")
        if g and g.get("commit") and g not in commits:
            commits.append({"commit": g["commit"], "dirty": bool(g.get("dirty"))})
    failed = runs[runs["status"] == "failed"]
    n_missing = len({x["run_id"] for x in planned} - set(runs["run_id"])) if planned is not None else 0
    snap = {
        "schema": 1,
        "sweep": {"name": meta.get("name", sweep_dir.name), "file": _sweep_file(meta, sweep_dir),
                  "description": meta.get("description"), "executor": meta.get("executor")},
        "git": commits,
        "machine": _machine(runs),
        "wall_time_s": float(t1 - t0) if pd.notna(t0) and pd.notna(t1) else None,
        "run_time_s": float(pd.to_numeric(done["duration_s"], errors="coerce").sum()),
        "date": (_dt.datetime.fromtimestamp(float(t1), _dt.UTC).strftime("%Y-%m-%d") if pd.notna(t1) else "unknown"),
        "counts": {"done": len(done), "failed": len(failed),
                   "not_finished": len(runs) - len(done) - len(failed) + n_missing},
        "failed": [{"notebook": f["nb"], "run_id": f["run_id"],
                    "error": f"{f.get('error_name') or 'error'}: {str(f.get('error_message') or '')[:200]}"}
                   for _, f in failed.iterrows()],
        "without_headline": sorted(set(without)),
        "sections": sections,
    }

    sub = out_dir / SUBDIR
    sub.mkdir(parents=True, exist_ok=True)
    for old in [*sub.glob("*_headline.csv"), *sub.glob("*_headline.png")]:
        if f"{SUBDIR}/{old.name}" not in files:
            old.unlink()
    for rel, data in files.items():
        write_atomic(out_dir / rel, data)
    write_json_atomic(sub / SNAPSHOT, snap)
    page = out_dir / PAGE
    write_atomic(page, render_markdown(out_dir))
    return page


def rerender(out_dir: str | Path) -> Path:
    """Rewrite ``<out_dir>/findings.md`` from its committed snapshot.json and CSVs (after a change
    of wording in this module; the numbers cannot change)."""
    page = Path(out_dir) / PAGE
    write_atomic(page, render_markdown(out_dir))
    return page


# ----------------------------------------------------------------------------------------------
# The check: the page matches its CSVs
# ----------------------------------------------------------------------------------------------

def _row_numbers(r: dict) -> list[float]:
    vals = []
    for c in CSV_COLUMNS:
        if c in ("variant", "reference", "metric", "unit", "status", "paper_verdict", "why"):
            continue
        v = _f(r.get(c))
        if math.isfinite(v):
            vals += [v, abs(v)]
    return vals


def _split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [c.strip().replace("\\|", "|") for c in cells]


def check_findings(out_dir: str | Path) -> list[str]:
    """Problems of ``<out_dir>/findings.md`` against its CSVs ([] when it matches):

    - every table in the page is introduced by a CSV marker, has one row per CSV row, in order;
    - each row's change is ``variant vs reference``, its verdict and explanation are the CSV's, and
      every number in its other cells is a value of that CSV row;
    - each CSV row's verdict and explanation follow from its numbers;
    - the page is exactly what :func:`render_markdown` makes of snapshot.json and the CSVs."""
    out_dir = Path(out_dir)
    page = out_dir / PAGE
    if not page.exists():
        return [f"{page} does not exist"]
    text = page.read_text()
    lines = text.splitlines()
    problems: list[str] = []
    snap = json.loads((out_dir / SUBDIR / SNAPSHOT).read_text())
    paper_metric = {s["csv"]: s.get("paper_metric") or "validation loss (nats)" for s in snap["sections"] if s["csv"]}
    marked = 0
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not (lines[i - 1].startswith("|") or _CSV_MARK_RE.match(lines[i - 1]))):
            problems.append(f"line {i + 1}: a table without a findings-csv marker")
        m = _CSV_MARK_RE.match(line)
        if not m:
            continue
        marked += 1
        rel = m.group(1)
        if not (out_dir / rel).exists():
            problems.append(f"line {i + 1}: {rel} does not exist")
            continue
        df = read_headline_csv(out_dir / rel)
        head = _split_row(lines[i + 1])
        body = []
        j = i + 3
        while j < len(lines) and lines[j].startswith("|"):
            body.append((j + 1, _split_row(lines[j])))
            j += 1
        if head != TABLE_HEAD:
            problems.append(f"{rel}: table header {head} is not {TABLE_HEAD}")
            continue
        if len(body) != len(df):
            problems.append(f"{rel}: the page has {len(body)} rows, the CSV {len(df)}")
        for (ln, cells), r in zip(body, df.to_dict("records")):
            cell = dict(zip(head, cells))
            where = f"line {ln} ({rel}, {r['variant']} vs {r['reference']})"
            if cell["change"] != f"{r['variant']} vs {r['reference']}":
                problems.append(f"{where}: change {cell['change']!r}")
            for key, col in (("verdict", "paper_verdict"), ("what explains the difference", "why")):
                if cell[key] != str(r[col]):
                    problems.append(f"{where}: {key} {cell[key]!r} is not the CSV's {r[col]!r}")
            if r["paper_verdict"] != plain_verdict(r):
                problems.append(f"{where}: CSV verdict {r['paper_verdict']!r} does not follow from its numbers "
                                f"({plain_verdict(r)!r})")
            if r["why"] != explain_row(r, paper_metric.get(rel, "validation loss (nats)")):
                problems.append(f"{where}: CSV explanation does not follow from its numbers")
            allowed = _row_numbers(r)
            for key in head[1:]:
                for tok in _NUMBER_RE.findall(cell[key]):
                    v = float(tok)
                    if not any(math.isclose(v, a, rel_tol=1e-9, abs_tol=1e-12) for a in allowed):
                        problems.append(f"{where}: {key} shows {tok}, which is no value of the CSV row")
    if marked != sum(1 for s in snap["sections"] if s["csv"]):
        problems.append(f"the page has {marked} CSV tables, snapshot.json names "
                        f"{sum(1 for s in snap['sections'] if s['csv'])}")
    for s in snap["sections"]:
        for key in ("csv", "png"):
            if s.get(key) and not (out_dir / s[key]).exists():
                problems.append(f"{s[key]} (section {s['notebook']}) does not exist")
    if not problems:
        expected = render_markdown(out_dir)
        if expected != text:
            diff = next((k for k, (a, b) in enumerate(zip(expected.splitlines(), lines)) if a != b),
                        min(len(lines), len(expected.splitlines())))
            problems.append(f"line {diff + 1}: the page is not what snapshot.json and the CSVs render to "
                            "(regenerate: labcore findings SWEEP_DIR --out DIR, or --rerender after a "
                            "wording change)")
    return problems


def findings_size(out_dir: str | Path) -> int:
    """Bytes of the page and its findings/ folder."""
    out_dir = Path(out_dir)
    files = [out_dir / PAGE, *(out_dir / SUBDIR).glob("*")]
    return sum(f.stat().st_size for f in files if f.is_file())

