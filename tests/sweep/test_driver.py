"""The sweep driver's scheduling logic with a fake task on threads (no kernels): local GPU slots,
the in-flight limit, resubmission after a broken pool, publication rules."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from itertools import combinations

import pytest

from labcore.results import RunDir, read_run_json
from labcore.sweep import runner as runner_mod
from labcore.sweep.runner import run_sweep
from labcore.sweep.spec import RunSpec, SweepSpec
from labcore.sweep.task import RunOutcome, publish


class ThreadBackend:
    """A backend with the local pool's semantics (driver-side limits and GPU slots) on threads."""

    kind = "fake"

    def __init__(self, max_in_flight, gpu_slots=()):
        self.max_in_flight = max_in_flight
        self.gpu_slots = list(gpu_slots)
        self.pool = ThreadPoolExecutor(8)
        self.recovered = 0

    def executor_for(self, run):
        return self.pool

    def prepare(self, task):
        return replace(task, threads=1)

    def retryable(self, exc):
        return isinstance(exc, BrokenProcessPool)

    def recover(self):
        self.recovered += 1

    def lost(self):
        return None

    def describe(self):
        return "threads"

    def close(self, cancel=False):
        self.pool.shutdown()


def make_spec(n_gpu, n_cpu):
    runs = [RunSpec(run_id=f"r{i}", sweep="fake", notebook="/x/nb.ipynb", notebook_name="nb.ipynb", entry=0,
                    params={"i": i}, seed=0, gpu=i < n_gpu) for i in range(n_gpu + n_cpu)]
    return SweepSpec(name="fake", source="fake.yaml", runs=tuple(runs))


def test_local_gpu_slots_one_run_per_gpu_and_cpu_runs_kept_off(tmp_path, monkeypatch):
    log, lock = [], threading.Lock()

    def fake_task(task):
        t0 = time.time()
        time.sleep(0.05)
        with lock:
            log.append((task.run.run_id, task.run.gpu, task.cuda_visible_devices, t0, time.time()))
        return RunOutcome(task.run.run_id, "done", task.attempt, "t", t0, time.time())

    monkeypatch.setattr(runner_mod, "run_task", fake_task)
    backend = ThreadBackend(max_in_flight=4, gpu_slots=["0", "1"])
    result = run_sweep(make_spec(6, 3), tmp_path, backend, progress=False, report_root=None)
    backend.close()
    assert result.exit_code == 0 and len(log) == 9
    gpu = [e for e in log if e[1]]
    assert {e[2] for e in gpu} <= {"0", "1"}
    assert all(e[2] == "" for e in log if not e[1])  # CPU runs cannot see the GPUs
    for a, b in combinations(gpu, 2):
        if a[2] == b[2]:
            assert a[4] <= b[3] or b[4] <= a[3], "two runs held the same GPU slot at once"
    # never more than max_in_flight at once
    events = sorted([(e[3], 1) for e in log] + [(e[4], -1) for e in log])
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    assert peak <= 4


def test_without_gpu_runs_the_environment_is_left_alone(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(runner_mod, "run_task", lambda task: seen.append(task.cuda_visible_devices)
                        or RunOutcome(task.run.run_id, "done", 1, "t", 0.0, 0.0))
    backend = ThreadBackend(max_in_flight=2, gpu_slots=["0"])
    run_sweep(make_spec(0, 3), tmp_path, backend, progress=False, report_root=None)
    backend.close()
    assert seen == [None, None, None]


def test_broken_pool_is_recovered_and_runs_resubmitted_up_to_retries(tmp_path, monkeypatch):
    attempts = {}

    def flaky(task):
        attempts.setdefault(task.run.run_id, []).append(task.attempt)
        if task.run.run_id == "r0" or (task.run.run_id == "r1" and task.attempt == 1):
            raise BrokenProcessPool("a worker died")
        return RunOutcome(task.run.run_id, "done", task.attempt, "t", 0.0, 0.0)

    monkeypatch.setattr(runner_mod, "run_task", flaky)
    backend = ThreadBackend(max_in_flight=1)
    result = run_sweep(make_spec(0, 3), tmp_path, backend, retries=2, progress=False, report_root=None)
    backend.close()
    assert attempts == {"r0": [1, 2, 3], "r1": [1, 2], "r2": [1]}
    assert backend.recovered == 3 and result.exit_code == 1
    rec = read_run_json(tmp_path / "fake" / "r0")  # the run that never ran is recorded as failed
    assert rec["status"] == "failed" and rec["error"]["ename"] == "BrokenProcessPool"
    assert result.outcomes["r1"].status == "done"


def test_sweep_directory_is_locked_against_a_second_driver(tmp_path, monkeypatch):
    from labcore.sweep.runner import SweepLocked, _sweep_lock

    with _sweep_lock(tmp_path / "fake"):
        with pytest.raises(SweepLocked, match="another labcore sweep"):
            run_sweep(make_spec(0, 1), tmp_path, ThreadBackend(1), progress=False, report_root=None)


def _attempt(root, name, status):
    run = RunDir(root / ".attempts" / name).start({"a": 1}, notebook="nb.ipynb", seed=0)
    if status == "done":
        run.finish()
    elif status == "failed":
        run.fail("x")
    return run.path


def test_publish_first_finished_wins_and_failed_results_are_replaced(tmp_path):
    final = tmp_path / "run1"
    assert publish(_attempt(tmp_path, "a1", "failed"), final) == "published"
    assert read_run_json(final)["status"] == "failed"
    assert publish(_attempt(tmp_path, "a2", "done"), final) == "published"   # replaces the failure
    first = read_run_json(final)
    assert first["status"] == "done"
    dup = _attempt(tmp_path, "a3", "done")
    assert publish(dup, final) == "duplicate" and not dup.exists()            # the first done wins
    assert read_run_json(final) == first
    assert publish(_attempt(tmp_path, "a4", "failed"), final) == "duplicate"  # never downgraded
    assert read_run_json(final) == first
