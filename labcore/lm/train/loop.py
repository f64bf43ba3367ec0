"""The training loop: :func:`train`, for notebooks and for ``labcore train``.

One optimiser step ``s`` (0-based; after it ``step = s + 1`` steps are done)
---------------------------------------------------------------------------

::

    lr_s, lr_values = schedule(s)              labcore.lm.train.schedule (warmup, cosine, value-LR factor)
    refresh_all(model)                         UltraMem: rank-1 SVD proxy of the Tucker cores, once per step
                                               (before the micro-batches: equal to the release's "after
                                               each optimizer.step()", and also right after a resume)
    for each of the A micro-batches (x, y) of B windows of T tokens:
        loss = CE(model(x), y) + aux_loss      aux_loss: the sparse layers' weighted aux losses
        (loss / A).backward()                  gradient accumulation: mean over the A micro-batches
    clip ||g||_2 to grad_clip; AdamW step with the labcore.lm.optim parameter groups

(A grad_accum.) The UltraMem paper used a value-LR multiplier M = 10 -> 1 (secondary sources), the
release M = 4 over the whole run (the default here); UltraMemV2 found a constant 1x better on long
runs: set ``value_lr_multiplier: 1``.

Run directory (``run_dir``)::

    history.jsonl          one JSON object per line (labcore.lm.train.history)
    checkpoints/step-000100.pt   model, optimiser, schedule, sampler and RNG states (atomic writes;
                           the last ``keep_checkpoints`` are kept; labcore.lm.train.checkpoints)
    train.json             the configs and the final metrics (written last, atomically)

``run.json`` (status running/done, see ``labcore.results.RunDir``) belongs to whoever owns the run:
a notebook wraps ``train(...)`` in its own ``RunDir``; ``labcore train``
(:func:`labcore.lm.train.cli.cli_main`) does the same. ``train`` itself only appends to
``history.jsonl``, so both can log into one directory.

A run killed at any point resumes from its last checkpoint (``train(..., resume=True)``, the
default) and ends with exactly the state and metrics of an uninterrupted run (batches are a pure
function of the step, RNG states are restored, history lines after the checkpoint are dropped).
Bit-exact on the same device with the same torch thread count; a different thread count changes
float reduction order, so states then agree only to rounding.
A non-finite loss or gradient stops the run with :class:`NonFiniteLossError` naming the step and
the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from labcore.config import ConfigError
from labcore.data import Dataset, data_config_from_dict, load_dataset
from labcore.lm.model import LM, ModelConfig
from labcore.lm.optim import refresh_all
from labcore.lm.sparse_optim import clip_grad_norm_
from labcore.lm.train.checkpoints import (
    checkpoint_step,
    clear_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    resume_identity,
    save_checkpoint,
)
from labcore.lm.train.config import TrainConfig
from labcore.lm.train.device import (
    autocast,
    autocast_dtype,
    resolve_device,
    rng_state,
    seed_all,
    set_rng_state,
)
from labcore.lm.train.evaluation import evaluate, forward_with_aux
from labcore.lm.train.history import History, json_safe
from labcore.lm.train.optimizer import build_optimizer
from labcore.lm.train.schedule import lr_at, set_step_lr, value_lr_schedule
from labcore.results import write_atomic

Callback = Callable[[int, dict[str, Any]], None]


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


def _as_dataset(data: Any, cache_dir: str | Path | None | bool) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, Mapping):
        data = data_config_from_dict(data)
    return load_dataset(data, cache_dir)


def _model_config_dict(model_cfg: Any) -> dict[str, Any] | None:
    if hasattr(model_cfg, "to_dict"):
        return model_cfg.to_dict()
    if dataclasses.is_dataclass(model_cfg):
        return json.loads(json.dumps(dataclasses.asdict(model_cfg), default=str))
    return None


def _build_model(model_cfg: Any, seed: int) -> tuple[nn.Module, dict[str, Any] | None]:
    if isinstance(model_cfg, nn.Module):
        return model_cfg, _model_config_dict(getattr(model_cfg, "cfg", None))
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

    run_dir.mkdir(parents=True, exist_ok=True)
    history = History(run_dir / "history.jsonl")
    ckpt_dir = run_dir / "checkpoints"
    last_ckpt: Path | None = None
    resumed_from: int | None = None
    start = 0
    found = latest_checkpoint(run_dir) if resume else None
    if found is not None:
        state = load_checkpoint(found, device)
        if state.get("train_identity") != resume_identity(cfg) or state.get("model_cfg") != model_dict \
                or state.get("data_key") != ds.manifest["key"]:
            raise ConfigError(f"run_dir={str(run_dir)!r} holds checkpoint {found.name} of a different "
                              f"configuration (train, model or data); use a new run_dir or resume=False")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        start = resumed_from = int(state["step"])
        last_ckpt = found
        history.truncate(start)
    else:
        if history.rows or latest_checkpoint(run_dir) is not None:
            history.truncate(0)  # a fresh run in a used directory: forget old rows and checkpoints
            clear_checkpoints(run_dir)
        # RNG streams used during training (dropout, ...) start from the seed, not from wherever
        # model construction left them.
        seed_all(cfg.seed)

    def checkpoint(step: int) -> Path:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": {"step": step, "lr": lr_at(cfg, step - 1)}, "sampler": sampler.state_dict(),
                 "rng": rng_state(), "train_cfg": cfg.to_dict(), "train_identity": resume_identity(cfg),
                 "model_cfg": model_dict, "data_key": ds.manifest["key"]}
        return save_checkpoint(ckpt_dir, step, state, cfg.keep_checkpoints)


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
                with autocast(device, amp):
                    out, aux_loss = forward_with_aux(model, x, y)
                    loss = out.loss + aux_loss
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise NonFiniteLossError(f"loss (micro-batch {m})", lv, step, last_ckpt)
                (loss / cfg.grad_accum).backward()
                loss_sum += float(out.loss.detach())
                aux_sum += float(aux_loss.detach())
            if cfg.grad_clip > 0:
                gnorm = float(clip_grad_norm_(params, cfg.grad_clip))            # = torch's on dense grads
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
                last_ckpt = checkpoint(step)
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
    write_atomic(run_dir / "train.json", json.dumps(json_safe({
        "status": "done", "train": cfg.to_dict(), "model": model_dict, "data": ds.manifest,
        "final": final, "resumed_from": resumed_from, "checkpoint": str(last_ckpt) if last_ckpt else None,
    }), indent=1, default=str) + "\n")
    return TrainResult(run_dir, cfg.steps, final, history.rows, last_ckpt, model, resumed_from, ds)
