"""``labcore bench inference`` (``python -m labcore.bench inference``): the command line of
:mod:`labcore.bench.inference`, decode-step latency and memory access vs batch size (Figure 1).

Prints the table (:func:`~labcore.bench.inference.format_table`), the GPU skip-layer overlap when it
was measured, and where ``inference.parquet`` / ``inference.html`` were written.

``--stages`` runs :mod:`labcore.bench.stages` instead: per layer (every registered memory, MoE and
the dense FFN by default) and batch size (default 1, 64, 512, 4096), the layer's time, its roofline
bound, time / bound and each stage's ms and share (:func:`~labcore.bench.stages.format_stage_table`),
written to ``stages.parquet`` and ``stages.csv``; 2 threads unless ``--threads`` says otherwise.
The options that only concern the model-scope run (``--scopes``, ``--context-len``,
``--no-overlap``) are refused with ``--stages``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from labcore.bench import stages
from labcore.bench.inference import DEFAULT_BATCHES, format_table, model_names, run_inference_bench
from labcore.config import ConfigError
from labcore.lm.budget import small_base_config


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="labcore bench inference",
                                 description="Decode-step latency and memory access vs batch size (Figure 1).")
    ap.add_argument("--stages", action="store_true",
                    help="per layer and batch size: time, roofline bound, time/bound and the stage breakdown")
    ap.add_argument("--batch-sizes", type=_int_list, default=None,
                    help="comma-separated batch sizes (default 1,2,4,...,4096; with --stages 1,64,512,4096)")
    ap.add_argument("--models", default=None,
                    help=f"subset of {','.join(model_names(every_memory=True))} (default "
                         f"{','.join(model_names())}; with --stages all of them)")
    ap.add_argument("--ratio", type=float, default=12.0, help="sparse/dense parameter ratio (default 12)")
    ap.add_argument("--d-model", type=int, default=None, help="base model D (default: small_base_config)")
    ap.add_argument("--n-layers", type=int, default=None, help="base model L")
    ap.add_argument("--d-ff", type=int, default=None, help="base model FFN hidden size")
    ap.add_argument("--vocab-size", type=int, default=None, help="base model vocabulary")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help=f"torch threads (default: unchanged; with --stages {stages.DEFAULT_THREADS})")
    ap.add_argument("--scopes", default=None, help="layer,model (default both)")
    ap.add_argument("--context-len", type=int, default=None, help="add a KV cache of this length to the prediction")
    ap.add_argument("--no-overlap", action="store_true", help="skip the GPU skip-layer overlap measurement")
    ap.add_argument("--remeasure-ceilings", action="store_true",
                    help="measure copy bandwidth / matmul FLOP/s again instead of using the per-machine cache")
    ap.add_argument("--out", default="bench_out/inference",
                    help="output directory (parquet + html; with --stages stages.parquet + stages.csv)")
    args = ap.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.stages:
        given = [flag for flag, value in (("--scopes", args.scopes), ("--context-len", args.context_len),
                                          ("--no-overlap", args.no_overlap or None)) if value is not None]
        if given:
            ap.error(f"{', '.join(given)} not allowed with --stages: the stage breakdown times single layers "
                     "(no model scope, no KV cache, no skip-layer overlap)")
    models = None if args.models is None else tuple(m.strip() for m in args.models.split(",") if m.strip())
    try:
        base = None
        overrides = {k: v for k, v in (("d_model", args.d_model), ("n_layers", args.n_layers),
                                       ("d_ff", args.d_ff), ("vocab_size", args.vocab_size)) if v is not None}
        if overrides:
            base = small_base_config(**overrides)
        if args.stages:
            df = stages.run_stage_bench(stages.DEFAULT_BATCHES if args.batch_sizes is None else args.batch_sizes, models, base=base,
                                        ratio=args.ratio, device=args.device, dtype=dtype, warmup=args.warmup,
                                        repeats=args.repeats, threads=stages.DEFAULT_THREADS if args.threads is None else args.threads,
                                        remeasure_ceilings=args.remeasure_ceilings, out_dir=args.out)
        else:
            df = run_inference_bench(DEFAULT_BATCHES if args.batch_sizes is None else args.batch_sizes,
                                     model_names() if models is None else models,
                                     base=base, ratio=args.ratio, device=args.device, dtype=dtype,
                                     warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                                     scopes=tuple(s.strip() for s in (args.scopes or "layer,model").split(",")
                                                  if s.strip()),
                                     overlap=not args.no_overlap, context_len=args.context_len or 0,
                                     remeasure_ceilings=args.remeasure_ceilings, out_dir=args.out)
    except ConfigError as e:
        ap.error(str(e))
    if args.stages:
        print()
        print(stages.format_stage_table(df))
        print(f"wrote {Path(args.out) / 'stages.parquet'} and {Path(args.out) / 'stages.csv'}")
        return 0
    print()
    print(format_table(df))
    if df["overlap_frac"].notna().any():
        ov = df[df["overlap_frac"].notna()]
        print("\nskip-layer overlap (UltraMem memory vs the blocks it spans, two CUDA streams):")
        for r in ov.itertuples():
            print(f"  B={r.batch:<5} mem {r.overlap_mem_s * 1e3:.3f} ms + dense {r.overlap_dense_s * 1e3:.3f} ms "
                  f"-> both {r.overlap_both_s * 1e3:.3f} ms: overlap {r.overlap_frac:.0%}")
    elif not args.device.startswith("cuda"):
        print("\nskip-layer overlap: not measured on CPU (needs two CUDA streams).")
    print(f"\nwrote {Path(args.out) / 'inference.parquet'} and {Path(args.out) / 'inference.html'}")
    return 0
