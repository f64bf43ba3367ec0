"""Benchmark entry points: ``python -m labcore.bench layers|inference|training|kernels`` or ``labcore bench ...``.

==============  ====================================================================================
layers          labcore layers vs their PyPI peers, forward latency at 4x256 tokens
inference       decode-step latency / memory access of Dense, MoE and every registered memory vs
                batch size (the paper's Figure 1 on this machine), with the analytical cost model's
                prediction (``labcore.bench.inference_cli``; the measurement is ``labcore.bench.inference``)
training        training throughput (``labcore.bench.training``, imported only when asked for)
kernels         the compiled top-k and fused side search vs the PyTorch paths (``labcore.bench.kernels``)
==============  ====================================================================================

Every sub-benchmark module has ``main(argv) -> int``; they are imported lazily so that
``labcore bench layers`` never imports the training stack and a missing benchmark-only dependency
only affects the benchmark that needs it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "layers": ("labcore.bench.layers", "labcore layers vs PyPI peers: forward latency"),
    "inference": ("labcore.bench.inference_cli", "decode-step latency and memory access vs batch size (Figure 1)"),
    "training": ("labcore.bench.training", "training throughput"),
    "kernels": ("labcore.bench.kernels", "compiled top-k and fused side search vs the PyTorch paths"),
}


def usage() -> str:
    lines = ["usage: labcore bench {" + ",".join(COMMANDS) + "} [options]", "", "benchmarks:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines.append("\n`labcore bench NAME --help` lists a benchmark's options.")
    return "\n".join(lines)


def cli_main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv = [NAME, *options]`` to ``labcore.bench.NAME.main(options)``; returns an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"labcore bench: unknown benchmark {name!r}; allowed: {', '.join(COMMANDS)}\n\n{usage()}",
              file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            print(f"labcore bench: benchmark {name!r} is not available ({module_name} is missing)", file=sys.stderr)
            return 2
        raise
    rc = module.main(rest)
    return int(rc or 0)


__all__ = ["COMMANDS", "cli_main", "usage"]
