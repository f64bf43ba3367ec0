"""Compiled CPU kernels for the memory layers' retrieval (a C++ extension built on first use).

``topk_rows(x, k)`` is an exact per-row top-k of a float32 matrix, the step that dominates PKM's and
UltraMem's search on CPU (per-side top-k over n sub-keys, then the top-K of the candidate grid;
docs/mechanisms.md §1.1 and §4). The C++ source is ``csrc/topk_rows.cpp`` with ``csrc/topk_core.h``,
whose header comment describes the algorithm (per-lane maxima give a threshold, the survivors are compacted and ranked).

Contract of ``topk_rows`` (the same with or without the extension)
-----------------------------------------------------------------
* x: float32 CPU tensor (..., n); k in [0, n] (anything else: ``ConfigError``).
* Returns values (..., k) and int64 indices (..., k); values are bitwise the selected entries of
  x, in descending order when ``sorted`` (otherwise in no particular order).
* Order: IEEE totalOrder of the float bits, -NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN,
  as ``labcore.layers.fast.topk.exact_topk`` (a NaN ranks above +inf only when its sign bit is clear).
  For finite data and +inf/-inf the selected set equals ``torch.topk``'s up to ties (an entry
  equal to the k-th largest may be swapped for another equal one; -0.0 and +0.0 count as equal in
  ``torch.topk`` but +0.0 ranks first here).
* Gradients flow to x (the values are gathered from x) when autograd records.

Build and fallback
------------------
The extension is compiled with ``torch.utils.cpp_extension.load`` (g++ and ninja) into
``$LABCORE_EXT_DIR`` (default ``~/.cache/labcore/torch_extensions/torch<version>-py<version>``), in
one subdirectory per hash of the sources, the first time it is needed, or ahead of time by ``python -m labcore.layers.fast.compiled --build`` (``make
setup`` runs it). If the compiler, ninja or the build is missing, one warning line says why and
every call uses ``reference_topk_rows``, a few PyTorch lines with the same contract; nothing
crashes. ``LABCORE_COMPILED=0`` disables the extension (for tests and A/B benchmarks).

``side_topk(q, keys, k)`` is the product-key side search fused: the top-k of q @ keys^T per query,
with the scores computed in cache-resident tiles and never written as a (G, T, n) matrix.
``pkm_topk`` (``csrc/pkm_search.cpp``) and ``tucker_topk`` (``csrc/tucker_search.cpp``) are PKM's and
UltraMem's whole searches in one pass per (head, 8 tokens), for inference; the layers reach them
through ``labcore.layers.fast.search.fused_pkm_search`` / ``fused_tucker_search``.
``bag_backward`` / ``sparse_bag_backward`` (``csrc/value_bags.cpp``) are the value read's backward in
one pass (a dense or a sparse COO table gradient). The per-row top-k primitives every kernel shares
are in ``csrc/topk_core.h``. Built with ``-fopenmp``: ``at::parallel_for`` is OpenMP code in ATen's
headers and runs on one thread without it.

``labcore.layers.fast.topk.exact_topk`` (every layer's top-k) dispatches CPU float32 rows here.
``python -m labcore.bench kernels`` times ``topk_rows`` against the PyTorch path and ``torch.topk``
on the PKM and UltraMem search shapes, and ``side_topk`` against ``torch.bmm`` + top-k.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from labcore.config import ConfigError
from labcore.layers.fast.bits import ordered_int32

EXT_NAME = "labcore_topk_rows"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "topk_rows.cpp", CSRC / "value_bags.cpp", CSRC / "tucker_search.cpp", CSRC / "pkm_search.cpp")
HEADERS = (CSRC / "topk_core.h",)
# -fopenmp: at::parallel_for is OpenMP code in ATen's headers; without the flag it runs every range on
# the calling thread (the loader binds the extension to the libgomp torch already loaded).
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)
ENV_DISABLE = "LABCORE_COMPILED"
ENV_DIR = "LABCORE_EXT_DIR"
ISAS = {"auto": -1, "portable": 0, "avx512": 1}

_lock = threading.Lock()
_state: dict[str, object] = {"module": None, "tried": False, "reason": None}


def sources_digest() -> str:
    """A short hash of the C++ sources' contents and the build flags: two checkouts with different
    sources (two branches, an older install) never share, and never overwrite, one build."""
    h = hashlib.sha256(" ".join((*CFLAGS, *LDFLAGS)).encode())
    for src in (*SOURCES, *HEADERS):
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    return h.hexdigest()[:12]


def build_dir() -> Path:
    """Where the extension is built and cached: one directory per torch version, Python version and
    :func:`sources_digest` (under ``$LABCORE_EXT_DIR`` when set)."""
    root = os.environ.get(ENV_DIR)
    if root:
        return Path(root) / sources_digest()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}"
    return cache / "labcore" / "torch_extensions" / tag / sources_digest()


def disabled() -> bool:
    """True when ``LABCORE_COMPILED`` is set to 0 / false / no / off."""
    return os.environ.get(ENV_DISABLE, "1").strip().lower() in ("0", "false", "no", "off")


def _compile(verbose: bool = False) -> ModuleType:
    """Build (or reuse the cached build of) the extension and import it. Raises on failure."""
    from torch.utils import cpp_extension  # only needed when building/loading (imports setuptools)

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    # torch looks for ``ninja`` on PATH; the pip wheel installs it next to this interpreter.
    env_path = os.environ.get("PATH", "")
    bindir = str(Path(sys.executable).parent)
    path = env_path if bindir in env_path.split(os.pathsep) else bindir + os.pathsep + env_path
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx, path=path) is None:
        raise RuntimeError(f"C++ compiler {cxx!r} not found (install g++ or set CXX)")
    if shutil.which("ninja", path=path) is None:
        raise RuntimeError("ninja not found (pip install ninja)")
    torch_log = logging.getLogger("torch.utils.cpp_extension")  # its multi-line compiler-ABI warning
    level = torch_log.level
    os.environ["PATH"] = path
    torch_log.setLevel(logging.ERROR)
    try:
        return cpp_extension.load(name=EXT_NAME, sources=[str(s) for s in SOURCES],
                                  extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                                  build_directory=str(out), verbose=verbose)
    finally:
        os.environ["PATH"] = env_path
        torch_log.setLevel(level)


def _one_line(exc: BaseException) -> str:
    """A one-line reason: the first compiler error line of a failed build, else the last line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [""]
    pick = next((ln for ln in lines if "error" in ln.lower() and "building extension" not in ln.lower()),
                lines[-1])
    return f"{type(exc).__name__}: {pick[:200]}"


def _load() -> ModuleType | None:
    """The extension module, or None (after one warning line saying why). Thread-safe, tried once."""
    if disabled():
        return None
    if _state["tried"]:
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if not _state["tried"]:
            try:
                _state["module"] = _compile()
            except Exception as exc:  # compiler, ninja, headers or the build missing: fall back
                _state["reason"] = _one_line(exc)
                warnings.warn(f"labcore compiled top-k unavailable ({_state['reason']}); using the PyTorch "
                              f"path (set {ENV_DISABLE}=0 to silence)", RuntimeWarning, stacklevel=3)
            _state["tried"] = True
    return _state["module"]  # type: ignore[return-value]


def available() -> bool:
    """True when the compiled extension is enabled and built (builds it on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why the extension is not used (None when it is)."""
    if disabled():
        return f"disabled by {ENV_DISABLE}={os.environ.get(ENV_DISABLE)}"
    return None if _load() is not None else str(_state["reason"])


def isa() -> str:
    """The instruction set ``topk_rows`` uses: "avx512", "portable" or "pytorch" (no extension)."""
    mod = _load()
    if mod is None:
        return "pytorch"
    return "avx512" if mod.has_avx512() else "portable"


def _check_count(fn: str, name: str, value: object, lo: int, hi: int, hi_text: str) -> None:
    """ConfigError unless ``value`` is an int in [lo, hi] (``hi_text`` says what hi is)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{fn}: {name}={value!r}; expected an int in [{lo}, {hi_text}]")


def _check_isa(fn: str, isa: str) -> None:
    if isa not in ISAS:
        raise ConfigError(f"{fn}: isa={isa!r}; expected one of {sorted_names()}")


def _required_module(fn: str) -> ModuleType:
    """The extension for a kernel that has no PyTorch fallback of its own (the caller checks
    :func:`available` and runs the readable path otherwise)."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"{fn}: the compiled extension is not available ({unavailable_reason()})")
    return mod


def reference_topk_rows(x: Tensor, k: int, sorted: bool = True) -> tuple[Tensor, Tensor]:
    """The readable PyTorch path with ``topk_rows``'s contract: rank the order-preserving int32 keys
    of the float bits with ``torch.topk``, then gather the values from x."""
    idx = ordered_int32(x).topk(k, dim=-1, sorted=sorted).indices                  # (..., k)
    return x.gather(-1, idx), idx


def _check(x: Tensor, k: int) -> None:
    if not isinstance(x, Tensor) or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() < 1:
        what = f"{x.dtype} {x.device.type} tensor of {x.dim()} dims" if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(f"topk_rows: x={what}; expected a float32 CPU tensor (..., n)")
    n = x.shape[-1]
    _check_count("topk_rows", "k", k, 0, n, f"n={n}] (n = x.shape[-1]")


def topk_rows(x: Tensor, k: int, sorted: bool = True, *, isa: str = "auto") -> tuple[Tensor, Tensor]:
    """Exact top-k along the last dim of a float32 CPU tensor (..., n) -> values, indices (..., k).

    See the module docstring for the contract. ``isa`` ("auto", "portable", "avx512") picks the
    compiled path (tests use it to check both); without the extension it is ignored.
    """
    _check(x, k)
    _check_isa("topk_rows", isa)
    mod = _load()
    if mod is None:
        return reference_topk_rows(x, k, sorted)
    lead, n = x.shape[:-1], x.shape[-1]
    vals, idx = mod.topk_rows(x.detach().reshape(-1, n).contiguous(), k, sorted, ISAS[isa])
    idx = idx.view(*lead, k)
    if torch.is_grad_enabled() and x.requires_grad:
        return x.gather(-1, idx), idx
    return vals.view(*lead, k), idx


def reference_side_topk(q: Tensor, keys: Tensor, k: int, sorted: bool = True) -> tuple[Tensor, Tensor]:
    """The readable product-key side search: scores = q @ keys^T (G, T, n), then their top-k."""
    return reference_topk_rows(torch.bmm(q, keys.transpose(1, 2)), k, sorted)   # (G, T, k)


def side_topk(q: Tensor, keys: Tensor, k: int, sorted: bool = True, *, isa: str = "auto") -> tuple[Tensor, Tensor]:
    """Product-key side search (docs/mechanisms.md §1.1, U2 eq. 3): the top-k of q[g, t] . keys[g, j]
    over the n sub-keys j, for queries q (G, T, D) and sub-keys keys (G, n, D) (G = heads x sides).

    Compiled: scores are computed for 8 queries at a time into a cache-resident buffer and ranked
    there, so the (G, T, n) score matrix is never written. The scores are summed in a different
    order than ``torch.bmm``'s, so they agree to float32 rounding and a near-tie at the k-th place
    may be resolved differently. Returns values (G, T, k) (descending when ``sorted``) and int64
    sub-key indices (G, T, k). With autograd recording, the values are recomputed from q and keys
    at the selected indices, so gradients reach both.
    """
    ok = (isinstance(q, Tensor) and isinstance(keys, Tensor) and q.dim() == 3 and keys.dim() == 3
          and q.dtype == keys.dtype == torch.float32 and q.device.type == keys.device.type == "cpu"
          and keys.shape[0] == q.shape[0] and keys.shape[2] == q.shape[2])
    if not ok:
        desc = lambda t: f"{tuple(t.shape)} {t.dtype} {t.device.type}" if isinstance(t, Tensor) else type(t).__name__  # noqa: E731
        raise ConfigError(f"side_topk: q={desc(q)}, keys={desc(keys)}; expected float32 CPU tensors "
                          f"q (G, T, D) and keys (G, n, D)")
    n = keys.shape[1]
    _check_count("side_topk", "k", k, 0, n, f"n={n}] (n = keys.shape[1]")
    _check_isa("side_topk", isa)
    mod = _load()
    if mod is None:
        return reference_side_topk(q, keys, k, sorted)
    vals, idx = mod.side_topk(q.detach(), keys.detach().contiguous(), k, sorted, ISAS[isa])
    if torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad):
        sel = keys.unsqueeze(1).expand(-1, q.shape[1], -1, -1).gather(               # (G, T, k, D)
            2, idx.unsqueeze(-1).expand(-1, -1, -1, q.shape[2]))
        vals = (sel * q.unsqueeze(2)).sum(-1)                                       # (G, T, k)
    return vals, idx


def pkm_topk(q: Tensor, keys: Tensor, k: int, *, isa: str = "auto") -> tuple[Tensor, Tensor]:
    """PKM's product-key search in one compiled pass (``csrc/pkm_search.cpp``), inference only.

    q (H, 2, T, D) queries per head and half; keys (H, 2, n, D) sub-keys. Returns the top-k scores
    (T, H, k), descending, and slot ids (T, H, k) (row sub-key * n + column sub-key): the sums
    ``side_topk`` + ``fast.search.pruned_pair_topk`` compute, bitwise. No gradients. Raises
    ``ConfigError`` on bad input and ``RuntimeError`` when the extension is not built."""
    for name, t in (("q", q), ("keys", keys)):
        if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 4:
            what = f"{t.dtype} {t.device.type} tensor of {t.dim()} dims" if isinstance(t, Tensor) else type(t).__name__
            raise ConfigError(f"pkm_topk: {name}={what}; expected a float32 CPU tensor (H, 2, ., D)")
    n = keys.shape[2]
    _check_count("pkm_topk", "k", k, 1, n, f"n={n}] (n = keys.shape[2]")
    _check_isa("pkm_topk", isa)
    scores, slots = _required_module("pkm_topk").pkm_topk(q.detach().contiguous(), keys.detach().contiguous(), k, ISAS[isa])
    return scores, slots


def tucker_topk(q: Tensor, keys: Tensor, pkeys: Tensor, core: Tensor, cores: Tensor | None, m: int, k: int,
                two_sided: bool = False, *, isa: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """UltraMem's TDQKR search in one compiled pass (``csrc/tucker_search.cpp``), inference only.

    q (H, 2, T, D) queries per head and side; keys (H, 2, R, n, D) normalised keys; pkeys (H, 2, n, D)
    proxy keys (u^T K_row, t^T K_col); core (H, R, R) the summed core; cores (h, H, R, R) or None.
    Returns cells (2, T, H, k) (rows, columns), scores (T, H, k) descending, vecs (2, T, H, R, k) (the
    selected cells' side-score columns) and core_scores (T, H, k, h) (None without ``cores``): what
    ``labcore.layers.fast.search.tucker_search`` returns on S = K q, to float32 rounding. No gradients.
    Raises ``ConfigError`` on bad input and ``RuntimeError`` when the extension is not built (the caller,
    ``fast.search.fused_tucker_search``, checks :func:`available` first)."""
    tensors = {"q": q, "keys": keys, "pkeys": pkeys, "core": core} | ({} if cores is None else {"cores": cores})
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.device.type != "cpu":
            what = f"{t.dtype} {t.device.type} tensor" if isinstance(t, Tensor) else type(t).__name__
            raise ConfigError(f"tucker_topk: {name}={what}; expected a float32 CPU tensor")
    n = keys.shape[-2] if keys.dim() == 5 else 0
    _check_count("tucker_topk", "m", m, 1, n, f"n={n}] (n = keys.shape[-2]")
    _check_count("tucker_topk", "k", k, 0, m * m, f"m*m={m * m}]")
    _check_isa("tucker_topk", isa)
    mod = _required_module("tucker_topk")
    empty = q.new_empty(0)
    cells, scores, vecs, cs = mod.tucker_topk(q.detach().contiguous(), keys.detach().contiguous(),
                                              pkeys.detach().contiguous(), core.detach().contiguous(),
                                              empty if cores is None else cores.detach().contiguous(),
                                              m, k, bool(two_sided), ISAS[isa])
    return cells, scores, vecs, (None if cores is None else cs)


def _bag_module(gy: Tensor, idx: Tensor, w: Tensor, table: Tensor, offsets: Tensor | None) -> ModuleType | None:
    """The extension when the value-read backward can run compiled for these tensors (CPU float32,
    int64 indices, 2-D or 1-D with offsets), else None (the reference runs)."""
    mod = _load()
    dims_ok = idx.dim() == 2 if offsets is None else (idx.dim() == 1 and offsets.dim() == 1)
    fast = (mod is not None and gy.device.type == idx.device.type == w.device.type == table.device.type == "cpu"
            and gy.dtype == w.dtype == table.dtype == torch.float32 and idx.dtype == torch.int64 and dims_ok)
    return mod if fast else None


def reference_bag_backward(gy: Tensor, idx: Tensor, w: Tensor, table: Tensor,
                           offsets: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The readable backward of ``y = F.embedding_bag(idx, table, offsets, mode="sum",
    per_sample_weights=w)``: PyTorch's own autograd. Returns (grad_table, grad_w)."""
    with torch.enable_grad():
        t = table.detach().requires_grad_(True)
        ww = w.detach().requires_grad_(True)
        y = torch.nn.functional.embedding_bag(idx, t, offsets, mode="sum", per_sample_weights=ww)
        gt, gw = torch.autograd.grad(y, (t, ww), gy)
    return gt, gw


def bag_backward(gy: Tensor, idx: Tensor, w: Tensor, table: Tensor, *, offsets: Tensor | None = None,
                 need_table: bool = True, need_w: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """Backward of the weighted value read ``y[b] = Σ_{j in bag b} w[j] table[idx[j]]`` (an embedding
    bag): ``grad_table[r] = Σ_{idx[j]=r} w[j] gy[bag(j)]`` and ``grad_w[j] = table[idx[j]] · gy[bag(j)]``.

    Bags: 2-D idx (n, S) with w (n, S), one bag of S rows per b (``offsets`` None); or 1-D idx (L,)
    with w (L,) and ``offsets`` (B,) (bag b starts at offsets[b], as ``F.embedding_bag``'s offsets);
    gy (bags, D), table (N, D).

    Compiled (CPU float32): one pass over idx (``csrc/value_bags.cpp``), deterministic whatever the
    thread count; sums in index order, so it agrees with :func:`reference_bag_backward` to float32
    rounding. Anything else (no extension, another dtype or device) runs the reference."""
    mod = _bag_module(gy, idx, w, table, offsets)
    if mod is None:
        gt, gw = reference_bag_backward(gy, idx, w, table, offsets)
        return (gt if need_table else None), (gw if need_w else None)
    if offsets is None:
        gt, gw = mod.bag_backward(gy.detach(), idx, w.detach(), table.detach(), need_table, need_w)
    else:
        gt, gw = mod.bag_backward_offsets(gy.detach(), idx, offsets.long(), w.detach(), table.detach(),
                                          need_table, need_w)
    return (gt if need_table else None), (gw if need_w else None)


def reference_sparse_bag_backward(gy: Tensor, idx: Tensor, w: Tensor, table: Tensor, offsets: Tensor | None = None,
                                  n_chunks: int = 1) -> tuple[Tensor, Tensor]:
    """The readable sparse-gradient backward: PyTorch's autograd on the (N*h, F/h) chunk view
    ``table``, the (N, F) gradient kept on the rows the indices touch (every row read, even one whose
    gradient is exactly zero), as a coalesced sparse COO tensor. Returns (grad_table, grad_w)."""
    gt, gw = reference_bag_backward(gy, idx, w, table, offsets)
    n, f = table.shape[0] // n_chunks, table.shape[1] * n_chunks
    rows = torch.unique(idx.reshape(-1) // n_chunks)                                # sorted, unique
    vals = gt.reshape(n, f).index_select(0, rows)
    return torch.sparse_coo_tensor(rows[None], vals, (n, f), is_coalesced=True, check_invariants=False), gw


def sparse_bag_backward(gy: Tensor, idx: Tensor, w: Tensor, table: Tensor, *, offsets: Tensor | None = None,
                        n_chunks: int = 1, need_w: bool = True) -> tuple[Tensor, Tensor | None]:
    """:func:`bag_backward` with the table gradient as a sparse COO tensor over the rows the step
    read (the PKM authors' ``--mem_sparse``; :class:`labcore.lm.sparse_optim.LazyAdamW` updates just
    those rows, without scanning a dense (N, F) gradient for non-zeros).

    ``table`` is the (N*h, F/h) chunk view of an (N, F) table (``n_chunks`` = h; 1: the table
    itself), idx addresses its rows (2-D, or 1-D with ``offsets``). Returns the (N, F) gradient,
    coalesced (sorted unique rows), and grad_w (None unless ``need_w``). Compiled on CPU float32
    (``csrc/value_bags.cpp``, deterministic for any thread count); otherwise
    :func:`reference_sparse_bag_backward`. Both count a row as touched when it is read, even if its
    gradient is exactly zero."""
    mod = _bag_module(gy, idx, w, table, offsets)
    if mod is None:
        gt, gw = reference_sparse_bag_backward(gy, idx, w, table, offsets, n_chunks)
        return gt, (gw if need_w else None)
    empty = idx.new_empty(0)
    rows, vals, gw = mod.bag_backward_sparse(gy.detach(), idx, empty if offsets is None else offsets.long(),
                                             w.detach(), table.detach(), n_chunks, need_w)
    n, f = table.shape[0] // n_chunks, table.shape[1] * n_chunks
    gt = torch.sparse_coo_tensor(rows[None], vals, (n, f), is_coalesced=True, check_invariants=False)
    return gt, (gw if need_w else None)


def sorted_names() -> list[str]:
    return list(ISAS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labcore.layers.fast.compiled",
                                description="Build labcore's compiled top-k extension (benchmark: "
                                            "python -m labcore.bench kernels).")
    p.add_argument("--build", action="store_true", help="compile the extension now (make setup runs this)")
    a = p.parse_args(argv)
    if a.build:
        if disabled():
            print(f"labcore compiled top-k: disabled by {ENV_DISABLE}; not built")
        else:
            try:
                _compile(verbose=False)
                _state["tried"] = False
                print(f"labcore compiled top-k: built in {build_dir()} (isa={isa()})")
            except Exception as exc:                                        # never fail setup
                print(f"labcore compiled top-k: build failed ({_one_line(exc)}); "
                      f"the layers use the PyTorch path")
    if not a.build:
        p.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
