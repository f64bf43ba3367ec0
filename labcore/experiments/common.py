"""What every ablation notebook shares: its parameter schema, sizes, and its run directory.

Each ablation notebook's parameter schema subclasses :class:`LabParams` (the fields below, plus
its own). ``smoke=True`` shrinks everything (tests, CI, a first look); otherwise the values are
used as given. The defaults are the *quick* sweep's lab scale: a 4-block, D = 64 byte-level LM
trained for a few hundred steps on the synthetic knowledge base, sized to finish in a minute or
two per notebook on 2 CPU cores. ``sweeps/full.yaml`` raises them for a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from labcore.data.knowledge import KnowledgeConfig
from labcore.data.tokenizer import ByteTokenizer
from labcore.layers.base import check_choice, check_float, check_int
from labcore.lm.model import ModelConfig, SparsePlan
from labcore.lm.train import TrainConfig
from labcore.results import RunDir, free_run_dir, repo_path

VOCAB_SIZE = ByteTokenizer().vocab_size


@dataclass(frozen=True)
class LabParams:
    """Parameters shared by the ablation notebooks (mirrored by their ``parameters`` cells)."""

    smoke: bool = False          # tiny sizes and few steps (tests, CI)
    out_dir: str = "runs/manual"  # run directory (the sweep runner sets it)
    seed: int = 0                # first seed; seeds are seed, seed+1, ...
    n_seeds: int = 3             # seeds per variant (spread and confidence intervals)
    steps: int = 300             # optimiser steps per training run
    batch_size: int = 16         # sequences per step
    seq_len: int = 64            # tokens per sequence
    lr: float = 3e-3             # peak learning rate (warmup + cosine)
    d_model: int = 64            # model width D
    n_layers: int = 4            # transformer blocks L
    n_people: int = 100          # individuals in the synthetic knowledge base
    device: str = "auto"         # "auto" | "cpu" | "cuda"

    def __post_init__(self) -> None:
        o = type(self).__name__
        if not isinstance(self.smoke, bool):
            raise ValueError(f"{o}.smoke={self.smoke!r} is not allowed: must be True or False")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ValueError(f"{o}.out_dir={self.out_dir!r} is not allowed: must be a non-empty path")
        check_int(o, "seed", self.seed, min_value=0)
        check_int(o, "n_seeds", self.n_seeds, min_value=1, max_value=100)
        check_int(o, "steps", self.steps, min_value=1)
        check_int(o, "batch_size", self.batch_size, min_value=1)
        check_int(o, "seq_len", self.seq_len, min_value=8, max_value=4096)
        check_float(o, "lr", self.lr, min_value=0.0, max_value=1.0, min_inclusive=False)
        check_int(o, "d_model", self.d_model, min_value=16)
        if self.d_model % 16:
            raise ValueError(f"{o}.d_model={self.d_model!r} is not allowed: must be a multiple of 16")
        check_int(o, "n_layers", self.n_layers, min_value=2)
        check_int(o, "n_people", self.n_people, min_value=4)
        check_choice(o, "device", self.device, ("auto", "cpu", "cuda"))

    # -- derived sizes -----------------------------------------------------------------------
    def effective(self) -> LabParams:
        """The sizes actually run: ``smoke`` shrinks steps, width, people and seeds."""
        if not self.smoke:
            return self
        return dataclasses.replace(self, steps=min(self.steps, 12), n_seeds=min(self.n_seeds, 2),
                                   batch_size=min(self.batch_size, 8), seq_len=min(self.seq_len, 64),
                                   d_model=32, n_people=min(self.n_people, 12))

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n_seeds)]

    def train_config(self, **overrides: Any) -> TrainConfig:
        fields = dict(steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr,
                      warmup_steps=max(1, self.steps // 10), eval_every=0, checkpoint_every=0,
                      eval_batches=2 if self.smoke else 8, recall_max_people=min(self.n_people, 64),
                      value_lr_multiplier=1.0, device=self.device, progress=False)
        fields.update(overrides)
        return TrainConfig(**fields)

    def data_config(self) -> KnowledgeConfig:
        # The knowledge base is the same for every seed: seeds vary the model init and batch order.
        return KnowledgeConfig(n_people=self.n_people, bios_per_person=4, seed=0)

    def model(self, plan: SparsePlan | None = None, **overrides: Any) -> ModelConfig:
        # Long enough for a bio prompt + answer (knowledge recall skips prompts longer than this).
        fields = dict(vocab_size=VOCAB_SIZE, d_model=self.d_model, n_layers=self.n_layers,
                      n_heads=max(1, self.d_model // 16), d_ff=4 * self.d_model,
                      max_seq_len=max(self.seq_len, 160), plan=plan or SparsePlan())
        fields.update(overrides)
        return ModelConfig(**fields)


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
