"""labcore.results: the run directory schema, its completion rule, and the derived tables."""

import json
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import pytest

from labcore.results import (
    PARAM_PREFIX,
    RunDir,
    collect,
    duckdb_connect,
    find_run_dirs,
    run_status,
    runs_table,
    write_table,
)


@dataclass(frozen=True)
class P:
    rank: int = 2
    lr: float = 1e-3
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    out_dir: str = "x"
    seed: int = 0


def make_run(root, name, *, rank=2, seed=0, losses=(1.0, 0.5), finish=True, notebook="nb.ipynb"):
    run = RunDir(root / "sw" / name).start(P(rank=rank, seed=seed), notebook=notebook, seed=seed)
    for i, loss in enumerate(losses):
        run.log({"step": i, "loss": loss})
    run.write_summary(pd.DataFrame({"metric": ["final_loss", "best_loss"], "value": [losses[-1], min(losses)]}))
    if finish:
        run.finish()
    return run


def test_lifecycle_running_then_done_written_last(tmp_path):
    run = RunDir(tmp_path / "r1").start(P(rank=3), notebook="nb.ipynb", seed=7)
    rec = json.loads((tmp_path / "r1" / "run.json").read_text())
    assert rec["status"] == "running" and rec["params"]["rank"] == 3 and rec["seed"] == 7
    assert rec["params"]["sizes"] == [1, 2] and rec["notebook"] == "nb.ipynb"
    assert rec["versions"]["python"] and "torch" in rec["versions"] and "started_unix" in rec["timings"]
    run.log({"step": 0, "loss": 2.0})
    run.log(step=1, loss=1.0)
    run.write_summary({"metric": "final_loss", "value": 1.0})
    assert run_status(run.path) == "running"  # outputs exist, but the run is not complete
    run.finish(note="ok")
    rec = run.read()
    assert rec["status"] == "done" and rec["note"] == "ok"
    assert rec["timings"]["finished_unix"] >= rec["timings"]["started_unix"]
    # run.json is the newest file: written after every other output
    newest = max((p for p in run.path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == "run.json"
    assert list(run.history()["loss"]) == [2.0, 1.0]
    assert run.summary().to_dict("records") == [{"metric": "final_loss", "value": 1.0}]
    assert not list(run.path.glob(".*tmp"))  # no temp files left by atomic writes


def test_start_refuses_a_finished_run_dir(tmp_path):
    make_run(tmp_path, "a")
    with pytest.raises(FileExistsError, match="finished run"):
        RunDir(tmp_path / "sw" / "a").start(P(), notebook="nb.ipynb", seed=0)


def test_restart_after_a_crash_discards_stale_outputs(tmp_path):
    crashed = make_run(tmp_path, "c", losses=(9.0, 8.0), finish=False)
    crashed.save_figure(go.Figure(), "old", png=False)
    run = RunDir(crashed.path).start(P(), notebook="nb.ipynb", seed=0)
    run.log({"step": 0, "loss": 1.0})
    assert list(run.history()["loss"]) == [1.0]
    assert not run.summary_path.exists() and not run.figures_dir.exists()


def test_log_before_start_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="start"):
        RunDir(tmp_path / "nope").log({"a": 1})


def test_fail_records_the_error(tmp_path):
    run = RunDir(tmp_path / "f").start(P(), notebook="nb.ipynb", seed=0)
    try:
        raise ValueError("boom")
    except ValueError as e:
        run.fail(e)
    rec = run.read()
    assert rec["status"] == "failed" and rec["error"]["ename"] == "ValueError" and rec["error"]["evalue"] == "boom"
    assert "Traceback" in rec["error"]["traceback"]


def test_save_figure_html_and_json_and_png_failure_is_recorded_not_raised(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "g").start(P(), notebook="nb.ipynb", seed=0)
    fig = go.Figure(go.Scatter(x=[0, 1], y=[2, 3]))

    def broken_png(*a, **k):
        raise RuntimeError("no chrome here")

    monkeypatch.setattr(RunDir, "_write_png", broken_png)
    with pytest.warns(RuntimeWarning, match="PNG export failed"):
        out = run.save_figure(fig, "curve")
    assert out["html"].exists() and "png" not in out
    assert (run.figures_dir / "plotly.min.js").exists()  # the HTML opens offline
    assert 'src="plotly.min.js"' in out["html"].read_text()
    assert json.loads(out["json"].read_text())["data"][0]["y"] == [2, 3]
    with pytest.raises(RuntimeError, match="no chrome"):
        run.save_figure(fig, "curve2", strict=True)
    with pytest.raises(ValueError, match="name"):
        run.save_figure(fig, "../evil", png=False)
    run.finish()
    rec = run.read()
    assert "no chrome here" in rec["figure_errors"]["curve"] and sorted(rec["figures"]) == ["curve", "curve2"]


@pytest.mark.slow
def test_save_figure_png_through_kaleido_and_chromium(tmp_path):
    run = RunDir(tmp_path / "png").start(P(), notebook="nb.ipynb", seed=0)
    out = run.save_figure(go.Figure(go.Bar(x=["a", "b"], y=[1, 2])), "bars", strict=True)
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run.finish()
    assert run.read()["figure_errors"] == {}


def test_collect_is_tidy_and_ignores_unfinished_runs(tmp_path):
    make_run(tmp_path, "a", rank=2, seed=0, losses=(1.0, 0.5))
    make_run(tmp_path, "b", rank=4, seed=1, losses=(0.9, 0.7, 0.8))
    make_run(tmp_path, "c", rank=8, finish=False)  # crashed mid-way: summary exists, not done
    (tmp_path / "sw" / ".attempts" / "x").mkdir(parents=True)
    df = collect(tmp_path)
    assert sorted(set(df["run_id"])) == ["a", "b"] and len(df) == 4  # 2 summary rows per finished run
    assert list(df.columns[:4]) == ["run_id", "sweep", "notebook", "seed"]
    assert f"{PARAM_PREFIX}out_dir" not in df.columns and f"{PARAM_PREFIX}seed" not in df.columns
    b = df[(df.run_id == "b") & (df.metric == "best_loss")].iloc[0]
    assert b[f"{PARAM_PREFIX}rank"] == 4 and b["seed"] == 1 and b["value"] == pytest.approx(0.7)
    assert b[f"{PARAM_PREFIX}sizes"] == "[1, 2]" and b["sweep"] == "sw"
    assert set(runs_table(tmp_path)["status"]) == {"done", "running"}
    assert [d.name for d in find_run_dirs(tmp_path)] == ["a", "b", "c"]


def test_integer_params_stay_integers_across_notebooks(tmp_path):
    make_run(tmp_path, "a", rank=2)
    other = RunDir(tmp_path / "sw" / "z").start({"k": 1}, notebook="other.ipynb", seed=0)
    other.write_summary({"metric": "m", "value": 1.5})
    other.finish()
    df = collect(tmp_path)
    assert str(df[f"{PARAM_PREFIX}rank"].dtype) == "Int64"
    assert df.loc[df.run_id == "a", f"{PARAM_PREFIX}rank"].iloc[0] == 2


def test_duckdb_views_over_runs_and_summaries(tmp_path):
    make_run(tmp_path, "a", rank=2, losses=(1.0, 0.25))
    make_run(tmp_path, "b", rank=4, losses=(1.0, 0.75))
    make_run(tmp_path, "c", rank=8, finish=False)
    con = duckdb_connect(tmp_path)
    got = con.execute("SELECT run_id, value FROM summary WHERE metric = 'final_loss' ORDER BY run_id").fetchall()
    assert got == [("a", 0.25), ("b", 0.75)]  # the unfinished run's summary is not in the view
    assert con.execute("SELECT count(*) FROM runs WHERE status = 'running'").fetchone()[0] == 1
    best = con.execute(f"SELECT {PARAM_PREFIX}rank FROM results WHERE metric = 'final_loss' "
                       "ORDER BY value LIMIT 1").fetchone()[0]
    assert best == 2
    # a written results table is plain parquet, queryable directly
    path = write_table(collect(tmp_path), tmp_path / "results.parquet")
    import duckdb

    n = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{path}')").fetchone()[0]
    assert n == 4


def test_duckdb_with_no_finished_runs_has_empty_summary(tmp_path):
    (tmp_path / "empty").mkdir()
    con = duckdb_connect(tmp_path / "empty")
    assert con.execute("SELECT count(*) FROM summary").fetchone()[0] == 0


def test_free_run_dir_skips_finished_runs_only(tmp_path):
    from labcore.results import RunDir, free_run_dir

    base = tmp_path / "nb"
    assert free_run_dir(base) == base                     # nothing there yet
    RunDir(base).start({"a": 1}, notebook="x", seed=0)
    assert free_run_dir(base) == base                     # a running (unfinished) run is reused
    RunDir(base).finish()
    assert free_run_dir(base) == tmp_path / "nb-2"
    r2 = RunDir(tmp_path / "nb-2").start({}, notebook="x", seed=0)
    r2.finish()
    assert free_run_dir(base) == tmp_path / "nb-3"


def test_repo_path_resolves_relative_paths_against_the_checkout(tmp_path):
    from pathlib import Path

    from labcore.results import repo_path

    assert repo_path(tmp_path) == tmp_path
    root = Path(__file__).resolve().parents[1]
    assert repo_path("runs/quick") == root / "runs" / "quick"


def test_key_tables_are_written_atomically_and_shown_first_in_the_report(tmp_path):
    import pandas as pd

    from labcore.results import RunDir
    from labcore.viz.report import write_report

    sweep = tmp_path / "sw"
    a = RunDir(sweep / "nb-aaa").start({"rank": 2, "only_a": 7}, notebook="nb", seed=0)
    a.write_summary(pd.DataFrame({"variant": ["x", "y"], "val_loss": [2.5, 2.25]}))
    a.write_key_table("1_deltas", pd.DataFrame({"variant": ["y"], "delta_mean": [-0.123456], "verdict": ["lower"]}))
    a.finish()
    b = RunDir(sweep / "nb-bbb").start({"rank": 3}, notebook="nb", seed=1)
    b.write_summary({"variant": "z", "val_loss": 3.0})
    b.finish()
    assert set(a.key_tables()) == {"1_deltas"} and b.key_tables() == {}
    assert not list((sweep / "nb-aaa" / "tables").glob(".*"))   # no temp files left behind
    with pytest.raises(ValueError, match="name"):
        a.write_key_table("bad name", pd.DataFrame())
    html = write_report(sweep, tmp_path / "rep").read_text()
    assert html.index("Key results") < html.index("Results (one row")
    assert "-0.123456" in html and "lower" in html
    assert "&lt;NA&gt;" not in html and "<NA>" not in html     # absent params are not printed
    assert "only_a=7" in html and "rank=3" in html
