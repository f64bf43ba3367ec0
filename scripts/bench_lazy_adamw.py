"""Dense AdamW vs LazyAdamW on the memory value tables: a training A/B and a value-table micro-benchmark.

    PYTHONPATH=. python scripts/bench_lazy_adamw.py micro --threads 1 [--rows 2000]
    PYTHONPATH=. python scripts/bench_lazy_adamw.py ab --arch pkm --steps 200 --threads 1
    PYTHONPATH=. python scripts/bench_lazy_adamw.py facts --seeds 6 --threads 1

``facts``: the lab's facts task (``labcore.experiments.architectures.family`` at the facts notebooks'
size: 2,000 facts, 400 steps of 256 rows) for PKM and UltraMem, trained with AdamW and with
``optimizer="lazy_adamw"`` (sparse value gradients) on the same seeds; prints the paired differences
(answer loss, answer accuracy, tokens/s) with 95% intervals and resolution
(``labcore.experiments.core.paired_deltas``).

``ab``: the equal-budget family's model (``labcore.lm.budget.equal_budget_family`` at the sizes of
``labcore.bench.training``), built twice (or three times) from one seed and trained in lockstep
on the same batches: one step of each optimiser in turn, so a noisy neighbour slows them alike.
The step is ``labcore.lm.train.train``'s (lr schedule with the value-LR multiplier, refresh_all,
clip 1.0); the lazy arms get sparse value gradients from the layers (``set_sparse_value_grads``, as
``build_optimizer`` does for ``optimizer="lazy_adamw"``), the AdamW arm dense ones. Prints per
optimiser: median step time, tokens/s, optimiser share of the step, touched value rows, final train
loss (mean of the last 10 steps) and validation loss.

``micro``: one PKM value table of the family's size read by ``F.embedding_bag`` as PKM does, with
``sparse=False`` / ``sparse=True`` (slots uniform over the table, or over ``--rows`` random rows):
forward+backward time, then the optimiser step (dense AdamW on
the dense gradient, LazyAdamW on the dense gradient, LazyAdamW on the sparse COO gradient).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from labcore.data import KnowledgeConfig, load_dataset
from labcore.layers.base import param_role, set_sparse_value_grads
from labcore.lm.budget import equal_budget_family, small_base_config
from labcore.lm.model import LM
from labcore.lm.optim import VALUE_ROLE, refresh_all
from labcore.lm.sparse_optim import LazyAdamW, build_lazy_adamw, clip_grad_norm_
from labcore.lm.train import TrainConfig, build_optimizer, set_step_lr, value_lr_schedule

D, L, HEADS, D_FF, T, B, RATIO = 128, 8, 4, 512, 128, 8, 12.0


def family():
    base = small_base_config(vocab_size=259, d_model=D, n_layers=L, n_heads=HEADS, d_ff=D_FF, max_seq_len=T)
    return equal_budget_family(base, ratio=RATIO, context_len=T)


def value_params(model):
    return [p for p in model.parameters() if param_role(p) == VALUE_ROLE]


class Arm:
    def __init__(self, name: str, model_cfg, tcfg: TrainConfig, data, bias_correction: str | None) -> None:
        torch.manual_seed(tcfg.seed)
        self.name, self.tcfg = name, tcfg
        self.model = LM(model_cfg).train()
        if bias_correction is None:
            self.opt = build_optimizer(self.model, tcfg, torch.device("cpu"))
        else:
            self.opt = build_lazy_adamw(self.model, tcfg.lr, tcfg.weight_decay, betas=tcfg.betas,
                                        bias_correction=bias_correction)
            set_sparse_value_grads(self.model, True)
        self.vsched = value_lr_schedule(tcfg)
        self.sampler = data.sampler("train", tcfg.batch_size, tcfg.seq_len, tcfg.seed)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.values = value_params(self.model)
        self.step_s, self.opt_s, self.losses, self.touched = [], [], [], []
        self.s = 0

    def step(self) -> None:
        t0 = time.perf_counter()
        set_step_lr(self.opt, self.tcfg, self.vsched, self.s)
        refresh_all(self.model)
        self.opt.zero_grad(set_to_none=True)
        (x, y), = self.sampler.next()
        out = self.model(x, y)
        (out.loss + out.aux_loss).backward()
        clip_grad_norm_(self.params, self.tcfg.grad_clip)                  # takes sparse value grads too
        t1 = time.perf_counter()
        self.opt.step()
        t2 = time.perf_counter()
        self.s += 1
        self.step_s.append(t2 - t0)
        self.opt_s.append(t2 - t1)
        self.losses.append(float(out.loss.detach()))
        self.touched.append(sum(_touched(p.grad) for p in self.values) / sum(p.shape[0] for p in self.values))

    @torch.no_grad()
    def val_loss(self, data, batches: int = 8) -> float:
        self.model.eval()
        sampler = data.sampler("val", self.tcfg.batch_size, self.tcfg.seq_len, self.tcfg.seed)
        losses = [float(self.model(*sampler.micro_batches(i)[0]).loss) for i in range(batches)]
        self.model.train()
        return sum(losses) / len(losses)


def _touched(grad) -> int:
    """Rows of a value table's gradient: the rows of a sparse one, the non-zero rows of a dense one."""
    return int(grad.coalesce().indices().shape[1]) if grad.is_sparse else int(grad.ne(0).any(1).sum())


def ab(args) -> None:
    torch.set_num_threads(args.threads)
    cfg = family()[args.arch]
    data = load_dataset(KnowledgeConfig(n_people=200, bios_per_person=2, seed=0), cache_dir=False)
    tcfg = TrainConfig(steps=args.steps, batch_size=B, seq_len=T, warmup_steps=min(20, args.steps // 10),
                       device="cpu", progress=False, seed=args.seed)
    arms = [Arm("adamw", cfg, tcfg, data, None), Arm("lazy-row", cfg, tcfg, data, "row")]
    if args.global_bc:
        arms.append(Arm("lazy-global", cfg, tcfg, data, "global"))
    for s in range(args.steps):
        for arm in (arms if s % 2 == 0 else arms[::-1]):
            arm.step()
    skip = min(5, args.steps // 2)
    rows = []
    for arm in arms:
        med = statistics.median(arm.step_s[skip:])
        rows.append({"arch": args.arch, "seed": args.seed, "optimizer": arm.name, "step_ms": 1e3 * med,
                     "tokens_per_s": B * T / med, "optim_ms": 1e3 * statistics.median(arm.opt_s[skip:]),
                     "optim_share": sum(arm.opt_s[skip:]) / sum(arm.step_s[skip:]),
                     "touched_rows_first": arm.touched[0], "touched_rows_last": arm.touched[-1],
                     "train_loss_last10": sum(arm.losses[-10:]) / len(arm.losses[-10:]),
                     "val_loss": arm.val_loss(data)})
    base = rows[0]
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["d_val_loss"] = r["val_loss"] - base["val_loss"]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def micro(args) -> None:
    torch.set_num_threads(args.threads)
    pkm = family()["pkm"].plan.memory
    n_rows, dv, reads = pkm.n_keys ** 2, pkm.d_model, pkm.heads * pkm.top_k
    n_tok = B * T
    gen = torch.Generator().manual_seed(0)
    if args.rows is None:                                   # uniform over the table: the most rows touched
        slots = torch.randint(0, n_rows, (n_tok, reads), generator=gen)
    else:                                                   # uniform over a random subset of the rows
        subset = torch.randperm(n_rows, generator=gen)[:args.rows]
        slots = subset[torch.randint(0, args.rows, (n_tok, reads), generator=gen)]
    weights = torch.rand(n_tok, reads, generator=gen)
    g_out = torch.randn(n_tok, dv, generator=gen)
    table = torch.nn.Parameter(torch.randn(n_rows, dv, generator=gen) * 0.02)
    res = {"table": [n_rows, dv], "tokens": n_tok, "reads_per_token": reads}

    def fwd_bwd(sparse: bool):
        def run():
            table.grad = None
            F.embedding_bag(slots, table, mode="sum", per_sample_weights=weights, sparse=sparse).backward(g_out)
        return run

    for sparse in (False, True):
        res[f"fwd_bwd_ms_sparse={sparse}"] = 1e3 * _median_time(fwd_bwd(sparse), args.reps)
    fwd_bwd(False)()
    dense_grad = table.grad.clone()
    fwd_bwd(True)()
    sparse_grad = table.grad.coalesce()
    res["touched_rows"] = int(sparse_grad.indices().shape[1]) / n_rows

    def opt_step(opt_factory, grad):
        opt = opt_factory()

        def run():
            table.grad = grad
            opt.step()
        run()                                                               # state allocated
        return 1e3 * _median_time(run, args.reps)

    kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    res["opt_ms_adamw_dense_grad"] = opt_step(lambda: torch.optim.AdamW([table], **kw), dense_grad)
    res["opt_ms_lazy_dense_grad"] = opt_step(lambda: LazyAdamW([table], **kw), dense_grad)
    res["opt_ms_lazy_sparse_grad"] = opt_step(lambda: LazyAdamW([table], **kw), sparse_grad)
    res["opt_ms_sparseadam_sparse_grad"] = opt_step(
        lambda: torch.optim.SparseAdam([table], lr=1e-4, betas=(0.9, 0.95)), sparse_grad)
    res["clip_ms_dense_grad"] = 1e3 * _median_time(
        lambda: torch.linalg.vector_norm(dense_grad), args.reps)
    res["clip_ms_sparse_grad"] = 1e3 * _median_time(
        lambda: torch.linalg.vector_norm(sparse_grad.coalesce().values()), args.reps)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))


def facts(args) -> None:
    """AdamW vs lazy_adamw (sparse value gradients) on the lab's facts task, paired by seed."""
    import pandas as pd

    from labcore.experiments.architectures import ArchitecturesParams, family
    from labcore.experiments.core import Variant, paired_deltas, run_variants

    torch.set_num_threads(args.threads)
    E = ArchitecturesParams(steps=args.steps, batch_size=args.batch_size, n_facts=args.n_facts).effective()
    fam = family(E)
    variants = [Variant(f"{a} {o}", fam[a], train_overrides={"optimizer": o}, tags={"arch": a, "optimizer": o})
                for a in args.archs for o in ("adamw", "lazy_adamw")]
    table = run_variants(variants, list(range(args.seeds)), E.data_config(), E.train_config(), args.workdir,
                         calibrate=E.calibrate_init)
    rows = []
    for a in args.archs:
        sub = table[table["arch"] == a]
        for metric, hib in (("answer_loss", False), ("answer_accuracy", True), ("tokens_per_s", True)):
            rows.append(paired_deltas(sub, metric, baseline=f"{a} adamw", higher_is_better=hib))
    out = pd.concat(rows, ignore_index=True)
    cols = ["variant", "reference", "metric", "n", "delta_mean", "ci_low", "ci_high", "resolution", "p_holm"]
    print(out[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    means = table.groupby("variant")[["answer_loss", "answer_accuracy", "tokens_per_s"]].mean()
    print(means.to_string(float_format=lambda v: f"{v:.4g}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ab")
    a.add_argument("--arch", choices=("pkm", "ultramem"), default="pkm")
    a.add_argument("--steps", type=int, default=200)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--seed", type=int, default=0, help="model init and batch order")
    a.add_argument("--global-bc", action="store_true", help="add a LazyAdamW arm with bias_correction='global'")
    f = sub.add_parser("facts")
    f.add_argument("--archs", nargs="+", choices=("pkm", "ultramem"), default=["pkm", "ultramem"])
    f.add_argument("--seeds", type=int, default=6)
    f.add_argument("--steps", type=int, default=400)
    f.add_argument("--batch-size", type=int, default=256)
    f.add_argument("--n-facts", type=int, default=2000)
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("--workdir", default="runs/lazy_vs_adamw_facts")
    m = sub.add_parser("micro")
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--reps", type=int, default=7)
    m.add_argument("--rows", type=int, default=None, help="slots drawn from this many rows (default: all)")
    args = ap.parse_args()
    {"ab": ab, "facts": facts, "micro": micro}[args.cmd](args)


if __name__ == "__main__":
    main()
