"""A tiny results directory for the explorer tests: finished runs written through RunDir.

Two notebooks with different parameters and metrics, so that changing the notebook dropdown
changes the metric/x options, and changing the metric changes the plotted values. One unfinished
run shows that collect() ignores it. Values are simple formulas of the parameters (no RNG).
"""

from __future__ import annotations

from pathlib import Path

from labcore.results import RunDir

TDQKR = "01_tdqkr.ipynb"
COMPARE = "05_compare.ipynb"


def tdqkr_val_loss(rank: int, seed: int) -> float:
    return 3.0 - 0.1 * rank + 0.01 * seed


def tdqkr_recall(rank: int, seed: int) -> float:
    return 0.5 + 0.1 * rank - 0.02 * seed


def compare_latency_ms(layer: str, batch_size: int) -> float:
    return {"moe": 2.0, "pkm": 1.0, "ultramem": 1.2}[layer] * (1 + batch_size / 64)


def build_results(root: str | Path) -> Path:
    """Write the runs under ``root`` (created) and return it."""
    root = Path(root)
    for rank in (1, 2, 4):
        for seed in (0, 1):
            run = RunDir(root / f"tdqkr-r{rank}-s{seed}").start(
                {"rank": rank, "scoring": "tucker", "seed": seed}, notebook=TDQKR, seed=seed)
            run.write_summary({"val_loss": tdqkr_val_loss(rank, seed), "recall": tdqkr_recall(rank, seed)})
            run.finish()
    for layer in ("moe", "pkm", "ultramem"):
        for batch_size in (1, 16, 64):
            run = RunDir(root / f"compare-{layer}-b{batch_size}").start(
                {"layer": layer, "batch_size": batch_size, "seed": 0}, notebook=COMPARE, seed=0)
            run.write_summary({"latency_ms": compare_latency_ms(layer, batch_size),
                               "val_loss": 2.5 + 0.1 * len(layer)})
            run.finish()
    RunDir(root / "tdqkr-unfinished").start({"rank": 8, "scoring": "tucker", "seed": 0}, notebook=TDQKR, seed=0)
    return root
