"""Training-throughput benchmark: dense, MoE and every registered memory LM at equal budget, same run.

``python -m labcore.bench.training`` (or ``labcore bench training``) builds the equal-budget family
of :func:`labcore.lm.budget.equal_budget_family` from one dense base (the models have equal
forward FLOPs per token; the three sparse ones equal total parameters, ``ratio`` x the dense model's
on top of it, the paper's "x12"), and times full training steps exactly as :func:`labcore.lm.train.train`
runs them::

    refresh_all(model); zero_grad; loss = CE + aux_loss (autocast policy of TrainConfig); backward;
    AdamW step over labcore.lm.optim's parameter groups

on batches of the knowledge data set (B x T tokens). The models are timed in alternating rounds
(``rounds`` x ``repeats`` steps each, after ``warmup`` untimed steps) so that a noisy neighbour slows
them alike; each reported step time is the median over all samples with its interquartile range.

Columns
-------
tokens_per_s      B*T / median step time
vs_dense          tokens_per_s / dense tokens_per_s (same run; < 1: slower than dense)
sparse_share      time inside the sparse layers (MoE blocks, memories), forward + backward, / step time
optim_share       time in ``optimizer.step()`` / step time (AdamW touches every parameter every step:
                  for memory models that is the whole value table, the price of a dense optimiser)

How the sparse-layer time is measured: forward pre/post hooks and full backward pre/post hooks on
each sparse layer read ``time.perf_counter`` (after ``torch.cuda.synchronize()`` on a GPU, which
serialises the step a little; the share is then an upper bound). On the CPU, autograd runs a layer's
backward nodes contiguously enough for the pre/post pair to bracket them; the MoE/memory
``aux_loss`` branches add small nodes outside the bracket, so the share is slightly low.

Numbers from a shared 2-core machine are noisy; the lead re-runs this on a quiet machine for the
record. Ratios are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from labcore.config import check_choice, check_float, check_int
from labcore.data import KnowledgeConfig, load_dataset
from labcore.lm.budget import equal_budget_family, family_names, model_budget, small_base_config
from labcore.lm.model import LM
from labcore.lm.optim import refresh_all
from labcore.lm.train import TrainConfig, autocast_dtype, build_optimizer, set_step_lr, value_lr_schedule
from labcore.lm.train.config import OPTIMIZERS


@dataclass(frozen=True)
class TrainBenchConfig:
    """Sizes of the benchmark. The base dense model: vocab 259 (bytes), d_model D, n_layers L,
    n_heads, d_ff; context T = seq_len; batch B. ratio: sparse / dense parameters."""

    d_model: int = 128
    n_layers: int = 8
    n_heads: int = 4
    d_ff: int = 512
    seq_len: int = 128
    batch_size: int = 8
    ratio: float = 12.0
    warmup: int = 2
    rounds: int = 3
    repeats: int = 2
    threads: int = 2
    seed: int = 0
    device: str = "cpu"
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        o = "TrainBenchConfig"
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "seq_len", "batch_size", "rounds", "repeats",
                     "threads"):
            check_int(o, name, getattr(self, name), min_value=1)
        check_int(o, "warmup", self.warmup, min_value=0)
        check_int(o, "seed", self.seed, min_value=0)
        check_float(o, "ratio", self.ratio, min_value=0.0, min_inclusive=False)
        check_choice(o, "optimizer", self.optimizer, OPTIMIZERS)


QUICK = dict(d_model=64, n_layers=4, n_heads=2, d_ff=256, seq_len=64, batch_size=8, warmup=1, rounds=2,
             repeats=2)


class SparseTimer:
    """Accumulates wall time spent inside a set of modules, forward and backward (see module doc)."""

    def __init__(self, modules: Sequence[nn.Module], device: torch.device) -> None:
        self.device = device
        self.forward_s = 0.0
        self.backward_s = 0.0
        self._t_fwd: dict[int, float] = {}
        self._t_bwd: dict[int, float] = {}
        self.handles = []
        for m in modules:
            self.handles += [m.register_forward_pre_hook(self._fwd_pre), m.register_forward_hook(self._fwd_post),
                             m.register_full_backward_pre_hook(self._bwd_pre),
                             m.register_full_backward_hook(self._bwd_post)]

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _fwd_pre(self, module, args):
        self._t_fwd[id(module)] = self._now()

    def _fwd_post(self, module, args, output):
        self.forward_s += self._now() - self._t_fwd.pop(id(module))

    def _bwd_pre(self, module, grad_output):
        self._t_bwd[id(module)] = self._now()

    def _bwd_post(self, module, grad_input, grad_output):
        start = self._t_bwd.pop(id(module), None)
        if start is not None:
            self.backward_s += self._now() - start

    def reset(self) -> None:
        self.forward_s = self.backward_s = 0.0
        self._t_fwd.clear()
        self._t_bwd.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class Sample:
    step_s: float
    sparse_fwd_s: float
    sparse_bwd_s: float
    optim_s: float


class Runner:
    """One architecture: its model, optimiser, sampler and hook timer; ``step()`` times one step."""

    def __init__(self, name: str, model_cfg, bcfg: TrainBenchConfig, data, device: torch.device) -> None:
        self.name = name
        torch.manual_seed(bcfg.seed)
        self.model = LM(model_cfg).to(device).train()
        self.tcfg = TrainConfig(steps=10_000, batch_size=bcfg.batch_size, seq_len=bcfg.seq_len, warmup_steps=0,
                                device=bcfg.device, progress=False, seed=bcfg.seed, optimizer=bcfg.optimizer)
        self.opt = build_optimizer(self.model, self.tcfg, device)
        self.vsched = value_lr_schedule(self.tcfg)
        self.amp = autocast_dtype(self.tcfg, device)
        self.sampler = data.sampler("train", bcfg.batch_size, bcfg.seq_len, bcfg.seed)
        self.device = device
        self.timer = SparseTimer([m for _, m in self.model.sparse_layers()], device)
        self.samples: list[Sample] = []
        self.s = 0

    def step(self, record: bool) -> None:
        (x, y), = self.sampler.next()
        x, y = x.to(self.device), y.to(self.device)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self.timer.reset()
        sync()
        t0 = time.perf_counter()
        set_step_lr(self.opt, self.tcfg, self.vsched, self.s)
        refresh_all(self.model)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            out = self.model(x, y)
            loss = out.loss + out.aux_loss
        loss.backward()
        sync()
        t1 = time.perf_counter()
        self.opt.step()
        sync()
        t2 = time.perf_counter()
        self.s += 1
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"{self.name}: non-finite loss at benchmark step {self.s}")
        if record:
            self.samples.append(Sample(t2 - t0, self.timer.forward_s, self.timer.backward_s, t2 - t1))


def _iqr(x: Sequence[float]) -> float:
    q1, q3 = np.percentile(np.asarray(x), [25, 75])
    return float(q3 - q1)


def run(bcfg: TrainBenchConfig, archs: Sequence[str] | None = None) -> pd.DataFrame:
    """Build the family, time every architecture (default: all of ``family_names()``) in alternating
    rounds, return one row each."""
    archs = family_names() if archs is None else tuple(archs)
    device = torch.device(bcfg.device)
    torch.set_num_threads(bcfg.threads)
    base = small_base_config(vocab_size=259, d_model=bcfg.d_model, n_layers=bcfg.n_layers,
                             n_heads=bcfg.n_heads, d_ff=bcfg.d_ff, max_seq_len=bcfg.seq_len)
    family = equal_budget_family(base, ratio=bcfg.ratio, context_len=bcfg.seq_len, names=archs)
    data = load_dataset(KnowledgeConfig(n_people=200, bios_per_person=2, seed=bcfg.seed), cache_dir=False)
    runners = [Runner(a, family[a], bcfg, data, device) for a in archs]
    for r in runners:
        for _ in range(bcfg.warmup):
            r.step(record=False)
    for _ in range(bcfg.rounds):
        for r in runners:
            for _ in range(bcfg.repeats):
                r.step(record=True)
    rows = []
    tokens = bcfg.batch_size * bcfg.seq_len
    for r in runners:
        b = model_budget(family[r.name], context_len=bcfg.seq_len)
        steps = [s.step_s for s in r.samples]
        total = sum(steps)
        med = float(np.median(steps))
        rows.append({
            "arch": r.name, "total_params": b.total_params, "active_params": b.active_params,
            "fwd_flops_per_token": b.flops_per_token, "step_ms": 1e3 * med, "step_iqr_ms": 1e3 * _iqr(steps),
            "tokens_per_s": tokens / med,
            "sparse_share": sum(s.sparse_fwd_s + s.sparse_bwd_s for s in r.samples) / total,
            "sparse_fwd_share": sum(s.sparse_fwd_s for s in r.samples) / total,
            "optim_share": sum(s.optim_s for s in r.samples) / total,
            "samples": len(steps),
        })
        r.timer.remove()
    df = pd.DataFrame(rows)
    if "dense" in set(df["arch"]):
        dense_tps = float(df.loc[df["arch"] == "dense", "tokens_per_s"].iloc[0])
        df.insert(df.columns.get_loc("tokens_per_s") + 1, "vs_dense", df["tokens_per_s"] / dense_tps)
    return df


def format_table(df: pd.DataFrame) -> str:
    show = df.copy()
    for col in ("total_params", "active_params", "fwd_flops_per_token"):
        show[col] = show[col].map(lambda v: f"{v / 1e6:.2f}M")
    for col in ("step_ms", "step_iqr_ms", "tokens_per_s"):
        show[col] = show[col].map(lambda v: f"{v:.1f}")
    if "vs_dense" in show:
        show["vs_dense"] = show["vs_dense"].map(lambda v: f"{v:.2f}x")
    for col in ("sparse_share", "sparse_fwd_share", "optim_share"):
        show[col] = show[col].map(lambda v: f"{100 * v:.1f}%")
    return show.to_string(index=False)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="labcore bench training", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"small sizes for a smoke run: {QUICK}")
    for f in ("d_model", "n_layers", "n_heads", "d_ff", "seq_len", "batch_size", "warmup", "rounds", "repeats",
              "threads", "seed"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int)
    ap.add_argument("--ratio", type=float, help="sparse / dense parameters (default 12, the paper's x12)")
    ap.add_argument("--device", choices=("cpu", "cuda"))
    ap.add_argument("--optimizer", choices=OPTIMIZERS,
                    help="adamw (every row every step) or lazy_adamw (value tables: touched rows only)")
    ap.add_argument("--archs", default=",".join(family_names()),
                    help="comma-separated subset of " + ",".join(family_names(every_memory=True)))
    ap.add_argument("--json", type=Path, help="also write the table (and the config) to this JSON file")
    args = ap.parse_args(argv)
    fields = dict(QUICK) if args.quick else {}
    for k, v in vars(args).items():
        if k not in ("quick", "archs", "json") and v is not None:
            fields[k] = v
    bcfg = TrainBenchConfig(**fields)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    bad = [a for a in archs if a not in family_names(every_memory=True)]
    if bad or not archs:
        ap.error(f"--archs={args.archs!r} is not allowed: must be a comma-separated subset of {','.join(family_names(every_memory=True))}")
    t0 = time.perf_counter()
    df = run(bcfg, archs)
    print(f"training throughput, equal budget (ratio x{bcfg.ratio:g}), B x T = {bcfg.batch_size} x {bcfg.seq_len}, "
          f"device {bcfg.device}, optimizer {bcfg.optimizer}, torch threads {torch.get_num_threads()}, "
          f"{bcfg.rounds} rounds x {bcfg.repeats} steps after {bcfg.warmup} warmup")
    print(format_table(df))
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": asdict(bcfg), "rows": df.to_dict(orient="records")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
