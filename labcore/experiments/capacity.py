"""Knowledge capacity: does recall grow with the number of memory values at fixed compute?

The knowledge base (labcore.data.knowledge) asks a model to store ``knowledge_bits`` bits. A memory
layer adds parameters (values) without adding compute: a token still reads H·K value rows whatever
N is. So at fixed activated compute, recall should grow with N if the memory is used for storage.
This experiment trains the dense trunk, and PKM / UltraMem memories of growing N (the same heads,
top-k, key and value widths, so the same FLOPs up to the key-score term), for several seeds, and
reports validation loss, knowledge recall (bio completion and held-out questions) and bits of
knowledge per parameter.

Run: ``python -m labcore.experiments.capacity --steps 600 --people 50 --n-keys 8 16 32 --seeds 0 1 2``
(writes ``capacity.parquet`` and prints the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from labcore.data.knowledge import knowledge_bits
from labcore.experiments.common import LabParams
from labcore.experiments.core import Variant, run_variants, summarize
from labcore.layers.pkm import PKMConfig
from labcore.layers.ultramem import UltraMemConfig
from labcore.lm.model import SparsePlan
from labcore.results import write_table


def capacity_variants(P: LabParams, n_keys: Sequence[int], top_k: int = 8) -> list[Variant]:
    D, mid = P.d_model, P.n_layers // 2
    place = (f"{mid}:{mid}",)
    out = [Variant("dense", P.model(), tags={"arch": "dense", "n_values": 0})]
    for n in n_keys:
        pkm = PKMConfig(d_model=D, n_keys=n, heads=2, k_dim=D, top_k=top_k, d_value=D)
        um = UltraMemConfig(d_model=D, n_keys=n, heads=2, k_dim=D // 2, top_k=top_k, d_value=D // 2,
                            rank=2, n_cores=2, expansion=1)
        for arch, mem in (("pkm", pkm), ("ultramem", um)):
            out.append(Variant(f"{arch} N={n * n}", P.model(SparsePlan(kind="memory", memory=mem, placements=place)),
                               tags={"arch": arch, "n_values": n * n}))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labcore.experiments.capacity", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--people", type=int, default=50)
    ap.add_argument("--n-keys", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--archs", nargs="+", default=["dense", "pkm", "ultramem"])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/capacity")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    P = LabParams(steps=a.steps, n_people=a.people, lr=a.lr, out_dir=a.out)
    variants = [v for v in capacity_variants(P, a.n_keys) if v.tags["arch"] in a.archs]
    t0 = time.time()
    table = run_variants(variants, a.seeds, P.data_config(),
                         P.train_config(recall_max_people=a.people, eval_batches=16),
                         Path(a.out) / "train")
    kb_bits = knowledge_bits(dataclasses.replace(P.data_config()))
    table["knowledge_bits"] = kb_bits
    table["bits_per_param_if_all_recalled"] = kb_bits / table["total_params"]
    write_table(table, Path(a.out) / "capacity.parquet")
    s = summarize(table, ["val_loss", "recall_bio", "recall_qa", "total_params", "flops_per_token"])
    pd.set_option("display.width", 200)
    print(s[["variant", "n", "val_loss_mean", "val_loss_ci95", "recall_bio_mean", "recall_bio_ci95",
             "recall_qa_mean", "recall_qa_ci95", "total_params_mean", "flops_per_token_mean"]].to_string(index=False))
    print(f"knowledge_bits={kb_bits:.0f}  ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
