"""The sweep runner end to end on tiny fixture notebooks: local process pool, failures, timeouts,
collection, report, and resuming after the driver is killed with SIGKILL.

Each papermill run starts a kernel (seconds); the tests keep the number of runs small.
"""

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nbformat
import pandas as pd
import psutil
import pytest
import yaml

from labcore.cli import main as cli_main
from labcore.results import read_run_json
from labcore.sweep.executors import local_cores

FIXTURES = Path(__file__).parent / "fixtures"


def write_sweep(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump({"notebook_dir": str(FIXTURES), **data}, sort_keys=False))
    return path


def source_cell_containing(notebook: Path, text: str) -> int:
    nb = nbformat.read(notebook, as_version=4)
    return next(i for i, c in enumerate(nb.cells) if text in c.source)


def marker_lines(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    return [tuple(line.split()[:2]) for line in path.read_text().splitlines() if line.strip()]


def run_dirs(sweep_dir: Path) -> dict[str, dict]:
    out = {}
    for d in sweep_dir.iterdir():
        if d.is_dir() and not d.name.startswith("."):
            out[d.name] = read_run_json(d)
    return out


def test_sweep_end_to_end_failure_timeout_results_report(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "e2e.yaml", {"name": "e2e", "timeout": 120, "notebooks": [
        {"notebook": "tiny.ipynb", "params": {"x": 2.0, "n": 4}},
        {"notebook": "tiny.ipynb", "params": {"fail": True}},
        {"notebook": "tiny.ipynb", "params": {"sleep_s": 600.0}, "timeout": 2},
        {"notebook": "echo.ipynb", "params": {"k": 3}},
    ]})
    results, reports = tmp_path / "results", tmp_path / "reports"
    args = ["sweep", str(sweep), "--jobs", "2", "--results-root", str(results), "--reports-root", str(reports),
            "--no-progress"]
    assert cli_main(args) == 1  # a run failed
    out = capsys.readouterr().out
    sweep_dir = results / "e2e"
    runs = run_dirs(sweep_dir)
    assert len(runs) == 4
    by = {(rj["notebook"], rj["params"].get("fail"), rj["params"].get("sleep_s")): (rid, rj)
          for rid, rj in runs.items()}

    # the failing run: status, cell, error; executed notebook kept
    rid_fail, fail = by[("tiny.ipynb", True, 0.0)]
    assert fail["status"] == "failed" and fail["error"]["ename"] == "ValueError"
    assert "failing on purpose" in fail["error"]["evalue"]
    assert fail["error"]["cell_index"] == source_cell_containing(FIXTURES / "tiny.ipynb", "failing on purpose")
    executed = nbformat.read(sweep_dir / rid_fail / "executed.ipynb", as_version=4)
    assert any(o.get("ename") == "ValueError" for c in executed.cells for o in c.get("outputs", []))
    assert "failing on purpose" in out and "failed" in out

    # the run over its time limit was stopped and recorded
    rid_slow, slow = by[("tiny.ipynb", False, 600.0)]
    assert slow["status"] == "failed" and "Timeout" in slow["error"]["ename"]
    assert slow["error"]["cell_index"] == source_cell_containing(FIXTURES / "tiny.ipynb", "time.sleep(P.sleep_s)")

    # the good runs, and what their kernels were given
    rid_ok, ok = by[("tiny.ipynb", False, 0.0)]
    assert ok["status"] == "done" and ok["seed"] == 0 and ok["run_id"] == rid_ok and ok["sweep"] == "e2e"
    assert ok["env"]["OMP_NUM_THREADS"] == str(max(1, local_cores() // 2))
    assert (sweep_dir / rid_ok / "executed.ipynb").exists()
    assert (sweep_dir / rid_ok / "figures" / "loss.html").exists()

    # one tidy table; DuckDB reads it
    table = pd.read_parquet(sweep_dir / "results.parquet")
    assert set(table["run_id"]) == {rid_ok, by[("echo.ipynb", None, None)][0]}
    final = table[(table.run_id == rid_ok) & (table.metric == "final_loss")]["value"].item()
    assert final == pytest.approx(2.0 / 4)
    import duckdb

    k2 = duckdb.connect().execute(
        f"SELECT value FROM read_parquet('{sweep_dir / 'results.parquet'}') WHERE metric = 'k_squared'").fetchone()[0]
    assert k2 == 9.0
    runs_pq = pd.read_parquet(sweep_dir / "runs.parquet").set_index("run_id")
    assert runs_pq.loc[rid_fail, "status"] == "failed" and runs_pq.loc[rid_fail, "error_name"] == "ValueError"
    assert not (sweep_dir / ".attempts").exists()

    # the report: index, executed notebooks as HTML, figures pointing at one local plotly.js
    index = (reports / "e2e" / "index.html").read_text()
    for rid in runs:
        assert rid in index
        assert (reports / "e2e" / "runs" / rid / "notebook.html").exists()
    assert "failing on purpose" in (reports / "e2e" / "runs" / rid_fail / "notebook.html").read_text()
    assert "failing on purpose" in index and "Failures" in index
    fig = (reports / "e2e" / "runs" / rid_ok / "figures" / "loss.html").read_text()
    assert 'src="../../../assets/plotly.min.js"' in fig and (reports / "e2e" / "assets" / "plotly.min.js").exists()
    assert "https://" not in index

    # a rerun would skip the finished runs and run the failed ones again (resuming itself is
    # tested with a killed driver below)
    assert cli_main(args + ["--dry-run"]) == 0
    plan = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[:-1]}
    assert plan == {rid: ("done" if rj["status"] == "done" else "to") for rid, rj in runs.items()}

    # the report can be regenerated from the directory alone
    (reports / "e2e" / "index.html").unlink()
    assert cli_main(["report", str(sweep_dir), "--out", str(reports / "again")]) == 0
    assert rid_fail in (reports / "again" / "index.html").read_text()


def test_sweep_killed_with_sigkill_resumes_only_unfinished_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    sweep = write_sweep(tmp_path / "kill.yaml", {"name": "kill", "timeout": 120, "notebooks": [
        {"notebook": "tiny.ipynb", "grid": {"x": [1.0, 2.0]},
         "params": {"sleep_s": 2.0, "marker": str(marker)}}]})
    results = tmp_path / "results"
    sweep_dir = results / "kill"
    cmd = [sys.executable, "-m", "labcore.cli", "sweep", str(sweep), "--jobs", "1", "--results-root",
           str(results), "--no-report", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 240
        # wait until one run is finished and the next one has started, then kill -9 the driver
        while time.time() < deadline:
            lines = marker_lines(marker)
            if any(w == "end" for _, w in lines) and sum(w == "start" for _, w in lines) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.1)
        else:
            pytest.fail("the sweep did not get going in time")
        children = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # the pool worker and its kernel notice and go away: no orphan keeps computing
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left behind: {alive}"

    done_before = {rid: rj for rid, rj in run_dirs(sweep_dir).items() if rj and rj["status"] == "done"}
    assert 1 <= len(done_before) <= 2
    started_before = Counter(rid for rid, w in marker_lines(marker) if w == "start")

    assert cli_main(["sweep", str(sweep), "--jobs", "1", "--results-root", str(results), "--no-report",
                     "--no-progress"]) == 0
    after = run_dirs(sweep_dir)
    assert len(after) == 2 and all(rj["status"] == "done" for rj in after.values())
    for rid, rj in done_before.items():  # finished runs were not executed again
        assert after[rid]["timings"] == rj["timings"]
    lines = marker_lines(marker)
    ends = Counter(rid for rid, w in lines if w == "end")
    starts = Counter(rid for rid, w in lines if w == "start")
    assert set(ends) == set(after) and all(n == 1 for n in ends.values())  # each finished exactly once
    for rid in after:
        expected = started_before[rid] if rid in done_before else started_before[rid] + 1
        assert starts[rid] == expected
    assert not (sweep_dir / ".attempts").exists()
    table = pd.read_parquet(sweep_dir / "results.parquet")
    assert sorted(table.groupby("run_id").size().tolist()) == [2, 2]


@pytest.mark.slow
def test_local_pool_worker_killed_mid_run_is_retried(tmp_path):
    """A pool worker process dying breaks the whole ProcessPoolExecutor; the driver rebuilds it
    and re-executes the runs that were in flight."""
    import threading

    from labcore.sweep.executors import LocalPoolBackend
    from labcore.sweep.runner import run_sweep
    from labcore.sweep.spec import load_sweep

    marker = tmp_path / "marker.txt"
    spec = load_sweep(write_sweep(tmp_path / "pool.yaml", {"name": "pool", "timeout": 120, "notebooks": [
        {"notebook": "tiny.ipynb", "grid": {"x": [1.0, 2.0]}, "params": {"sleep_s": 4.0, "marker": str(marker)}}]}))
    backend = LocalPoolBackend(2)
    killed = []

    def killer():
        deadline = time.time() + 180
        while time.time() < deadline and not killed:
            for line in (marker.read_text().splitlines() if marker.exists() else []):
                rid, what, _, kernel_pid = line.split()
                if what == "start":
                    worker = psutil.Process(int(kernel_pid)).parent()
                    killed.append((rid, worker.pid))
                    worker.kill()
                    return
            time.sleep(0.1)

    t = threading.Thread(target=killer)
    t.start()
    try:
        result = run_sweep(spec, tmp_path / "results", backend, retries=2, progress=False, report_root=None)
    finally:
        backend.close()
        t.join()
    assert killed and result.exit_code == 0
    ends = Counter(rid for rid, w in marker_lines(marker) if w == "end")
    assert set(ends) == {r.run_id for r in spec.runs} and all(n == 1 for n in ends.values())
