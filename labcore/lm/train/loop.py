"""Training and evaluation: one loop for notebooks (``train(...)``) and the CLI (``labcore train``).

One optimiser step ``s`` (0-based; after it ``step = s + 1`` steps are done)
---------------------------------------------------------------------------

::

    lr_s      = lr * (s + 1) / W                                          s < W (linear warmup)
              = lr * (r + (1 - r) * 0.5 * (1 + cos(pi * p)))             p = (s - W) / (S - 1 - W)   (cosine to r * lr)
    lr_values = lr_s * (1 + (M - 1) * max(0, 1 - s / T_v))               value-LR decay (papers.md §1.6)
    refresh_all(model)                         UltraMem: rank-1 SVD proxy of the Tucker cores, once per step
                                               (before the micro-batches: equal to the release's "after
                                               each optimizer.step()", and also right after a resume)
    for each of the A micro-batches (x, y) of B windows of T tokens:
        loss = CE(model(x), y) + aux_loss      aux_loss: the sparse layers' weighted aux losses
        (loss / A).backward()                  gradient accumulation: mean over the A micro-batches
    clip ||g||_2 to grad_clip; AdamW step with the labcore.optim parameter groups

(W warmup_steps, S steps, r min_lr_ratio, M value_lr_multiplier, T_v value_lr_end_step, A
grad_accum.) Parameter groups come from the layers' role tags (``labcore.optim.build_param_groups``):
matrices decayed, norm gains / keys / cores not decayed, memory value tables in their own group
whose learning rate is multiplied by the value-LR factor (``apply_value_lr``). The UltraMem paper
used M = 10 -> 1 (secondary sources), the release M = 4 over the whole run (the default here);
UltraMemV2 found a constant 1x better on long runs: set ``value_lr_multiplier: 1``.

Precision: on CUDA the forward runs under bf16 autocast (parameters and optimiser state stay
fp32); on CPU everything is fp32. ``dtype`` overrides ("fp32" or "bf16").

Run directory (``run_dir``)::

    history.jsonl          one JSON object per line, flushed as it is written: {"kind": "train",
                           "step", "loss", "aux_loss", "lr", "grad_norm", "tokens", "tokens_per_s", ...}
                           and {"kind": "eval", "step", "val_loss", "val_ppl", recall, memory/MoE
                           diagnostics}
    checkpoints/step-000100.pt   model, optimiser, schedule, sampler and RNG states (atomic writes;
                           the last ``keep_checkpoints`` are kept)
    train.json             the configs and the final metrics (written last, atomically)

``run.json`` (status running/done, see ``labcore.results.RunDir``) belongs to whoever owns the run:
a notebook wraps ``train(...)`` in its own ``RunDir``; ``labcore train`` (:func:`cli_main`) does the
same. ``train`` itself only appends to ``history.jsonl``, so both can log into one directory.

A run killed at any point resumes from its last checkpoint (``train(..., resume=True)``, the
default) and ends with exactly the state and metrics of an uninterrupted run (batches are a pure
function of the step, RNG states are restored, history lines after the checkpoint are dropped).
Bit-exact on the same device with the same torch thread count; a different thread count changes
float reduction order, so states then agree only to rounding.
A non-finite loss or gradient stops the run with :class:`NonFiniteLossError` naming the step and
the last good checkpoint.

Evaluation (every ``eval_every`` steps and at the end): validation loss and perplexity on
``eval_batches`` fixed validation batches; knowledge recall (bio prompts and held-out questions)
when the data is the knowledge base; associative-recall accuracy for recall data; and, from the
sparse layers' ``LayerAux`` records gathered over the evaluation batches, :func:`sparse_metrics`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from labcore.data import Dataset, data_config_from_dict, knowledge_recall, load_dataset
from labcore.data.knowledge import recall_items
from labcore.data.recall import associative_recall_accuracy
from labcore.layers.base import ConfigError, LayerAux, check_choice, check_float, check_int
from labcore.results import write_atomic

CHECKPOINT_FORMAT = 1

# ----------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs besides the model and the data (validated on construction).

    steps S: optimiser steps. batch_size B: sequences per micro-batch; grad_accum A micro-batches
    per step (B*A sequences of seq_len T tokens per step). lr: peak learning rate; min_lr_ratio r:
    final lr / peak; warmup_steps W. weight_decay, betas: AdamW. grad_clip: max global grad norm
    (0 = off). value_lr_multiplier M, value_lr_end_step T_v (None = steps): value-LR decay.
    eval_every / checkpoint_every: in steps (0 = only at the end). eval_batches: validation batches
    per evaluation. recall_max_people: people scored by knowledge recall per evaluation.
    device: "auto" | "cpu" | "cuda". dtype: "auto" (bf16 autocast on CUDA, fp32 on CPU) | "fp32" |
    "bf16". threads: torch CPU threads (None = leave as is). progress: tqdm bar.
    """

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
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

    def __post_init__(self) -> None:
        o = "TrainConfig"
        check_int(o, "steps", self.steps, min_value=1)
        check_int(o, "batch_size", self.batch_size, min_value=1, max_value=1 << 20)
        check_int(o, "seq_len", self.seq_len, min_value=1, max_value=1 << 20)
        check_float(o, "lr", self.lr, min_value=0.0, max_value=10.0, min_inclusive=False)
        check_float(o, "min_lr_ratio", self.min_lr_ratio, min_value=0.0, max_value=1.0)
        check_int(o, "warmup_steps", self.warmup_steps, min_value=0, max_value=self.steps)
        check_float(o, "weight_decay", self.weight_decay, min_value=0.0)
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
        return d

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


# ----------------------------------------------------------------------------------------------
# Schedules.
# ----------------------------------------------------------------------------------------------


def lr_at(cfg: TrainConfig, s: int) -> float:
    """Learning rate of optimiser step ``s`` (0-based): linear warmup then cosine to r * lr."""
    if s < cfg.warmup_steps:
        return cfg.lr * (s + 1) / cfg.warmup_steps
    span = cfg.steps - 1 - cfg.warmup_steps
    p = min(1.0, (s - cfg.warmup_steps) / span) if span > 0 else 0.0  # a lone step runs at the peak
    r = cfg.min_lr_ratio
    return cfg.lr * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p)))


def value_lr_schedule(cfg: TrainConfig):
    from labcore.optim import ValueLRSchedule

    return ValueLRSchedule(multiplier=cfg.value_lr_multiplier, end_step=cfg.value_lr_end_step or cfg.steps)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``labcore.optim.build_param_groups`` (roles: default / no_decay / memory_values)."""
    from labcore.optim import build_param_groups

    groups = build_param_groups(model, cfg.lr, cfg.weight_decay)
    n_opt = sum(p.numel() for g in groups for p in g["params"])
    n_all = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_opt != n_all:
        raise RuntimeError(f"build_param_groups covers {n_opt} parameters, the model has {n_all} trainable")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda")


def set_step_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, schedule: Any, s: int) -> float:
    """Set every group's lr for step ``s``: ``base_lr * lr_at(s) / lr``, times the value factor for
    the memory-value groups (``labcore.optim.apply_value_lr``). Returns the base lr of the step."""
    from labcore.optim import apply_value_lr

    lr = lr_at(cfg, s)
    apply_value_lr(optimizer, schedule, s, lr_scale=lr / cfg.lr)
    return lr


# ----------------------------------------------------------------------------------------------
# Diagnostics from LayerAux records.
# ----------------------------------------------------------------------------------------------

SUMMED_STATS = ("dropped_tokens",)


def sparse_metrics(records: Mapping[str, Sequence[LayerAux]], max_listed_slots: int = 128) -> dict[str, Any]:
    """Per sparse layer, from its ``LayerAux`` records over an evaluation window.

    With the hits per slot summed over the window, ``c_i`` (experts or value slots, i = 1..n) and
    ``p_i = c_i / sum c``:

        coverage            = |{i : c_i > 0}| / n             fraction of slots used at least once
        kl_uniform          = sum_i p_i log(p_i * n)          KL(usage || uniform), nats; 0 = even use
        load_max_over_mean  = max_i c_i / mean_i c_i          MoE imbalance (1 = perfect balance)
        load                = [c_1, ..., c_n]                  listed when n <= max_listed_slots (experts)
        tokens              = number of tokens seen

    and the mean over records of every ``stats`` entry (``top1_score``, ``output_std``, ``lambda1``,
    ``lambda2`` ...) except ``dropped_tokens``, which is summed (and also given as
    ``dropped_fraction`` of the tokens), plus the mean of each named aux loss ``loss_<name>``.
    A stats entry named like a window metric (a layer's own per-call ``coverage``) is kept as
    ``<metric>_per_batch``: coverage over the whole window is the number that shows collapse.
    When ``stats`` has no ``top1_score`` but ``scores`` exist, ``top1_score`` is the mean over
    tokens of the largest selected score. Keys are ``"<layer>/<metric>"``.
    """
    out: dict[str, Any] = {}
    for name, recs in records.items():
        recs = [r for r in recs if r is not None]
        if not recs:
            continue
        n_tok = sum(int(r.indices.shape[0]) for r in recs if r.indices is not None)
        counts = [r.counts for r in recs if r.counts is not None]
        if counts:
            c = torch.stack([x.detach().to("cpu", torch.float64) for x in counts]).sum(0)  # (n_slots,)
            n = c.numel()
            total = float(c.sum())
            out[f"{name}/coverage"] = float((c > 0).double().mean())
            if total > 0:
                p = c / total
                nz = p > 0
                out[f"{name}/kl_uniform"] = float((p[nz] * torch.log(p[nz] * n)).sum())
                out[f"{name}/load_max_over_mean"] = float(c.max() / c.mean())
            if n <= max_listed_slots:
                out[f"{name}/load"] = [int(v) for v in c.tolist()]
        if n_tok:
            out[f"{name}/tokens"] = n_tok
        keys = sorted({k for r in recs for k in r.stats})
        for k in keys:
            vals = [float(r.stats[k]) for r in recs if k in r.stats]
            if f"{name}/{k}" in out:  # a layer's per-call value of a window metric (coverage, ...)
                out[f"{name}/{k}_per_batch"] = float(np.mean(vals))
            elif k in SUMMED_STATS:
                out[f"{name}/{k}"] = float(sum(vals))
                if n_tok:
                    out[f"{name}/dropped_fraction"] = float(sum(vals)) / n_tok
            else:
                out[f"{name}/{k}"] = float(np.mean(vals))
        if "top1_score" not in keys:
            tops = [r.scores.detach().float().max(dim=-1).values for r in recs if r.scores is not None
                    and r.scores.numel()]
            if tops:
                out[f"{name}/top1_score"] = float(torch.cat(tops).mean())
        for k in sorted({k for r in recs for k in r.losses}):
            out[f"{name}/loss_{k}"] = float(np.mean([float(r.losses[k]) for r in recs if k in r.losses]))
    return out


# ----------------------------------------------------------------------------------------------
# Errors, results, helpers.
# ----------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the message names the step and the last good
    checkpoint (attributes ``step``, ``checkpoint``)."""

    def __init__(self, what: str, value: float, step: int, checkpoint: Path | None) -> None:
        ck = f"{checkpoint} (step {checkpoint_step(checkpoint)})" if checkpoint else "none (no checkpoint yet)"
        super().__init__(f"{what} is {value} at step {step}; stopping. Last good checkpoint: {ck}")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class TrainResult:
    """What ``train`` returns: the run directory, steps done, the final metrics (last train row +
    final eval), the whole history, the last checkpoint, the trained model, and the step a resumed
    run started from (None for a fresh run)."""

    run_dir: Path
    steps: int
    final: dict[str, Any]
    history: list[dict[str, Any]]
    checkpoint: Path | None
    model: nn.Module
    resumed_from: int | None = None
    data: Dataset | None = field(default=None, repr=False)


def checkpoint_step(path: Path) -> int:
    m = re.search(r"step-(\d+)\.pt$", str(path))
    if not m:
        raise ValueError(f"not a checkpoint file name: {path}")
    return int(m.group(1))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step-*.pt"), key=checkpoint_step)
    return ckpts[-1] if ckpts else None


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


class History:
    """``history.jsonl`` writer: one object per line, flushed; ``truncate(step)`` for resuming."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.exists():
            self.rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self._f = None

    def truncate(self, step: int) -> None:
        self.rows = [r for r in self.rows if r.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        if self._f is None:
            self._f = open(self.path, "a")
        self.rows.append(row)
        self._f.write(json.dumps(_json_safe(row)) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("TrainConfig.device='cuda' is not allowed here: torch.cuda.is_available() is False "
                          "(use 'auto' or 'cpu')")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast dtype, or None for plain fp32."""
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_config_dict(model_cfg: Any) -> dict[str, Any] | None:
    if hasattr(model_cfg, "to_dict"):
        return model_cfg.to_dict()
    if dataclasses.is_dataclass(model_cfg):
        return json.loads(json.dumps(dataclasses.asdict(model_cfg), default=str))
    return None


def _resume_identity(train_cfg: TrainConfig) -> dict[str, Any]:
    """The fields that must match between a checkpoint and the run resuming it."""
    d = train_cfg.to_dict()
    for k in ("device", "threads", "progress", "recall_max_people", "keep_checkpoints"):
        d.pop(k)
    return d


# ----------------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------------


def _forward(model: nn.Module, x: Tensor, y: Tensor | None = None):
    out = model(x, y)
    aux_loss = getattr(out, "aux_loss", None)
    return out, (aux_loss if aux_loss is not None else torch.zeros((), device=x.device))


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, cfg: TrainConfig, device: torch.device | None = None) -> dict[str, Any]:
    """Validation loss/perplexity, recall metrics and sparse-layer diagnostics (see module doc)."""
    device = device or next(model.parameters()).device
    amp = autocast_dtype(cfg, device)
    was_training = model.training
    model.eval()
    try:
        sampler = data.sampler("val", cfg.batch_size, cfg.seq_len, cfg.seed)
        losses: list[float] = []
        records: dict[str, list[LayerAux]] = {}
        for i in range(cfg.eval_batches):
            x, y = sampler.micro_batches(i)[0]
            with _autocast(device, amp):
                out, _ = _forward(model, x.to(device), y.to(device))
            losses.append(float(out.loss))
            for name, rec in (getattr(out, "aux", None) or {}).items():
                records.setdefault(name, []).append(rec)
        val_loss = float(np.mean(losses))
        metrics: dict[str, Any] = {"val_loss": val_loss,
                                   "val_ppl": math.exp(val_loss) if val_loss < 700 else float("inf")}
        metrics.update(sparse_metrics(records))
        max_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
        if data.kb is not None and cfg.recall_max_people > 0:
            for mode, key in (("bio", "recall_bio"), ("question", "recall_qa")):
                items = recall_items(data.kb, mode)
                longest = max(len(it.prompt.encode()) + len(it.answer.encode()) + 1 for it in items)
                if max_len is not None and longest > max_len:
                    metrics[f"{key}_skipped"] = f"prompt+answer up to {longest} tokens > max_seq_len {max_len}"
                    continue
                def fwd(idx: Tensor) -> Tensor:
                    with _autocast(device, amp):
                        return _forward(model, idx)[0].logits.float()
                res = knowledge_recall(fwd, data.kb, mode=mode, max_people=cfg.recall_max_people,
                                       device=device)
                metrics.update(res.as_metrics(key))
        if data.generator == "recall":
            row_len = data.config.row_len
            if max_len is None or row_len - 1 <= max_len:
                def fwd2(idx: Tensor) -> Tensor:
                    with _autocast(device, amp):
                        return _forward(model, idx)[0].logits.float()
                metrics["recall_acc"] = associative_recall_accuracy(fwd2, data, device=device)
    finally:
        model.train(was_training)
    return metrics


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------

Callback = Callable[[int, dict[str, Any]], None]


def _as_dataset(data: Any, cache_dir: str | Path | None | bool) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, Mapping):
        data = data_config_from_dict(data)
    return load_dataset(data, cache_dir)


def _build_model(model_cfg: Any, seed: int) -> tuple[nn.Module, dict[str, Any] | None]:
    if isinstance(model_cfg, nn.Module):
        return model_cfg, _model_config_dict(getattr(model_cfg, "cfg", None))
    from labcore.model import LM, ModelConfig

    if isinstance(model_cfg, Mapping):
        model_cfg = ModelConfig.from_dict(model_cfg)
    if not isinstance(model_cfg, ModelConfig):
        raise ConfigError(f"train: model_cfg={model_cfg!r} is not allowed: must be a ModelConfig, a "
                          f"mapping of its fields, or an nn.Module")
    torch.manual_seed(seed)
    return LM(model_cfg), model_cfg.to_dict()


def check_sizes(model: nn.Module, data: Dataset, cfg: TrainConfig) -> None:
    """Reject sizes that cannot work, naming the key, before any training work."""
    mcfg = getattr(model, "cfg", None)
    vocab = getattr(mcfg, "vocab_size", None)
    if vocab is not None and vocab < data.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is not allowed: the data's tokenizer has "
                          f"{data.vocab_size} ids (must be >= {data.vocab_size})")
    max_len = getattr(mcfg, "max_seq_len", None)
    if max_len is not None and cfg.seq_len > max_len:
        raise ConfigError(f"TrainConfig.seq_len={cfg.seq_len} is not allowed: must be <= the model's "
                          f"max_seq_len={max_len}")
    for split, toks in (("train", data.train), ("val", data.val)):
        if toks.size < cfg.seq_len + 1:
            raise ConfigError(f"TrainConfig.seq_len={cfg.seq_len} is not allowed: the {split} split has "
                              f"{toks.size} tokens, a window needs seq_len+1={cfg.seq_len + 1}")


def train(model_cfg: Any, train_cfg: TrainConfig | Mapping[str, Any], data: Any, run_dir: str | Path,
          callbacks: Sequence[Callback] | None = None, *, resume: bool = True,
          cache_dir: str | Path | None | bool = None) -> TrainResult:
    """Train ``model_cfg`` (a ModelConfig, its dict, or a ready nn.Module called as
    ``model(idx, targets) -> LMOutput``) on ``data`` (a Dataset, a data config or its dict).

    ``callbacks``: called as ``cb(step, row)`` after every optimiser step (after logging,
    evaluation and checkpointing of that step); an exception from a callback stops the run (the
    checkpoints stay: the run can be resumed). ``resume``: continue from the last checkpoint in
    ``run_dir`` if there is one (its config must match), else start fresh.
    """
    cfg = train_cfg if isinstance(train_cfg, TrainConfig) else TrainConfig.from_dict(train_cfg)
    run_dir = Path(run_dir)
    device = resolve_device(cfg)
    amp = autocast_dtype(cfg, device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    ds = _as_dataset(data, cache_dir)
    model, model_dict = _build_model(model_cfg, cfg.seed)
    check_sizes(model, ds, cfg)

    model.to(device).train()
    optimizer = build_optimizer(model, cfg, device)
    vsched = value_lr_schedule(cfg)
    sampler = ds.sampler("train", cfg.batch_size, cfg.seq_len, cfg.seed, grad_accum=cfg.grad_accum)
    from labcore.optim import refresh_all

    run_dir.mkdir(parents=True, exist_ok=True)
    history = History(run_dir / "history.jsonl")
    ckpt_dir = run_dir / "checkpoints"
    last_ckpt: Path | None = None
    resumed_from: int | None = None
    start = 0
    found = latest_checkpoint(run_dir) if resume else None
    if found is not None:
        state = torch.load(found, map_location=device, weights_only=False)
        if state.get("train_identity") != _resume_identity(cfg) or state.get("model_cfg") != model_dict \
                or state.get("data_key") != ds.manifest["key"]:
            raise ConfigError(f"run_dir={str(run_dir)!r} holds checkpoint {found.name} of a different "
                              f"configuration (train, model or data); use a new run_dir or resume=False")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"])
        start = resumed_from = int(state["step"])
        last_ckpt = found
        history.truncate(start)
    else:
        if history.rows or latest_checkpoint(run_dir) is not None:
            history.truncate(0)  # a fresh run in a used directory: forget old rows and checkpoints
            for p in ckpt_dir.glob("step-*.pt"):
                p.unlink()
        # RNG streams used during training (dropout, ...) start from the seed, not from wherever
        # model construction left them.
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)

    def save_checkpoint(step: int) -> Path:
        path = ckpt_dir / f"step-{step:06d}.pt"
        state = {"format": CHECKPOINT_FORMAT, "step": step, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": {"step": step, "lr": lr_at(cfg, step - 1)},
                 "sampler": sampler.state_dict(), "rng": _rng_state(), "train_cfg": cfg.to_dict(),
                 "train_identity": _resume_identity(cfg), "model_cfg": model_dict, "data_key": ds.manifest["key"]}
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".step-", suffix=".tmp", dir=ckpt_dir)
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for old in sorted(ckpt_dir.glob("step-*.pt"), key=checkpoint_step)[: -cfg.keep_checkpoints]:
            old.unlink()
        return path

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, desc=f"train {run_dir.name}",
               dynamic_ncols=True)
    params = [p for p in model.parameters() if p.requires_grad]
    final_eval: dict[str, Any] = {}
    last_row: dict[str, Any] = {}
    try:
        for s in range(start, cfg.steps):
            t0 = time.perf_counter()
            step = s + 1
            lr = set_step_lr(optimizer, cfg, vsched, s)
            refresh_all(model)  # once per optimiser step, before the micro-batches
            optimizer.zero_grad(set_to_none=True)
            micro = sampler.next()
            loss_sum = aux_sum = 0.0
            for m, (x, y) in enumerate(micro):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with _autocast(device, amp):
                    out, aux_loss = _forward(model, x, y)
                    loss = out.loss + aux_loss
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise NonFiniteLossError(f"loss (micro-batch {m})", lv, step, last_ckpt)
                (loss / cfg.grad_accum).backward()
                loss_sum += float(out.loss.detach())
                aux_sum += float(aux_loss.detach())
            if cfg.grad_clip > 0:
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            else:
                gnorm = float(torch.linalg.vector_norm(
                    torch.stack([p.grad.detach().float().norm() for p in params if p.grad is not None])))
            if not math.isfinite(gnorm):
                raise NonFiniteLossError("gradient norm", gnorm, step, last_ckpt)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            row = {"kind": "train", "step": step, "loss": loss_sum / cfg.grad_accum,
                   "aux_loss": aux_sum / cfg.grad_accum, "lr": lr,
                   "value_lr_factor": float(vsched.factor(s)), "grad_norm": gnorm,
                   "tokens": step * cfg.tokens_per_step, "step_time_s": dt,
                   "tokens_per_s": cfg.tokens_per_step / dt if dt > 0 else float("inf")}
            history.append(row)
            last_row = row
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                ev = {"kind": "eval", "step": step, "tokens": row["tokens"], **evaluate(model, ds, cfg, device)}
                history.append(ev)
                final_eval = ev
                bar.set_postfix(loss=f"{row['loss']:.4f}", val=f"{ev['val_loss']:.4f}", refresh=False)
            if step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                last_ckpt = save_checkpoint(step)
            for cb in callbacks or ():
                cb(step, row)
    finally:
        bar.close()
        history.close()

    if not final_eval:  # resumed from the final checkpoint: nothing left to run
        final_eval = next((r for r in reversed(history.rows) if r.get("kind") == "eval"
                           and r.get("step") == cfg.steps), None) or \
            {"kind": "eval", "step": cfg.steps, **evaluate(model, ds, cfg, device)}
        last_row = next((r for r in reversed(history.rows) if r.get("kind") == "train"), {})
    final = {"train_loss": last_row.get("loss"), **{k: v for k, v in final_eval.items() if k != "kind"}}
    write_atomic(run_dir / "train.json", json.dumps(_json_safe({
        "status": "done", "train": cfg.to_dict(), "model": model_dict, "data": ds.manifest,
        "final": final, "resumed_from": resumed_from, "checkpoint": str(last_ckpt) if last_ckpt else None,
    }), indent=1, default=str) + "\n")
    return TrainResult(run_dir, cfg.steps, final, history.rows, last_ckpt, model, resumed_from, ds)


# ----------------------------------------------------------------------------------------------
# CLI: labcore train CONFIG.yaml --out DIR
# ----------------------------------------------------------------------------------------------

CONFIG_SECTIONS = ("model", "plan", "data", "train")


def _yaml_loader():
    """PyYAML's SafeLoader reads ``1e-3`` as a string (YAML 1.1); accept it as a float."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))
    return Loader


def load_run_config(source: str | Path | Mapping[str, Any]) -> tuple[Any, TrainConfig, Any]:
    """YAML file (or its parsed mapping) with sections model, plan, data, train ->
    (ModelConfig, TrainConfig, data config). Everything is validated here, before any work.

    ``model.vocab_size`` defaults to the byte tokenizer's 259 and ``model.max_seq_len`` to
    ``train.seq_len`` when omitted.
    """
    import yaml

    from labcore.data.tokenizer import ByteTokenizer
    from labcore.model import ModelConfig

    if isinstance(source, Mapping):
        doc = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config={str(path)!r} is not allowed: must be an existing YAML file")
        doc = yaml.load(path.read_text(), Loader=_yaml_loader()) or {}
    if not isinstance(doc, Mapping):
        raise ConfigError(f"config: the YAML document must be a mapping with sections {CONFIG_SECTIONS}")
    unknown = sorted(set(doc) - set(CONFIG_SECTIONS))
    if unknown:
        raise ConfigError(f"config: unknown section(s) {unknown}; allowed sections: {list(CONFIG_SECTIONS)}")
    for sec in ("model", "data"):
        if not isinstance(doc.get(sec), Mapping):
            raise ConfigError(f"config: section {sec!r} is missing or not a mapping")
    tcfg = TrainConfig.from_dict(doc.get("train") or {})
    dcfg = data_config_from_dict(doc["data"])
    m = dict(doc["model"])
    if "plan" in m and "plan" in doc:
        raise ConfigError("config: give the plan either as section 'plan' or as model.plan, not both")
    if "plan" in doc:
        if not isinstance(doc["plan"], Mapping):
            raise ConfigError("config: section 'plan' must be a mapping (e.g. {kind: dense})")
        m["plan"] = doc["plan"]
    m.setdefault("vocab_size", ByteTokenizer().vocab_size)
    m.setdefault("max_seq_len", tcfg.seq_len)
    mcfg = ModelConfig.from_dict(m)
    return mcfg, tcfg, dcfg


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``labcore train CONFIG.yaml --out DIR [--device D] [--no-progress] [--fresh]``."""
    ap = argparse.ArgumentParser(prog="labcore train", description="Train a labcore LM from a YAML config "
                                 "with sections model, plan, data, train.")
    ap.add_argument("config", help="YAML file")
    ap.add_argument("--out", required=True, help="run directory (resumed if it has checkpoints)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override train.device")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--fresh", action="store_true", help="ignore checkpoints in --out and start over")
    ap.add_argument("--cache-dir", help="dataset cache directory (default data/cache)")
    args = ap.parse_args(argv)
    try:
        mcfg, tcfg, dcfg = load_run_config(args.config)
        over = {}
        if args.device:
            over["device"] = args.device
        if args.no_progress:
            over["progress"] = False
        if over:
            tcfg = dataclasses.replace(tcfg, **over)
    except ConfigError as e:
        print(f"labcore train: invalid config: {e}", file=sys.stderr)
        return 2
    from labcore.results import RunDir

    run = RunDir(args.out)
    if args.fresh:
        run.run_json.unlink(missing_ok=True)
    elif run.is_done():
        print(f"labcore train: {args.out} already holds a finished run (run.json status done); "
              "use --fresh to train it again", file=sys.stderr)
        return 0
    params = {"model": mcfg.to_dict(), "data": {"kind": generator_name(dcfg), **dataclasses.asdict(dcfg)},
              "train": tcfg.to_dict(), "config_file": str(Path(args.config).resolve())}
    run.start(params, notebook="labcore train", seed=tcfg.seed, device=str(resolve_device(tcfg)))
    try:
        res = train(mcfg, tcfg, dcfg, args.out, resume=not args.fresh, cache_dir=args.cache_dir)
    except BaseException as e:
        run.fail(e)
        raise
    scalars = {k: v for k, v in res.final.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    run.write_summary(scalars)
    run.finish(final=scalars, resumed_from=res.resumed_from)
    shown = {k: v for k, v in scalars.items() if "/" not in k}
    print(json.dumps({"run_dir": str(res.run_dir), "steps": res.steps, **shown}, indent=1))
    return 0


def generator_name(data_cfg: Any) -> str:
    from labcore.data.cache import generator_for

    return generator_for(data_cfg).name


if __name__ == "__main__":
    raise SystemExit(cli_main())
