"""The training run's settings: :class:`TrainConfig` (frozen, validated on construction)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from labcore.config import ConfigError, check_choice, check_float, check_int
from labcore.lm.optim import resolve_decay

OPTIMIZERS = ("adamw", "lazy_adamw")


@dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs besides the model and the data (validated on construction).

    steps S: optimiser steps. batch_size B: sequences per micro-batch; grad_accum A micro-batches
    per step (B*A sequences of seq_len T tokens per step). lr: peak learning rate; min_lr_ratio r:
    final lr / peak; warmup_steps W. weight_decay, betas: AdamW. grad_clip: max global grad norm
    (0 = off). weight_decay_kinds: which parameters besides matrices get ``weight_decay``
    (``labcore.lm.optim.build_param_groups``'s ``decay``): "default" (none: keys, Tucker cores, norm
    gains and memory values undecayed), "release" (all four, as the UltraMem release; values decay at
    the value lr), or a list of kinds from "keys", "cores", "norms", "values".
    value_lr_multiplier M, value_lr_end_step T_v (None = steps): value-LR decay.
    eval_every / checkpoint_every: in steps (0 = only at the end). eval_batches: validation batches
    per evaluation. recall_max_people: people scored by knowledge recall per evaluation.
    device: "auto" | "cpu" | "cuda". dtype: "auto" (bf16 autocast on CUDA, fp32 on CPU) | "fp32" |
    "bf16". threads: torch CPU threads (None = leave as is). progress: tqdm bar.
    optimizer: "adamw" (torch AdamW on every parameter) | "lazy_adamw" (memory value tables updated
    only on the rows a step touches, :class:`labcore.lm.sparse_optim.LazyAdamW`; the PKM authors'
    ``--mem_sparse`` idea); lazy_bias_correction: "row" (each row's own step count) | "global".
    """

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    weight_decay_kinds: str | tuple[str, ...] = "default"
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    grad_accum: int = 1
    value_lr_multiplier: float = 4.0
    value_lr_end_step: int | None = None
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    recall_max_people: int = 64
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    progress: bool = True
    optimizer: str = "adamw"
    lazy_bias_correction: str = "row"

    def __post_init__(self) -> None:
        o = "TrainConfig"
        check_int(o, "steps", self.steps, min_value=1)
        check_int(o, "batch_size", self.batch_size, min_value=1, max_value=1 << 20)
        check_int(o, "seq_len", self.seq_len, min_value=1, max_value=1 << 20)
        check_float(o, "lr", self.lr, min_value=0.0, max_value=10.0, min_inclusive=False)
        check_float(o, "min_lr_ratio", self.min_lr_ratio, min_value=0.0, max_value=1.0)
        check_int(o, "warmup_steps", self.warmup_steps, min_value=0, max_value=self.steps)
        check_float(o, "weight_decay", self.weight_decay, min_value=0.0)
        if isinstance(self.weight_decay_kinds, list):
            object.__setattr__(self, "weight_decay_kinds", tuple(self.weight_decay_kinds))
        resolve_decay(self.weight_decay_kinds, owner=f"{o}.weight_decay_kinds")
        betas = tuple(self.betas) if isinstance(self.betas, list | tuple) else self.betas
        if not isinstance(betas, tuple) or len(betas) != 2:
            raise ConfigError(f"{o}.betas={self.betas!r} is not allowed: must be two numbers in [0, 1)")
        for b in betas:
            if isinstance(b, bool) or not isinstance(b, int | float) or not 0.0 <= b < 1.0:
                raise ConfigError(f"{o}.betas={self.betas!r} is not allowed: must be two numbers in [0, 1)")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        check_float(o, "grad_clip", self.grad_clip, min_value=0.0)
        check_int(o, "grad_accum", self.grad_accum, min_value=1, max_value=1 << 16)
        check_float(o, "value_lr_multiplier", self.value_lr_multiplier, min_value=1.0)
        if self.value_lr_end_step is not None:
            check_int(o, "value_lr_end_step", self.value_lr_end_step, min_value=1)
        check_int(o, "eval_every", self.eval_every, min_value=0)
        check_int(o, "eval_batches", self.eval_batches, min_value=1)
        check_int(o, "checkpoint_every", self.checkpoint_every, min_value=0)
        check_int(o, "keep_checkpoints", self.keep_checkpoints, min_value=1)
        check_int(o, "recall_max_people", self.recall_max_people, min_value=0)
        check_int(o, "seed", self.seed, min_value=0, max_value=2**63 - 1)
        check_choice(o, "device", self.device, ("auto", "cpu", "cuda"))
        check_choice(o, "dtype", self.dtype, ("auto", "fp32", "bf16"))
        check_choice(o, "optimizer", self.optimizer, OPTIMIZERS)
        check_choice(o, "lazy_bias_correction", self.lazy_bias_correction, ("row", "global"))
        if self.threads is not None:
            check_int(o, "threads", self.threads, min_value=1, max_value=1024)
        if not isinstance(self.progress, bool):
            raise ConfigError(f"{o}.progress={self.progress!r} is not allowed: must be true or false")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """From YAML / notebook parameters: unknown keys and wrong types raise ConfigError."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"train={data!r} is not allowed: must be a mapping of TrainConfig fields")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"TrainConfig: unknown key(s) {unknown}; allowed keys: {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        if isinstance(self.weight_decay_kinds, tuple):
            d["weight_decay_kinds"] = list(self.weight_decay_kinds)
        return d

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len
