"""Timer statistics on an injected clock (no real timing), error messages, and the CUDA-event path."""

import numpy as np
import pytest
import torch

from labcore.config import ConfigError
from labcore.profiling.timer import Timer, summarize, time_fn


class StubClock:
    """Each timed call advances the clock by the next duration of ``durations``."""

    def __init__(self, durations):
        self.durations = list(durations)
        self.t = 100.0
        self.reads = 0
        self._next = 0

    def __call__(self):
        self.reads += 1
        if self.reads % 2 == 0:  # end of a sample: jump by the next duration
            self.t += self.durations[self._next]
            self._next += 1
        return self.t


def test_summarize_matches_numpy_median_and_iqr():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 10, 11):
        x = rng.exponential(size=n).tolist()
        t = summarize(x)
        assert t.median_s == pytest.approx(float(np.median(x)))
        iqr = float(np.percentile(x, 75) - np.percentile(x, 25))
        assert t.iqr_s == pytest.approx(iqr)
        assert t.samples == tuple(x)
        assert t.min_s == min(x) and t.mean_s == pytest.approx(float(np.mean(x)))


def test_summarize_hand_computed():
    t = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert t.median_s == 3.0
    assert t.iqr_s == 2.0  # Q1 = 2, Q3 = 4
    with pytest.raises(ValueError, match="empty"):
        summarize([])


def test_time_fn_on_stub_clock_counts_warmup_and_repeats():
    durations = [0.010, 0.030, 0.020, 0.500, 0.015]
    clock = StubClock(durations)
    calls = []
    t = time_fn(lambda: calls.append(1), warmup=3, repeats=5, device="cpu", clock=clock)
    assert len(calls) == 8  # 3 warm-up + 5 timed
    assert clock.reads == 10  # start and end of each timed call only
    assert t.samples == pytest.approx(tuple(durations))
    assert t.median_s == pytest.approx(0.020)
    assert t.iqr_s == pytest.approx(0.030 - 0.015)  # robust to the 0.5 s outlier


def test_timer_context_manager_and_skip():
    clock = StubClock([1.0, 2.0, 3.0, 4.0])
    timer = Timer(device="cpu", clock=clock)
    for _ in range(4):
        with timer:
            pass
    assert timer.elapsed_s == pytest.approx(4.0)
    assert timer.timing().median_s == pytest.approx(2.5)
    assert timer.timing(skip=2).samples == pytest.approx((3.0, 4.0))
    with pytest.raises(ConfigError, match="skip"):
        timer.timing(skip=4)
    timer.reset()
    with pytest.raises(RuntimeError, match="no sample"):
        _ = timer.elapsed_s


def test_time_fn_bad_input():
    with pytest.raises(ConfigError, match=r"time_fn\.repeats=0"):
        time_fn(lambda: None, repeats=0)
    with pytest.raises(ConfigError, match=r"time_fn\.warmup=-1"):
        time_fn(lambda: None, warmup=-1)
    with pytest.raises(TypeError, match="not callable"):
        time_fn(3)


def test_time_fn_real_cpu_smoke():
    x = torch.randn(32, 32)
    t = time_fn(lambda: x @ x, warmup=1, repeats=3, device="cpu")
    assert len(t.samples) == 3 and all(s > 0 for s in t.samples)


@pytest.mark.gpu
def test_cuda_event_timer_measures_device_work():
    dev = torch.device("cuda")
    x = torch.randn(2048, 2048, device=dev)
    t = time_fn(lambda: x @ x, warmup=2, repeats=5, device=dev)
    assert len(t.samples) == 5 and t.median_s > 0
    timer = Timer(device=dev)
    with timer:
        torch.cuda._sleep(1_000_000)  # ~ms of GPU cycles; perf_counter without sync would see ~0
    assert timer.elapsed_s > 1e-5
