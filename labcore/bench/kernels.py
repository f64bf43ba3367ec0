"""Kernel benchmark: the compiled per-row top-k and fused side search against the PyTorch paths.

``python -m labcore.bench kernels`` times :func:`labcore.layers.fast.compiled.topk_rows`, the PyTorch
path :func:`labcore.layers.fast.topk.torch_exact_topk` and ``torch.topk`` on the PKM / UltraMem search
shapes, and the fused ``side_topk`` against ``torch.bmm`` + top-k, interleaved in one process (best
of ``repeats`` rounds: the machine may be shared, and the minimum is the least disturbed run).
Without the compiled extension only the PyTorch columns are printed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from labcore.layers.fast.compiled import available, isa, side_topk, topk_rows
from labcore.layers.fast.topk import torch_exact_topk

BENCH_CASES = (
    # (name, rows per token, n, k): B tokens give B * rows-per-token rows
    ("PKM per-side top-K (n=451, H=4, K=32)", 8, 451, 32),
    ("PKM candidate top-K (C=119, H=4, K=32)", 4, 119, 32),
    ("UltraMem per-side top-m (n_s=1276, H=2, m=32)", 4, 1276, 32),
    ("UltraMem grid top-K (m^2=1024, H=2, K=32)", 2, 1024, 32),
)


def bench_topk(tokens: int = 4096, threads: int = 2, repeats: int = 9, seed: int = 0) -> list[dict]:
    """Time ``topk_rows``, the PyTorch path ``torch_exact_topk`` (column "exact_topk") and
    ``torch.topk`` on the PKM / UltraMem search shapes, interleaved in one process (best of
    ``repeats`` rounds: the machine may be shared, and the minimum is the least disturbed run).
    Returns one dict per case (ms)."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    try:
        for name, per_token, n, k in BENCH_CASES:
            x = torch.randn(tokens * per_token, n, generator=gen)
            fns = {"torch.topk": lambda x=x, k=k: x.topk(k, dim=-1),
                   "exact_topk": lambda x=x, k=k: torch_exact_topk(x, k, sorted=True)}
            if available():
                fns["topk_rows"] = lambda x=x, k=k: topk_rows(x, k)
            times: dict[str, list[float]] = {f: [] for f in fns}
            for f in fns.values():
                f()                                                        # warm-up
            for _ in range(repeats):
                for label, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    times[label].append(time.perf_counter() - t0)
            med = {label: min(t) * 1e3 for label, t in times.items()}
            rows.append({"case": name, "rows": x.shape[0], "n": n, "k": k, **med})
    finally:
        torch.set_num_threads(old_threads)
    return rows


SIDE_CASES = (
    # (name, groups G = heads x 2 sides, D per side, n, k)
    ("PKM side search (H=4, D_k/2=64, n=451, K=32)", 8, 64, 451, 32),
    ("UltraMem-like side search (G=4, D=64, n=1276, m=32)", 4, 64, 1276, 32),
)


def bench_side(tokens: int = 4096, threads: int = 2, repeats: int = 9, seed: int = 0,
               chunk: int = 512) -> list[dict]:
    """Time the product-key side search: the readable path (``torch.bmm`` scores in token chunks of
    ``chunk``, then ``exact_topk``), the same with ``topk_rows``, and the fused ``side_topk``,
    interleaved, best of ``repeats`` rounds (ms)."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    try:
        for name, G, D, n, k in SIDE_CASES:
            q = torch.randn(G, tokens, D, generator=gen)
            keys = torch.randn(G, n, D, generator=gen) / D ** 0.5
            kt = keys.transpose(1, 2)

            def readable(q=q, kt=kt, k=k):
                return [torch_exact_topk(torch.bmm(qc, kt), k, sorted=True)
                        for qc in q.split(chunk, dim=1)]

            fns = {"bmm+exact_topk": readable}
            if available():
                fns["bmm+topk_rows"] = lambda q=q, kt=kt, k=k: [topk_rows(torch.bmm(qc, kt), k)
                                                                for qc in q.split(chunk, dim=1)]
                fns["side_topk"] = lambda q=q, keys=keys, k=k: side_topk(q, keys, k)
            times: dict[str, list[float]] = {f: [] for f in fns}
            for f in fns.values():
                f()
            for _ in range(repeats):
                for label, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    times[label].append(time.perf_counter() - t0)
            rows.append({"case": name, "rows": G * tokens, **{lb: min(t) * 1e3 for lb, t in times.items()}})
    finally:
        torch.set_num_threads(old_threads)
    return rows


def _print_side(rows: list[dict]) -> None:
    have = "side_topk" in rows[0]
    head = f"{'side search (scores + top-k)':52s} {'rows':>6s} {'bmm+exact_topk':>15s}"
    if have:
        head += f" {'bmm+topk_rows':>14s} {'side_topk':>10s} {'fused vs readable':>18s}"
    print(head)
    for r in rows:
        line = f"{r['case']:52s} {r['rows']:6d} {r['bmm+exact_topk']:15.2f}"
        if have:
            line += (f" {r['bmm+topk_rows']:14.2f} {r['side_topk']:10.2f}"
                     f" {r['bmm+exact_topk'] / r['side_topk']:17.2f}x")
        print(line)


def _print_bench(rows: list[dict], tokens: int, threads: int) -> None:
    print(f"top-k per row, B={tokens} tokens, {threads} threads, isa={isa()}, best of repeats, ms")
    have = "topk_rows" in rows[0]
    head = f"{'case':48s} {'rows':>6s} {'torch.topk':>11s} {'exact_topk':>11s}"
    if have:
        head += f" {'topk_rows':>10s} {'vs exact':>9s} {'vs torch':>9s}"
    print(head)
    for r in rows:
        line = f"{r['case']:48s} {r['rows']:6d} {r['torch.topk']:11.2f} {r['exact_topk']:11.2f}"
        if have:
            line += (f" {r['topk_rows']:10.2f} {r['exact_topk'] / r['topk_rows']:8.2f}x"
                     f" {r['torch.topk'] / r['topk_rows']:8.2f}x")
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="labcore bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens B (default 4096)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    a = p.parse_args(argv)
    _print_bench(bench_topk(a.tokens, a.threads, a.repeats), a.tokens, a.threads)
    _print_side(bench_side(a.tokens, a.threads, a.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
