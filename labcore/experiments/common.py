"""What every ablation notebook shares: its parameter schema, sizes, and its run directory.

Each ablation notebook's parameter schema subclasses :class:`LabParams` (defined torch-free in
:mod:`labcore.experiments.params`, re-exported here). ``smoke=True`` shrinks everything (tests, CI,
a first look); otherwise the values are used as given. The defaults are the *quick* sweep's lab
scale: a 4-block, D = 64 byte-level LM trained for a few hundred steps on the synthetic knowledge
base, sized to finish in a minute or two per notebook on 2 CPU cores. ``sweeps/full.yaml`` raises
them for a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from labcore.data.tokenizer import ByteTokenizer
from labcore.experiments.core import refresh_paper_columns
from labcore.experiments.params import LabParams
from labcore.results import RunDir, free_run_dir, repo_path

__all__ = ["LabParams", "VOCAB_SIZE", "drop_checkpoints", "lab_run", "save_outputs"]

VOCAB_SIZE = ByteTokenizer().vocab_size


@contextlib.contextmanager
def lab_run(params: LabParams, notebook: str) -> Iterator[RunDir]:
    """Open the notebook's run directory: run.json "running" now, "done" (written last) when the
    block ends, "failed" with the error if it raises (the error propagates). A relative ``out_dir``
    is resolved against the repository root (as in every notebook); if it already holds a finished
    run (an earlier interactive run), ``<out_dir>-2``, ``-3``, ... is used.

    When the block ends without an error, the training checkpoints under the run directory are
    deleted (:func:`drop_checkpoints`) unless ``params.keep_checkpoints``: a finished ablation is
    read from its tables, figures and history, and its checkpoints would be most of its size. A
    run that fails or is interrupted keeps them, so its training runs can still be resumed."""
    path = free_run_dir(repo_path(params.out_dir))
    run = RunDir(path).start(params, notebook=notebook, seed=params.seed)
    try:
        yield run
    except BaseException as e:  # record, then re-raise: nothing is swallowed
        run.fail(e)
        raise
    dropped = 0 if getattr(params, "keep_checkpoints", False) else drop_checkpoints(run.path)
    run.finish(checkpoint_bytes_dropped=dropped)


def drop_checkpoints(run_dir: str | Path) -> int:
    """Delete every training checkpoint (``**/checkpoints/step-*.pt``, the layout of
    labcore.lm.train.checkpoints) under ``run_dir`` and the emptied ``checkpoints`` folders;
    returns the bytes freed."""
    freed = 0
    for ckpt_dir in sorted(Path(run_dir).rglob("checkpoints")):
        if not ckpt_dir.is_dir():
            continue
        for f in ckpt_dir.glob("step-*.pt"):
            freed += f.stat().st_size
            f.unlink()
        if not any(ckpt_dir.iterdir()):
            ckpt_dir.rmdir()
    return freed


def save_outputs(run: RunDir, notebook: str, table: Any, figures: dict[str, Any],
                 key_tables: dict[str, Any]) -> None:
    """Write an ablation's results into its run directory: every figure (HTML + PNG), the tidy
    per-(variant, seed) table as summary.parquet, and the headline tables (in the given order,
    numbered so the report lists them that way). A paired-deltas table whose ``paper_delta`` column
    was filled after :func:`~labcore.experiments.core.paired_deltas` gets its ``seeds_needed`` and
    verdict recomputed against the paper's deltas first."""
    for name, fig in figures.items():
        run.save_figure(fig, name)
    run.write_summary(table.assign(notebook=notebook))
    for i, (name, t) in enumerate(key_tables.items(), start=1):
        run.write_key_table(f"{i}_{name}", refresh_paper_columns(t))
