"""The dask.distributed executor on a real LocalCluster of process workers: parallel runs, the
GPU resource (faked: no GPU needed), a worker killed mid-run, the scheduler going away."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from labcore.results import read_run_json
from labcore.sweep.dask_exec import DaskBackend, start_local_cluster
from labcore.sweep.runner import run_sweep
from labcore.sweep.spec import load_sweep

FIXTURES = Path(__file__).parent / "fixtures"


def sweep_file(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump({"notebook_dir": str(FIXTURES), **data}, sort_keys=False))
    return path


def overlaps(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def marker_lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_local_cluster_runs_in_parallel_and_gpu_runs_never_overlap_on_a_worker(tmp_path):
    """Worker local-0 has 2 threads and declares GPU=1 (LABCORE_GPU=7); worker local-1 has 2 threads
    and no GPU. Two runs need the GPU: both must go to local-0, one after the other, although it
    has a free thread; the CPU run runs alongside, kept off the GPU."""
    cluster, client = start_local_cluster(2, threads_per_worker=2, gpus=["7"])
    try:
        spec = load_sweep(sweep_file(tmp_path / "gpu.yaml", {"name": "gpu", "timeout": 120, "notebooks": [
            {"notebook": "tiny.ipynb", "grid": {"x": [1.0, 2.0]}, "params": {"sleep_s": 2.0}, "gpu": True},
            {"notebook": "tiny.ipynb", "params": {"x": 4.0, "sleep_s": 2.0}}]}))
        backend = DaskBackend(client, retries=1, threads_per_run=1)
        result = run_sweep(spec, tmp_path / "results", backend, progress=False, report_root=None)
    finally:
        client.close()
        cluster.close()
    assert result.exit_code == 0 and len(result.outcomes) == 3
    runs = {r.run_id: r for r in spec.runs}
    recs = {rid: read_run_json(tmp_path / "results" / "gpu" / rid) for rid in runs}
    assert all(rj["status"] == "done" for rj in recs.values())
    workers = {rid: recs[rid]["worker"].split(":")[1].split("@")[0] for rid in runs}
    intervals = {rid: (o.started_unix, o.finished_unix) for rid, o in result.outcomes.items()}
    (g1, g2), (cpu,) = [rid for rid in runs if runs[rid].gpu], [rid for rid in runs if not runs[rid].gpu]

    assert workers[g1] == workers[g2] == "local-0"                 # only the GPU worker takes them
    assert recs[g1]["env"]["CUDA_VISIBLE_DEVICES"] == recs[g2]["env"]["CUDA_VISIBLE_DEVICES"] == "7"
    assert not overlaps(intervals[g1], intervals[g2]), "two GPU runs shared the GPU=1 worker"
    t1, t2 = recs[g1]["timings"], recs[g2]["timings"]
    assert not overlaps((t1["started_unix"], t1["finished_unix"]), (t2["started_unix"], t2["finished_unix"]))
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")  # a worker without a GPU passes its own on
    assert recs[cpu]["env"]["CUDA_VISIBLE_DEVICES"] == ("" if workers[cpu] == "local-0" else inherited)
    assert overlaps(intervals[cpu], intervals[g1]) or overlaps(intervals[cpu], intervals[g2]), \
        "nothing ran in parallel"


@pytest.mark.slow
def test_worker_killed_mid_run_every_run_finishes_exactly_once(tmp_path):
    marker = tmp_path / "marker.txt"
    cluster, client = start_local_cluster(2, threads_per_worker=1, allowed_failures=3)
    killed = {}

    def killer():
        deadline = time.time() + 180
        while time.time() < deadline:
            for fields in marker_lines(marker):
                if fields[1] == "start":
                    kernel = psutil.Process(int(fields[3]))
                    killed.update(run_id=fields[0], kernel_pid=kernel.pid, worker_pid=kernel.ppid())
                    os.kill(killed["worker_pid"], signal.SIGKILL)
                    return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    try:
        spec = load_sweep(sweep_file(tmp_path / "kill.yaml", {"name": "kill", "timeout": 120, "notebooks": [
            {"notebook": "tiny.ipynb", "grid": {"x": [1.0, 2.0, 3.0]},
             "params": {"sleep_s": 4.0, "marker": str(marker)}}]}))
        t.start()
        result = run_sweep(spec, tmp_path / "results", DaskBackend(client, retries=2, threads_per_run=1),
                           progress=False, report_root=None)
    finally:
        t.join(timeout=5)
        client.close()
        cluster.close()
    assert killed, "no run was started"
    assert result.exit_code == 0
    sweep_dir = tmp_path / "results" / "kill"
    done = {d.name: read_run_json(d) for d in sweep_dir.iterdir() if d.is_dir() and not d.name.startswith(".")}
    assert set(done) == {r.run_id for r in spec.runs} and all(rj["status"] == "done" for rj in done.values())
    assert done[killed["run_id"]]["pid"] != killed["kernel_pid"]  # the finished result is the retry's
    lines = marker_lines(marker)
    starts = Counter(f[0] for f in lines if f[1] == "start")
    ends = Counter(f[0] for f in lines if f[1] == "end")
    assert starts[killed["run_id"]] == 2 and all(ends[r] == 1 for r in done)
    table = pd.read_parquet(sweep_dir / "results.parquet")
    assert table.groupby("run_id").size().to_dict() == {r: 2 for r in done}  # nothing lost or duplicated


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd, log):
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_scheduler_going_away_stops_the_sweep_and_a_rerun_resumes(tmp_path):
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    worker_cmd = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                  "--no-dashboard", "--death-timeout", "600"]
    marker = tmp_path / "marker.txt"
    sweep = sweep_file(tmp_path / "sched.yaml", {"name": "sched", "timeout": 120, "notebooks": [
        {"notebook": "tiny.ipynb", "grid": {"x": [1.0, 2.0, 3.0]}, "params": {"sleep_s": 3.0, "marker": str(marker)}}]})
    cli = [sys.executable, "-m", "labcore.cli", "sweep", str(sweep), "--scheduler", address, "--results-root",
           str(tmp_path / "results"), "--no-report", "--no-progress"]
    log = open(tmp_path / "dask.log", "ab")
    sched = _start(dask + ["--port", str(port), "--no-dashboard"], log)
    worker = _start(worker_cmd, log)
    try:
        driver = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 240

        def published() -> bool:  # a run ended AND its run directory is published (run.json done)
            root = tmp_path / "results" / "sched"
            return any(f[1] == "end" for f in marker_lines(marker)) and root.is_dir() and any(
                d.is_dir() and not d.name.startswith(".") and (d / "run.json").exists()
                and read_run_json(d)["status"] == "done" for d in root.iterdir())

        while time.time() < deadline and not published():
            time.sleep(0.2)
        _stop(sched)
        out, _ = driver.communicate(timeout=120)
        assert driver.returncode == 3, out
        assert "lost the dask scheduler" in out and "run the same command again" in out
        done_first = {d.name for d in (tmp_path / "results" / "sched").iterdir()
                      if not d.name.startswith(".") and d.is_dir() and read_run_json(d)["status"] == "done"}
        assert 1 <= len(done_first) < 3

        _stop(worker)  # a worker that lost its scheduler closes itself; start fresh ones
        sched = _start(dask + ["--port", str(port), "--no-dashboard"], log)
        worker = _start(worker_cmd, log)
        rerun = subprocess.run(cli, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert f"{len(done_first)} already done" in rerun.stdout
    finally:
        for p in (worker, sched):
            _stop(p)
        log.close()
    ends = Counter(f[0] for f in marker_lines(marker) if f[1] == "end")
    assert len(ends) == 3 and set(ends.values()) == {1}
