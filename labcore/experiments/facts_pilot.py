"""Fact memorisation on a CPU: train any labcore LM on a :mod:`labcore.data.facts` task, answer loss only.

:func:`train_facts` is a compact loop for rows of a few tokens: one optimiser step per batch of B
whole rows (the data sampler aligns windows to rows), the loss is the cross-entropy of the answer
token only (``labcore.data.facts.inputs_targets``: targets are -100 elsewhere), the optimiser,
parameter groups and learning-rate schedule are ``labcore.lm.train``'s (AdamW, warmup + cosine,
value-LR factor for memory tables, UltraMem's refresh once per step). It evaluates with
:func:`labcore.experiments.knowledge_metrics.evaluate_facts` on the fixed evaluation set: answer
loss, exact-match accuracy, stored bits and bits per parameter. No checkpoints, no history file:
it is for pilots and for notebooks that keep their own run directory.

``python -m labcore.experiments.facts_pilot`` trains the dense LM on a few fact counts at equal
steps and prints one line per count (load, parameters, exposures per fact, accuracy, stored bits,
bits per parameter). Two things limit the stored bits: capacity (Allen-Zhu & Li measure about 2
bits per parameter after ~1000 exposures per fact, about 1 after ~100) and, at a fixed number of
steps, exposures per fact, which fall as the fact count grows. ``exposures_per_fact`` is printed
so the two can be told apart; a capacity plateau shows as stored bits that stop growing while the
exposures per fact stay high.

``python -m labcore.experiments.facts_pilot --archs dense,pkm,ultramem --ratio 10 --seeds 0 1 2 ...``
instead runs :func:`run_cell` for every (fact count, architecture, seed) and prints one JSON row per
cell: dense, PKM and UltraMem at equal forward FLOPs per token (:func:`facts_model`), the memory
values at the paper's value-LR multiplier, with ``reads_per_value`` (training reads per value row)
beside ``exposures_per_fact``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from labcore.config import ConfigError, check_choice, check_float, check_int
from labcore.data.cache import load_dataset
from labcore.data.facts import FactsConfig, FactSet, answer_mask, inputs_targets
from labcore.experiments.knowledge_metrics import answer_scores, bits_per_param, evaluate_facts
from labcore.lm.budget import match_pkm, match_ultramem, model_budget
from labcore.lm.model import LM, ModelConfig
from labcore.lm.optim import refresh_all
from labcore.lm.sparse_optim import clip_grad_norm_
from labcore.lm.train import TrainConfig, build_optimizer, resolve_device, set_step_lr, value_lr_schedule


@dataclass
class FactsRun:
    """What :func:`train_facts` returns: the trained model, its parameter count, the final metrics
    (``answer_accuracy``, ``answer_loss``, ``stored_bits``, ``bits_per_param``, and the same with a
    ``held_out_`` prefix when the task has held-out phrasings), the history (train rows every
    ``log_every`` steps, eval rows), seconds of training and the facts."""

    model: nn.Module
    n_params: int
    final: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    facts: FactSet | None = None


def _eval(model: nn.Module, facts: FactSet, n_params: int, device: torch.device) -> dict[str, float]:
    out: dict[str, float] = {}
    splits = ("stored", "held_out") if facts.config.held_out_phrasings else ("stored",)
    for split in splits:
        m = evaluate_facts(model, facts.eval_set(split), facts.answer_space, device=device)
        m["bits_per_param"] = bits_per_param(m["stored_bits"], n_params)
        prefix = "" if split == "stored" else "held_out_"
        out.update({prefix + k: v for k, v in m.items()})
    return out


def train_facts(model_cfg: ModelConfig | nn.Module, facts_cfg: FactsConfig, train_cfg: TrainConfig, *,
                log_every: int = 50, eval_every: int = 0, cache_dir: Any = False,
                log: Callable[[dict[str, Any]], None] | None = None) -> FactsRun:
    """Train on the answer tokens of ``facts_cfg`` for ``train_cfg.steps`` steps of
    ``train_cfg.batch_size`` rows (``seq_len`` must be ``row_len - 1``; ``grad_accum`` 1).
    ``eval_every``: also evaluate every that many steps (0: only at the end). ``log`` receives every
    history row. The model is built with ``torch.manual_seed(train_cfg.seed)``."""
    if not isinstance(facts_cfg, FactsConfig):
        raise ConfigError(f"train_facts: facts_cfg={facts_cfg!r} is not allowed: must be a FactsConfig")
    if train_cfg.seq_len != facts_cfg.row_len - 1:
        raise ConfigError(f"TrainConfig.seq_len={train_cfg.seq_len} is not allowed for this facts task: must "
                          f"be row_len - 1 = {facts_cfg.row_len - 1} (one row per sequence)")
    if train_cfg.grad_accum != 1:
        raise ConfigError(f"TrainConfig.grad_accum={train_cfg.grad_accum} is not allowed here: must be 1")
    if train_cfg.threads is not None:
        torch.set_num_threads(train_cfg.threads)
    device = resolve_device(train_cfg)
    ds = load_dataset(facts_cfg, cache_dir)
    facts: FactSet = ds.extras["facts"]
    if isinstance(model_cfg, nn.Module):
        model = model_cfg
    else:
        torch.manual_seed(train_cfg.seed)
        model = LM(model_cfg)
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if vocab is not None and vocab < ds.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is not allowed: must be >= {ds.vocab_size} (the byte ids)")
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, train_cfg, device)
    vsched = value_lr_schedule(train_cfg)
    sampler = ds.sampler("train", train_cfg.batch_size, train_cfg.seq_len, train_cfg.seed)
    mask = torch.from_numpy(answer_mask(train_cfg.batch_size, facts_cfg.row_len))
    params = [p for p in model.parameters() if p.requires_grad]
    history: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        history.append(row)
        if log is not None:
            log(row)

    t0 = time.perf_counter()
    eval_seconds = 0.0
    for s in range(train_cfg.steps):
        lr = set_step_lr(optimizer, train_cfg, vsched, s)
        refresh_all(model)
        optimizer.zero_grad(set_to_none=True)
        x, y = inputs_targets(sampler.batch(s), mask)  # (B, row_len - 1) each
        x, y = x.to(device), y.to(device)
        out = model(x, y)
        loss = out.loss + out.aux_loss
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"train_facts: loss is {float(loss)} at step {s + 1}")
        loss.backward()
        if train_cfg.grad_clip > 0:
            clip_grad_norm_(params, train_cfg.grad_clip)                    # takes sparse value grads too
        optimizer.step()
        step = s + 1
        if log_every and (step % log_every == 0 or step == train_cfg.steps):
            sc = answer_scores(out.logits.detach(), y, y != -100)
            emit({"kind": "train", "step": step, "lr": lr, "answer_loss": sc.loss, "answer_accuracy": sc.accuracy,
                  "seconds": time.perf_counter() - t0 - eval_seconds})
        if eval_every and step % eval_every == 0 and step != train_cfg.steps:
            te = time.perf_counter()
            emit({"kind": "eval", "step": step, **_eval(model, facts, n_params, device)})
            eval_seconds += time.perf_counter() - te
    seconds = time.perf_counter() - t0 - eval_seconds
    final = _eval(model, facts, n_params, device)
    emit({"kind": "eval", "step": train_cfg.steps, **final})
    return FactsRun(model, n_params, final, history, seconds, facts)


# ----------------------------------------------------------------------------------------------
# The pilot: a dense LM, several fact counts, equal steps.
# ----------------------------------------------------------------------------------------------


def dense_model(d_model: int = 32, n_layers: int = 2, n_heads: int = 2, d_ff: int = 128,
                max_seq_len: int = 16) -> ModelConfig:
    """A small dense LM for the byte ids (vocab 259)."""
    return ModelConfig(vocab_size=259, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff,
                       max_seq_len=max_seq_len)


ARCHS = ("dense", "pkm", "ultramem")


def memory_shape(arch: str, base: ModelConfig) -> dict[str, Any]:
    """The default memory of ``arch`` ("pkm" or "ultramem") on the dense trunk ``base`` (width D, L
    blocks), as keywords of ``labcore.lm.budget.match_pkm`` / ``match_ultramem``.

    Both sit in parallel to the FFN of block L // 2 (PKM's intermediate layer, arXiv 1907.05242 §4).
    PKM: the PKM paper's best setting, 4 heads x top-32, D/2 key features. UltraMem: TDQKR (rank 2)
    with 2 cores and raw scores (docs/mechanisms.md §1.3, §1.5), 2 heads x top-32, D/4 key features
    per side, full-width values, no IVE (E = 1), no skip. The paper's IVE (E = 4) with half-width
    values and projection, and a skip placement, are left to the ablations: on a trunk this small
    they slow the learning of facts a lot (a skip "0:1" query sees a single attention layer), and
    with E = 4 the key scores fit the dense FLOPs only at D/8 key features.
    """
    check_choice("memory_shape", "arch", arch, ARCHS[1:])
    D, mid = base.d_model, base.n_layers // 2
    place = (f"{mid}:{mid}",)
    if arch == "pkm":
        return {"heads": 4, "top_k": 32, "k_dim": max(2, D // 2), "placements": place}
    return {"heads": 2, "top_k": 32, "k_dim": max(1, D // 4), "d_value": D, "value_proj": False, "expansion": 1,
            "placements": place}


def facts_model(arch: str, base: ModelConfig | None = None, *, ratio: float = 10.0, context_len: int = 5,
                memory: dict[str, Any] | None = None) -> ModelConfig:
    """``arch`` ("dense", "pkm" or "ultramem") built on the dense ``base`` (default
    :func:`dense_model`): the memory models have ``(1 + ratio)`` times the base's parameters and its
    forward FLOPs per token (over ``context_len`` keys; ``labcore.lm.budget.match_pkm`` /
    ``match_ultramem``, d_ff searched in multiples of 4). ``memory``: keywords of the matcher (the
    memory's shape and ``placements``) that replace those of :func:`memory_shape`."""
    check_choice("facts_model", "arch", arch, ARCHS)
    check_float("facts_model", "ratio", ratio, min_value=0.0, min_inclusive=False)
    base = base or dense_model()
    if arch == "dense":
        return base
    target = round((1 + ratio) * model_budget(base, context_len=context_len).total_params)
    kw = {**memory_shape(arch, base), **(memory or {})}
    match = match_pkm if arch == "pkm" else match_ultramem
    return match(base, target, context_len=context_len, multiple_of=4, **kw)


def memory_reads(cfg: ModelConfig) -> tuple[int, int]:
    """(value rows N, rows one token reads H*K) summed over the memories of ``cfg`` ((0, 0) when dense)."""
    if cfg.plan.kind != "memory":
        return 0, 0
    c = cfg.plan.memory.cost()
    n_mem = 1 if cfg.plan.shared_values else len(cfg.plan.placements)
    return c.n_units * n_mem, c.units_per_token * len(cfg.plan.placements)


def run_cell(arch: str, n_facts: int, *, steps: int, seed: int = 0, base: ModelConfig | None = None,
             ratio: float = 10.0, memory: dict[str, Any] | None = None, model_cfg: ModelConfig | None = None,
             batch_size: int = 1024, lr: float = 3e-3, value_lr_multiplier: float = 10.0,
             n_relations: int = 4, n_objects: int = 128, warmup_steps: int = 20, threads: int | None = 1,
             eval_every: int = 0) -> dict[str, Any]:
    """Train one (architecture, size, seed) cell of a facts experiment and return its summary row.

    The model is ``model_cfg`` if given, else ``facts_model(arch, base, ratio=..., memory=...)``. The
    task has ``n_facts`` facts (``n_subjects = n_facts // n_relations``, facts drawn with ``seed``,
    which also seeds the initialisation and batch order, so two architectures at one seed are a
    pair). Training: AdamW, no weight decay, warmup + cosine, memory values at ``value_lr_multiplier``
    times the lr decaying linearly to 1x over the run (arXiv 2411.12364: 10x; docs/mechanisms.md
    §1.6). Row keys: arch, seed, n_facts, load_kbit, steps, batch_size, total_params,
    active_params, flops_per_token, n_values (memory value rows, 0 for dense), exposures_per_fact
    (steps * batch_size / n_facts), reads_per_value (answer-token reads per value row, steps *
    batch_size * H*K / N: how often training touches one row), seconds (training, without evaluation),
    cpu_seconds (process CPU time of the whole cell), answer_accuracy, answer_loss, stored_kbit,
    bits_per_param (stored bits / total parameters), curve (eval rows every ``eval_every`` steps:
    step, answer_accuracy, stored_kbit, the final evaluation last;
    empty when 0).
    """
    check_int("run_cell", "n_facts", n_facts, min_value=n_relations)
    check_int("run_cell", "steps", steps, min_value=1)
    if n_facts % n_relations:
        raise ConfigError(f"run_cell: n_facts={n_facts} is not allowed: must be a multiple of "
                          f"n_relations={n_relations}")
    cpu0 = time.process_time()
    cfg = model_cfg if model_cfg is not None else facts_model(arch, base, ratio=ratio, memory=memory)
    fcfg = FactsConfig(n_subjects=n_facts // n_relations, n_relations=n_relations, n_objects=n_objects, seed=seed)
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=fcfg.row_len - 1, lr=lr,
                       warmup_steps=min(warmup_steps, steps), weight_decay=0.0,
                       value_lr_multiplier=value_lr_multiplier, eval_every=0, checkpoint_every=0, seed=seed,
                       device="cpu", threads=threads, progress=False)
    run = train_facts(cfg, fcfg, tcfg, log_every=0, eval_every=eval_every)
    b = model_budget(cfg, context_len=fcfg.row_len - 1)
    n_values, reads = memory_reads(cfg)
    f = run.final
    return {"arch": arch, "seed": seed, "n_facts": fcfg.n_facts, "load_kbit": fcfg.knowledge_bits / 1e3,
            "steps": steps, "batch_size": batch_size, "total_params": run.n_params,
            "active_params": b.active_params, "flops_per_token": b.flops_per_token, "n_values": n_values,
            "exposures_per_fact": steps * batch_size / fcfg.n_facts,
            "reads_per_value": steps * batch_size * reads / n_values if n_values else float("nan"),
            "seconds": run.seconds, "cpu_seconds": time.process_time() - cpu0,
            "answer_accuracy": f["answer_accuracy"], "answer_loss": f["answer_loss"],
            "stored_kbit": f["stored_bits"] / 1e3, "bits_per_param": f["bits_per_param"],
            "curve": [{"step": r["step"], "answer_accuracy": r["answer_accuracy"],
                       "stored_kbit": r["stored_bits"] / 1e3} for r in run.history
                      if r["kind"] == "eval" and eval_every]}


def pilot(fact_counts: Sequence[int], *, steps: int = 300, batch_size: int = 1024, lr: float = 3e-3,
          n_relations: int = 4, n_objects: int = 128, model: ModelConfig | None = None, seed: int = 0,
          threads: int | None = 1, log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Train ``model`` (default :func:`dense_model`) for ``steps`` steps on each fact count
    (``n_subjects = count // n_relations``) and return one summary row per count."""
    model = model or dense_model()
    rows = []
    for count in fact_counts:
        if count % n_relations:
            raise ConfigError(f"pilot: fact count {count} is not allowed: must be a multiple of "
                              f"n_relations={n_relations}")
        fcfg = FactsConfig(n_subjects=count // n_relations, n_relations=n_relations, n_objects=n_objects,
                           seed=seed)
        tcfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=fcfg.row_len - 1, lr=lr,
                           warmup_steps=min(20, steps), weight_decay=0.0, eval_every=0, checkpoint_every=0,
                           seed=seed, device="cpu", threads=threads, progress=False)
        run = train_facts(model, fcfg, tcfg, log_every=max(1, steps // 4))
        row = {"n_facts": fcfg.n_facts, "load_kbit": fcfg.knowledge_bits / 1e3, "n_params": run.n_params,
               "steps": steps, "exposures_per_fact": steps * batch_size / fcfg.n_facts,
               "seconds": run.seconds, "answer_accuracy": run.final["answer_accuracy"],
               "answer_loss": run.final["answer_loss"], "stored_kbit": run.final["stored_bits"] / 1e3,
               "bits_per_param": run.final["bits_per_param"],
               "train_curve_accuracy": [round(r["answer_accuracy"], 4) for r in run.history
                                        if r["kind"] == "train"]}
        rows.append(row)
        if log is not None:
            log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labcore.experiments.facts_pilot",
                                 description="Dense LM on fact memorisation at several fact counts.")
    ap.add_argument("--facts", default="2000,8000,32000", help="comma-separated fact counts")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--n-objects", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--d-ff", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--archs", default="", help="comma-separated architectures (dense, pkm, ultramem): run "
                    "run_cell per (fact count, arch, seed) instead of the dense pilot")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the cells (default: --seed)")
    ap.add_argument("--ratio", type=float, default=10.0, help="memory params / dense params (cells)")
    ap.add_argument("--value-lr-multiplier", type=float, default=10.0, help="value-LR multiplier (cells)")
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate every that many steps (cells)")
    args = ap.parse_args(argv)
    try:
        counts = [int(c) for c in args.facts.split(",") if c.strip()]
        model = dense_model(d_model=args.d_model, n_layers=args.n_layers, d_ff=args.d_ff)
        if args.archs:
            for count in counts:
                for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
                    for seed in args.seeds or [args.seed]:
                        row = run_cell(arch, count, steps=args.steps, seed=seed, base=model, ratio=args.ratio,
                                       batch_size=args.batch_size, lr=args.lr,
                                       value_lr_multiplier=args.value_lr_multiplier, n_objects=args.n_objects,
                                       threads=args.threads, eval_every=args.eval_every)
                        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                          for k, v in row.items()}), flush=True)
            return 0
        pilot(counts, steps=args.steps, batch_size=args.batch_size, lr=args.lr, n_objects=args.n_objects,
              model=model, seed=args.seed, threads=args.threads)
    except (ConfigError, ValueError) as e:
        print(f"facts_pilot: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


