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
from typing import Any

from labcore.data.tokenizer import ByteTokenizer
from labcore.experiments.params import LabParams
from labcore.results import RunDir, free_run_dir, repo_path

__all__ = ["LabParams", "VOCAB_SIZE", "lab_run", "save_outputs"]

VOCAB_SIZE = ByteTokenizer().vocab_size


@contextlib.contextmanager
def lab_run(params: LabParams, notebook: str) -> Iterator[RunDir]:
    """Open the notebook's run directory: run.json "running" now, "done" (written last) when the
    block ends, "failed" with the error if it raises (the error propagates). A relative ``out_dir``
    is resolved against the repository root (as in every notebook); if it already holds a finished
    run (an earlier interactive run), ``<out_dir>-2``, ``-3``, ... is used."""
    path = free_run_dir(repo_path(params.out_dir))
    run = RunDir(path).start(params, notebook=notebook, seed=params.seed)
    try:
        yield run
    except BaseException as e:  # record, then re-raise: nothing is swallowed
        run.fail(e)
        raise
    run.finish()


def save_outputs(run: RunDir, notebook: str, table: Any, figures: dict[str, Any],
                 key_tables: dict[str, Any]) -> None:
    """Write an ablation's results into its run directory: every figure (HTML + PNG), the tidy
    per-(variant, seed) table as summary.parquet, and the headline tables (in the given order,
    numbered so the report lists them that way)."""
    for name, fig in figures.items():
        run.save_figure(fig, name)
    run.write_summary(table.assign(notebook=notebook))
    for i, (name, t) in enumerate(key_tables.items(), start=1):
        run.write_key_table(f"{i}_{name}", t)
