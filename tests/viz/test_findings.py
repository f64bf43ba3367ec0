"""labcore.viz.findings: the published findings page, built from a synthetic sweep written with the
writers labcore uses (RunDir, paired_deltas, summarize), and the committed page checked against its CSVs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from labcore.cli import main
from labcore.experiments.core import paired_deltas, summarize
from labcore.results import RunDir, write_json_atomic
from labcore.viz.findings import (
    CSV_COLUMNS,
    check_findings,
    explain_row,
    findings_size,
    plain_verdict,
    read_headline_csv,
    render_markdown,
    write_findings,
)

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32  # only copied, never decoded
T0 = 1_800_000_000.0  # run start times (unix seconds) the tests set in run.json
SEEDS = list(range(6))


def _facts_runs() -> pd.DataFrame:
    """One row per (variant, seed): "better" is 10 points above "base" in every seed, "worse" 8 below,
    "noise" the same up to seed noise."""
    rng = np.random.default_rng(0)
    base = 0.5 + 0.05 * rng.standard_normal(len(SEEDS))
    arms = {"base": base, "better": base + 0.10 + 0.005 * rng.standard_normal(len(SEEDS)),
            "worse": base - 0.08 + 0.005 * rng.standard_normal(len(SEEDS)),
            "noise": base + 0.02 * rng.standard_normal(len(SEEDS))}
    return pd.DataFrame([{"variant": v, "seed": s, "answer_accuracy": float(a[i])}
                         for v, a in arms.items() for i, s in enumerate(SEEDS)])


def _chain_runs() -> pd.DataFrame:
    """A Table-2-like chain on val_loss whose steps are far inside seed noise."""
    rng = np.random.default_rng(1)
    return pd.DataFrame([{"variant": v, "seed": s, "val_loss": 2.5 + 0.3 * rng.standard_normal()}
                         for v in ("PKM", "+A", "+B") for s in SEEDS[:3]])


def _write_run(sweep: Path, run_id: str, notebook: str, tables: dict[str, pd.DataFrame], *, start: float,
               seconds: float, figures: tuple[str, ...] = ("curve", "deltas")) -> RunDir:
    rd = RunDir(sweep / run_id).start({"n_seeds": len(SEEDS)}, notebook=notebook, seed=0)
    for name, t in tables.items():
        rd.write_key_table(name, t)
    rd.figures_dir.mkdir(parents=True, exist_ok=True)
    for f in figures:
        (rd.figures_dir / f"{f}.png").write_bytes(PNG + f.encode())
    rd.finish()
    rj = json.loads(rd.run_json.read_text())
    rj["timings"] = {"started": "x", "started_unix": start, "finished": "y", "finished_unix": start + seconds,
                     "duration_s": seconds}
    rj["git"] = {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False}
    write_json_atomic(rd.run_json, rj)
    return rd


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    sw = tmp_path / "runs" / "standard"
    facts = _facts_runs()
    d = paired_deltas(facts, "answer_accuracy", baseline="base", higher_is_better=True,
                      paper={"better": 0.05, "worse": 0.02, "noise": 0.001})
    _write_run(sw, "01_tdqkr-aaa", "01_tdqkr", {"1_deltas_vs_base": d,
                                                "2_means": summarize(facts, ["answer_accuracy"])},
               start=T0, seconds=600.0)
    chain = _chain_runs()
    c = paired_deltas(chain, "val_loss", chain=True, order=["PKM", "+A", "+B"], paper={"+A": -0.01, "+B": -0.02})
    _write_run(sw, "05_paper_table-bbb", "05_paper_table", {"1_deltas_vs_previous_row": c}, start=T0 + 100,
               seconds=5900.0, figures=("train_loss",))
    _write_run(sw, "00_tour-ccc", "00_tour", {}, start=T0 + 10, seconds=50.0)
    bad = RunDir(sw / "02_layer_splitting-ddd").start({}, notebook="02_layer_splitting", seed=0)
    bad.fail({"ename": "ValueError", "evalue": "boom"})
    rj = json.loads(bad.run_json.read_text())
    rj["timings"] = {"started_unix": T0 + 200, "finished_unix": T0 + 230, "duration_s": 30.0}
    write_json_atomic(bad.run_json, rj)
    write_json_atomic(sw / "sweep.json", {"name": "standard", "source": "/somewhere/lab/sweeps/standard.yaml",
                                          "description": "test sweep", "executor": "local process pool: 2 jobs",
                                          "runs": [{"run_id": r, "notebook": r.split("-")[0], "params": {},
                                                    "seed": 0}
                                                   for r in ("01_tdqkr-aaa", "05_paper_table-bbb", "00_tour-ccc",
                                                             "02_layer_splitting-ddd", "03_virtual_memory-eee")]})
    return sw


def _row(csv: pd.DataFrame, variant: str) -> dict:
    return csv[csv["variant"] == variant].iloc[0].to_dict()


def test_findings_page_csvs_and_figures(sweep: Path, tmp_path: Path):
    out = tmp_path / "docs"
    page = write_findings(sweep, out)
    md = page.read_text()

    # provenance: commit, sweep file, wall time from run.json timestamps, date, counts
    assert "commit `0123456789ab`" in md
    assert "`sweeps/standard.yaml`" in md
    assert "wall time of the sweep: 1 h 40 min (6000 s)" in md          # T0 .. T0 + 100 + 5900
    assert "6550 s) of run time summed over runs" in md                  # 600 + 5900 + 50
    assert "date: 2027-01-15" in md
    assert "runs: 3 done, 1 failed, 1 not finished" in md
    assert "02_layer_splitting (`02_layer_splitting-ddd`): ValueError: boom" in md
    assert "Runs without a headline comparison (not findings): 00_tour." in md

    # the facts CSV: points, 3 significant digits, verdicts from the numbers
    csv = read_headline_csv(out / "findings" / "01_tdqkr_headline.csv")
    assert list(csv.columns) == CSV_COLUMNS
    facts = _facts_runs().pivot(index="seed", columns="variant", values="answer_accuracy")
    for v in ("better", "worse", "noise"):
        r = _row(csv, v)
        diff = 100 * (facts[v] - facts["base"])
        assert r["delta_mean"] == float(f"{diff.mean():.3g}")                       # points, 3 s.f.
        assert r["unit"] == "points" and r["n"] == len(SEEDS)
        assert r["reference_mean"] == float(f"{100 * facts['base'].mean():.3g}")
        assert r["variant_mean"] == float(f"{100 * facts[v].mean():.3g}")
    assert _row(csv, "better")["paper_delta"] == 5.0
    assert [_row(csv, v)["paper_verdict"] for v in ("better", "worse", "noise")] == [
        "reproduced", "opposite", "not resolved at this scale"]
    assert "task differs" in _row(csv, "worse")["why"]
    assert _row(csv, "noise")["why"].startswith("resolution ")

    # every table row of the page is rendered from one CSV row
    r = _row(csv, "better")
    line = next(x for x in md.splitlines() if x.startswith("| better vs base |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == f"+{r['delta_mean']:g}" and cells[6] == "+5" and cells[7] == "reproduced"
    assert "<!-- findings-csv: findings/01_tdqkr_headline.csv -->" in md
    assert "[docs/mechanisms.md](mechanisms.md) §1.3, §1.5" in md and "arXiv 2411.12364" in md

    # the chained val_loss table: inside seed noise, the paper's deltas below the resolution
    chain = read_headline_csv(out / "findings" / "05_paper_table_headline.csv")
    assert list(chain["variant"]) == ["+A", "+B"] and list(chain["reference"]) == ["PKM", "+A"]
    assert set(chain["paper_verdict"]) == {"not resolved at this scale"}
    assert all("seeds would resolve it" in w for w in chain["why"])
    assert "coarser than the paper's delta in 2 of 2 rows" in md

    # figures: the headline (a deltas figure when there is one, else the first) copied, linked
    findings = out / "findings"
    assert (findings / "01_tdqkr_headline.png").read_bytes() == PNG + b"deltas"
    assert (findings / "05_paper_table_headline.png").read_bytes() == PNG + b"train_loss"
    assert "![deltas](findings/01_tdqkr_headline.png)" in md
    assert "[01_tdqkr_headline.csv](findings/01_tdqkr_headline.csv)" in md
    assert not list(findings.glob("00_tour*"))
    assert findings_size(out) < 200_000

    assert check_findings(out) == []
    assert render_markdown(out) == md                                     # a pure function of the files


def test_check_finds_a_changed_number_verdict_or_row(sweep: Path, tmp_path: Path):
    out = tmp_path / "docs"
    page = write_findings(sweep, out)
    md = page.read_text()
    csv_path = out / "findings" / "01_tdqkr_headline.csv"
    csv_text = csv_path.read_text()
    r = _row(read_headline_csv(csv_path), "better")
    shown = f"+{r['delta_mean']:g}"

    # a number on the page that is not its CSV's
    line = next(x for x in md.splitlines() if x.startswith("| better vs base |"))
    page.write_text(md.replace(line, line.replace(f"| {shown} |", "| +99.9 |")))
    problems = check_findings(out)
    assert any("lab Δ shows +99.9, which is no value of the CSV row" in p for p in problems), problems

    # a CSV number changed: the page no longer matches it
    page.write_text(md)
    csv_path.write_text(csv_text.replace(str(r["delta_mean"]), "12.3", 1))
    assert any("which is no value of the CSV row" in p for p in check_findings(out))

    # a verdict that does not follow from the CSV's numbers
    csv_path.write_text(csv_text.replace("reproduced", "opposite", 1))
    assert any("does not follow from its numbers" in p for p in check_findings(out))

    # a row dropped from the page
    csv_path.write_text(csv_text)
    page.write_text(md.replace(line + "\n", ""))
    assert any("the page has 2 rows, the CSV 3" in p for p in check_findings(out))

    # prose edited outside the tables: the page is not what its files render to
    page.write_text(md.replace("**The lab**:", "**The lab (edited)**:", 1))
    assert any("not what snapshot.json and the CSVs render to" in p for p in check_findings(out))

    page.write_text(md)
    assert check_findings(out) == []


def test_rebuild_replaces_stale_files_and_needs_a_finished_run(sweep: Path, tmp_path: Path):
    out = tmp_path / "docs"
    (out / "findings").mkdir(parents=True)
    (out / "findings" / "99_old_headline.csv").write_text("stale")
    (out / "findings" / "keep.txt").write_text("not ours")
    write_findings(sweep, out)
    assert not (out / "findings" / "99_old_headline.csv").exists()
    assert (out / "findings" / "keep.txt").exists()

    empty = tmp_path / "runs" / "empty"
    RunDir(empty / "x-1").start({}, notebook="x", seed=0)              # running, never done
    with pytest.raises(ValueError, match="no finished run"):
        write_findings(empty, tmp_path / "docs2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_findings(tmp_path / "nowhere", tmp_path / "docs2")


def test_cli_findings_write_check_rerender(sweep: Path, tmp_path: Path, capsys):
    out = tmp_path / "docs"
    assert main(["findings", str(sweep), "--out", str(out)]) == 0
    assert "findings.md" in capsys.readouterr().out
    assert main(["findings", "--check", "--out", str(out)]) == 0
    page = out / "findings.md"
    md = page.read_text()
    page.write_text(md.replace("## ", "## x", 1))
    assert main(["findings", "--check", "--out", str(out)]) == 1
    assert main(["findings", "--rerender", "--out", str(out)]) == 0
    assert page.read_text() == md
    assert main(["findings", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert main(["findings", "--out", str(out)]) == 2                      # no sweep dir
    assert main(["findings", "--check", "--out", str(tmp_path / "none")]) == 2


def _r(**kw) -> dict:
    base = {"variant": "B", "reference": "A", "metric": "answer_accuracy", "unit": "points", "n": 4,
            "delta_mean": 1.0, "ci_low": 0.5, "ci_high": 1.5, "resolution": 0.8, "paper_delta": 0.5,
            "seeds_needed": 12, "status": "resolved", "reference_mean": float("nan"), "variant_mean": float("nan")}
    return {**base, **kw}


def test_verdicts_and_explanations_from_numbers():
    assert plain_verdict(_r()) == "reproduced"
    assert plain_verdict(_r(delta_mean=-1.0, ci_low=-1.5, ci_high=-0.5)) == "opposite"
    assert plain_verdict(_r(status="inside seed noise")) == "not resolved at this scale"
    assert plain_verdict(_r(paper_delta=float("nan"))) == "no paper number; resolved"
    assert plain_verdict(_r(paper_delta=0.0, status="inside seed noise")) == "consistent (paper: no change)"

    coarse = _r(status="not resolvable at this n", resolution=2.0, paper_delta=-0.5, seeds_needed=40)
    assert explain_row(coarse) == "resolution 2 > |paper Δ| 0.5: about 40 seeds would resolve it"
    fine = _r(status="inside seed noise", resolution=0.3)
    assert explain_row(fine).startswith("resolution 0.3 ≤ |paper Δ| 0.5: an effect of the paper's size")
    ceiling = _r(status="inside seed noise", reference_mean=99.2, variant_mean=99.6)
    assert explain_row(ceiling).startswith("both arms at the ceiling (99.2, 99.6 points)")
    assert "ceiling" not in explain_row(_r(status="inside seed noise", reference_mean=60.0, variant_mean=99.6))
    assert explain_row(_r(n=1, status="not resolvable at this n")).startswith("1 seed: no estimate")
    assert "task differs" in explain_row(_r())
    assert explain_row(_r(metric="val_loss", unit="nats", delta_mean=-1.0, ci_low=-1.5, ci_high=-0.5,
                          paper_delta=-0.5)) == "same direction as the paper"


def test_committed_findings_match_csvs():
    """The repository's docs/findings.md (when committed) matches its CSVs number by number."""
    docs = REPO / "docs"
    if not (docs / "findings.md").exists():
        pytest.skip("no docs/findings.md committed yet (labcore findings SWEEP_DIR --out docs)")
    problems = check_findings(docs)
    assert problems == [], "\n".join(problems)
    for csv in (docs / "findings").glob("*_headline.csv"):
        df = read_headline_csv(csv)
        assert len(df) and all(math.isfinite(x) for x in df["delta_mean"]), csv
