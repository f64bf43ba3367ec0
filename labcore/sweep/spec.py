"""Sweep files: what to run, validated completely before anything runs; and run ids.

A sweep file (YAML) names notebooks and the parameter sets to run each with::

    name: quick                  # the sweep's directory under the results root
    description: smoke-size ablations
    notebook_dir: ../notebooks   # where notebook names resolve (relative to this file)
    seeds: [0, 1]                # every run is repeated per seed (default [0])
    timeout: 900                 # wall-clock seconds per run (default 3600)
    gpu: false                   # runs need a GPU slot (dask resource GPU=1)
    common:                      # parameters given to every notebook
      smoke: true
    notebooks:
      - notebook: 01_tdqkr.ipynb
        grid:                    # cartesian product: 3 x 2 = 6 parameter sets
          rank: [1, 2, 4]
          scoring: [tucker, additive]
      - notebook: 02_ive.ipynb
        params: {steps: 200}     # fixed for this entry
        runs:                    # explicit parameter sets (each combined with the grid, if any)
          - {expansion: 1}
          - {expansion: 4}
        seeds: [0]               # per-entry overrides of seeds / timeout / gpu
        timeout: 300

Parameter sets of an entry = ``common | params | run | grid point`` for every run of ``runs`` (or
one empty run) and every grid point (or one empty point), times every seed.

Validation (:func:`load_sweep`) reads each notebook's ``parameters`` cell through
``papermill.inspect_notebook`` (:func:`labcore.params.notebook_parameters`) and rejects, naming the
entry: unknown keys, a notebook that does not exist or lacks ``out_dir``/``seed`` parameters, a
parameter the notebook does not have, a value of the wrong type (strict: ``true`` is not an int),
an empty grid, grid values that are not lists, ``out_dir``/``seed`` set by hand. Then every run's
*values* go through the notebook's own params dataclass, exactly as its validation cell
``P = validate_notebook_params(XParams, globals())`` will (:func:`notebook_schema` finds ``XParams``
and the module it is imported from in the notebook's code; ``labcore.experiments.params`` holds the
lab's, torch-free): ranges, choices and cross-field rules of ``__post_init__``. All problems are
reported together, before any kernel starts, e.g.::

    sweep quick.yaml: notebooks[1] (01_tdqkr.ipynb): parameter 'rnak' is not a parameter of this
    notebook; known: smoke, rank, scoring, out_dir, seed
    sweep bad.yaml: notebooks[0] (01_tdqkr.ipynb) run [seed=0]: TDQKRParams.steps=-5 is not
    allowed: must be an integer in [1, inf]

A notebook that defines its params class in a cell (no import) gets the type checks only.

Run ids are content hashes: ``<notebook stem>-<sha256[:12]>`` of the notebook's *content* (cell
types, sources and tags; not outputs, execution counts or ids), the validated parameters and the
seed. Editing a notebook's code or a parameter gives a new id (a new run); re-running the same
sweep gives the same ids, so finished runs are found and skipped.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import importlib.util
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from labcore.params import (
    TypeMismatch,
    check_value,
    describe_type,
    notebook_parameters,
    validate_notebook_params,
)

__all__ = ["SweepError", "RunSpec", "SweepSpec", "load_sweep", "parse_sweep", "notebook_fingerprint",
           "make_run_id", "notebook_schema", "notebook_schema_ref", "check_run_values", "RESERVED_PARAMS",
           "DEFAULT_TIMEOUT_S"]

RESERVED_PARAMS = ("out_dir", "seed")  # set by the runner for every run
DEFAULT_TIMEOUT_S = 3600.0
TOP_KEYS = ("name", "description", "notebook_dir", "seeds", "timeout", "gpu", "common", "notebooks")
ENTRY_KEYS = ("notebook", "params", "grid", "runs", "seeds", "timeout", "gpu")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SweepError(ValueError):
    """A sweep file is invalid; the message names the file and the entry (one line per problem)."""


@dataclass(frozen=True)
class RunSpec:
    """One notebook execution: notebook x parameters x seed. ``params`` excludes out_dir/seed."""

    run_id: str
    sweep: str
    notebook: str          # absolute path
    notebook_name: str     # as written in the sweep file
    entry: int             # index in the sweep file's notebooks list
    params: dict[str, Any] = field(hash=False)
    seed: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    gpu: bool = False

    def papermill_parameters(self, out_dir: str | Path) -> dict[str, Any]:
        return {**self.params, "out_dir": str(out_dir), "seed": self.seed}

    def describe(self) -> str:
        ps = " ".join(f"{k}={_short(v)}" for k, v in self.params.items())
        return f"{Path(self.notebook_name).name} [{ps}] seed={self.seed}"


def _short(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return s if len(s) <= 24 else s[:21] + "..."


@dataclass(frozen=True)
class SweepSpec:
    name: str
    source: str
    runs: tuple[RunSpec, ...]
    description: str = ""
    duplicates: int = 0    # parameter sets listed more than once (run once)

    @property
    def notebooks(self) -> list[str]:
        return sorted({r.notebook for r in self.runs})

    @property
    def needs_gpu(self) -> bool:
        return any(r.gpu for r in self.runs)

    def with_timeout(self, timeout_s: float) -> SweepSpec:
        """The same sweep with every run's timeout replaced (``--timeout``); run ids unchanged."""
        runs = tuple(replace(r, timeout_s=float(timeout_s)) for r in self.runs)
        return SweepSpec(self.name, self.source, runs, self.description, self.duplicates)


# ----------------------------------------------------------------------------------------------
# Run ids.
# ----------------------------------------------------------------------------------------------


def notebook_fingerprint(path: str | Path) -> str:
    """sha256 of a notebook's content without outputs: cell types, sources, tags (in order)."""
    import nbformat  # heavy import (seconds): only when needed

    nb = nbformat.read(str(path), as_version=4)
    cells = [{"type": c.cell_type, "source": c.source, "tags": sorted(c.get("metadata", {}).get("tags", []))}
             for c in nb.cells]
    return hashlib.sha256(json.dumps(cells, sort_keys=True).encode()).hexdigest()


def make_run_id(notebook: str | Path, params: Mapping[str, Any], seed: int,
                fingerprint: str | None = None) -> str:
    """``<stem>-<12 hex>``: hash of notebook content + parameters + seed (see module docstring)."""
    fp = fingerprint or notebook_fingerprint(notebook)
    payload = json.dumps({"notebook": fp, "params": dict(params), "seed": seed}, sort_keys=True,
                         allow_nan=True)
    return f"{Path(notebook).stem}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


# ----------------------------------------------------------------------------------------------
# Loading and validation.
# ----------------------------------------------------------------------------------------------


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and fully validate a sweep file; raise :class:`SweepError` listing every problem."""

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"sweep {path.name}: not valid YAML: {e}") from None
    return parse_sweep(data, source=str(path.resolve()), base_dir=path.resolve().parent)


def parse_sweep(data: Any, source: str, base_dir: str | Path) -> SweepSpec:
    """Validate sweep data (the parsed YAML) and expand it into runs."""
    label = f"sweep {Path(source).name}"
    errors: list[str] = []
    base_dir = Path(base_dir)

    def err(where: str, msg: str) -> None:
        errors.append(f"{label}: {where}{': ' if where else ''}{msg}")

    if not isinstance(data, Mapping):
        raise SweepError(f"{label}: must be a mapping with keys {', '.join(TOP_KEYS)}; "
                         f"got {type(data).__name__}")
    for k in data:
        if k not in TOP_KEYS:
            err("", f"unknown key {k!r}; allowed: {', '.join(TOP_KEYS)}")

    name = data.get("name", Path(source).stem)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        err("name", f"{name!r} is not allowed: must be a non-empty string of letters, digits, '_', '.', '-'")
    description = data.get("description", "")
    seeds = _check_seeds(data.get("seeds", [0]), "seeds", err)
    timeout = _check_timeout(data.get("timeout", DEFAULT_TIMEOUT_S), "timeout", err)
    gpu = _check_bool(data.get("gpu", False), "gpu", err)
    common = data.get("common", {}) or {}
    if not isinstance(common, Mapping):
        err("common", f"must be a mapping of parameter: value, got {common!r}")
        common = {}

    nb_dirs = _notebook_dirs(data.get("notebook_dir"), base_dir, err)
    entries = data.get("notebooks")
    if not isinstance(entries, list) or not entries:
        err("notebooks", f"must be a non-empty list of entries (notebook: NAME, grid/params/runs), got {entries!r}")
        entries = []

    runs: list[RunSpec] = []
    fingerprints: dict[str, str] = {}
    for i, entry in enumerate(entries):
        runs.extend(_expand_entry(i, entry, nb_dirs, name, common, seeds, timeout, gpu, err, fingerprints))

    if errors:
        raise SweepError("\n".join(errors))
    unique: dict[str, RunSpec] = {}
    for r in runs:
        unique.setdefault(r.run_id, r)
    return SweepSpec(name=name, source=source, runs=tuple(unique.values()), description=str(description),
                     duplicates=len(runs) - len(unique))


def _notebook_dirs(value: Any, base_dir: Path, err) -> list[Path]:
    if value is None:
        return [base_dir, base_dir.parent / "notebooks", base_dir / "notebooks", Path.cwd() / "notebooks"]
    if not isinstance(value, str):
        err("notebook_dir", f"{value!r} is not allowed: must be a path (relative to the sweep file)")
        return [base_dir]
    d = (base_dir / value).resolve()
    if not d.is_dir():
        err("notebook_dir", f"{value!r} -> {d} is not a directory")
    return [d]


def _check_seeds(value: Any, where: str, err) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (not isinstance(value, list) or not value
            or any(isinstance(s, bool) or not isinstance(s, int) for s in value)):
        err(where, f"{value!r} is not allowed: must be an integer or a non-empty list of integers")
        return [0]
    if len(set(value)) != len(value):
        err(where, f"{value!r} has repeated seeds")
    return list(value)


def _check_timeout(value: Any, where: str, err) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        err(where, f"{value!r} is not allowed: must be a positive number of seconds")
        return DEFAULT_TIMEOUT_S
    return float(value)


def _check_bool(value: Any, where: str, err) -> bool:
    if not isinstance(value, bool):
        err(where, f"{value!r} is not allowed: must be true or false")
        return False
    return value


def _expand_entry(i, entry, nb_dirs, sweep_name, common, seeds, timeout, gpu, err, fingerprints) -> list[RunSpec]:
    where = f"notebooks[{i}]"
    if isinstance(entry, str):
        entry = {"notebook": entry}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("notebook"), str):
        err(where, f"must be a mapping with a 'notebook' name (and grid/params/runs), got {entry!r}")
        return []
    nb_name = entry["notebook"]
    where = f"notebooks[{i}] ({nb_name})"
    n_err = 0

    def e(msg: str, sub: str = "") -> None:
        nonlocal n_err
        n_err += 1
        err(where + (f" {sub}" if sub else ""), msg)

    for k in entry:
        if k not in ENTRY_KEYS:
            e(f"unknown key {k!r}; allowed: {', '.join(ENTRY_KEYS)}")

    nb_path = next((d / nb_name for d in nb_dirs if (d / nb_name).is_file()), None)
    if nb_path is None:
        e(f"notebook not found; looked in: {', '.join(str(d) for d in nb_dirs)}")
        return []
    nb_path = nb_path.resolve()
    try:
        declared = notebook_parameters(nb_path)
    except Exception as ex:  # noqa: BLE001 - unreadable notebook: report, keep validating others
        e(f"cannot read the notebook's parameters: {type(ex).__name__}: {ex}")
        return []
    for reserved in RESERVED_PARAMS:
        if reserved not in declared:
            e(f"the notebook has no {reserved!r} parameter; sweep notebooks must declare "
              "'out_dir: str' and 'seed: int' in their parameters cell")
    known = ", ".join(declared) or "(none: no cell tagged 'parameters')"

    def check_params(ps: Any, sub: str) -> dict[str, Any]:
        if not isinstance(ps, Mapping):
            e(f"must be a mapping of parameter: value, got {ps!r}", sub)
            return {}
        out = {}
        for pname, value in ps.items():
            if pname in RESERVED_PARAMS:
                e(f"parameter {pname!r} is set by the runner for every run"
                  + (" (use 'seeds:')" if pname == "seed" else ""), sub)
            elif pname not in declared:
                e(f"parameter {pname!r} is not a parameter of this notebook; known: {known}", sub)
            else:
                out[pname] = check_one(pname, value, f"{sub}.{pname}" if sub else pname)
        return out

    def check_one(pname: str, value: Any, sub: str) -> Any:
        p = declared[pname]
        try:
            return check_value(p.type, value)
        except TypeMismatch as ex:
            e(f"{value!r} is not allowed for parameter {pname!r} ({p.annotation} in the notebook): "
              f"must be {ex.allowed}", sub)
            return value

    common_ps = check_params(common, "(common)") if common else {}
    fixed = check_params(entry.get("params", {}) or {}, "params")

    grid_points: list[dict[str, Any]] = [{}]
    if "grid" in entry:
        grid = entry["grid"]
        if not isinstance(grid, Mapping) or not grid:
            e(f"empty grid: must map parameter names to non-empty lists of values, got {grid!r}", "grid")
        else:
            axes = []
            for pname, values in grid.items():
                if not isinstance(values, list) or not values:
                    e(f"{values!r} is not allowed: grid values must be a non-empty list", f"grid.{pname}")
                    continue
                if pname in RESERVED_PARAMS or pname not in declared:
                    check_params({pname: values[0]}, "grid")
                    continue
                axes.append([(pname, check_one(pname, v, f"grid.{pname}[{j}]")) for j, v in enumerate(values)])
            grid_points = [dict(point) for point in itertools.product(*axes)] if axes else [{}]

    run_sets: list[dict[str, Any]] = [{}]
    if "runs" in entry:
        rs = entry["runs"]
        if not isinstance(rs, list) or not rs:
            e(f"must be a non-empty list of parameter mappings, got {rs!r}", "runs")
        else:
            run_sets = [check_params(r, f"runs[{j}]") for j, r in enumerate(rs)]

    e_seeds = _check_seeds(entry["seeds"], f"{where} seeds", err) if "seeds" in entry else seeds
    e_timeout = _check_timeout(entry["timeout"], f"{where} timeout", err) if "timeout" in entry else timeout
    e_gpu = _check_bool(entry["gpu"], f"{where} gpu", err) if "gpu" in entry else gpu
    if n_err:
        return []

    # Values: every run's parameters through the notebook's own params dataclass, as its
    # validation cell will do, so a bad value stops the sweep here and not in a kernel.
    try:
        schema = notebook_schema(nb_path)
    except SweepError as ex:
        e(str(ex))
        return []
    defaults = {n: p.default for n, p in declared.items() if p.has_default and n not in RESERVED_PARAMS}
    value_errors: dict[str, list[str]] = {}

    key = str(nb_path)
    if key not in fingerprints:
        fingerprints[key] = notebook_fingerprint(nb_path)
    runs = []
    for j, rset in enumerate(run_sets):
        for point in grid_points:
            params = {**common_ps, **fixed, **rset, **point}
            for seed in e_seeds:
                run_id = make_run_id(nb_path, params, seed, fingerprints[key])
                if schema is not None:
                    problem = check_run_values(schema, {**defaults, **params}, seed, run_id)
                    if problem:
                        label = ", ".join(([f"runs[{j}]"] if "runs" in entry else [])
                                          + [f"{k}={_short(v)}" for k, v in point.items()] + [f"seed={seed}"])
                        value_errors.setdefault(problem, []).append(label)
                runs.append(RunSpec(run_id=run_id, sweep=sweep_name, notebook=key, notebook_name=nb_name,
                                    entry=i, params=params, seed=seed, timeout_s=e_timeout, gpu=e_gpu))
    for problem, labels in value_errors.items():
        more = f" (and {len(labels) - 1} more run(s) of this entry)" if len(labels) > 1 else ""
        e(f"{problem}{more}", f"run [{labels[0]}]")
    return [] if value_errors else runs


# ----------------------------------------------------------------------------------------------
# Value validation: the notebook's params dataclass, found through its validation cell.
# ----------------------------------------------------------------------------------------------

VALIDATE_CALL = "validate_notebook_params"


def notebook_schema_ref(path: str | Path) -> tuple[str, str] | None:
    """``(module, class name)`` of the params dataclass a notebook validates with.

    Read from the notebook's code (never executed): the first argument of its
    ``validate_notebook_params(NAME, globals())`` call and the ``from MODULE import NAME`` before
    it. None when the notebook has no such call or defines the class in a cell (then only the
    parameter types are checked before the run)."""
    import nbformat  # heavy import (seconds): only when needed

    nb = nbformat.read(str(path), as_version=4)
    imported: dict[str, tuple[str, str] | None] = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tree = _parse_cell(cell.source)
        for stmt in tree.body if tree is not None else []:
            if isinstance(stmt, ast.ImportFrom) and stmt.module and not stmt.level:
                for a in stmt.names:
                    imported[a.asname or a.name] = (stmt.module, a.name)
            elif isinstance(stmt, ast.ClassDef):
                imported[stmt.name] = None
            for node in ast.walk(stmt):
                if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Name)
                        and _call_name(node.func) == VALIDATE_CALL):
                    return imported.get(node.args[0].id)
    return None


def notebook_schema(path: str | Path) -> type | None:
    """The params dataclass a notebook validates with (see :func:`notebook_schema_ref`), imported
    from the module that defines it: re-exports (``from labcore.experiments.params import X`` in
    the module the notebook names) are followed in the source first, so the sweep driver loads
    ``labcore.experiments.params`` (no torch) rather than the experiment module. Raises
    SweepError when the class named in the notebook cannot be imported."""
    ref = notebook_schema_ref(path)
    if ref is None:
        return None
    module, name = ref
    try:
        cls = _import_class(module, name)
    except Exception as ex:  # noqa: BLE001 - any import failure is reported against the notebook
        raise SweepError(f"cannot import the notebook's params class {name} from {module}: "
                         f"{type(ex).__name__}: {ex}") from None
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise SweepError(f"{module}.{name}, passed to {VALIDATE_CALL} by the notebook, is not a dataclass")
    return cls


def check_run_values(schema: type, params: Mapping[str, Any], seed: int, out_dir: str) -> str | None:
    """Build ``schema`` from one run's parameters as the notebook's validation cell will (the
    runner's ``out_dir`` and ``seed`` included); the error message, or None when they are valid."""
    try:
        validate_notebook_params(schema, {**params, "out_dir": out_dir, "seed": seed})
    except (ValueError, TypeError) as ex:  # ConfigError is a ValueError
        return str(ex)
    return None


def _parse_cell(source: str) -> ast.Module | None:
    # IPython magics and shell escapes are not Python: blank them before parsing.
    lines = ["" if ln.lstrip().startswith(("%", "!")) else ln for ln in source.splitlines()]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return None


def _call_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _import_class(module: str, name: str, depth: int = 0) -> Any:
    """``module.name``, importing the module where the class is defined (followed statically
    through ``from X import name`` re-exports, at most 8 deep)."""
    spec = importlib.util.find_spec(module)
    origin = getattr(spec, "origin", None)
    if depth < 8 and origin and origin.endswith(".py"):
        for stmt in ast.parse(Path(origin).read_text()).body:
            if isinstance(stmt, ast.ClassDef) and stmt.name == name:
                break
            if isinstance(stmt, ast.ImportFrom):
                for a in stmt.names:
                    if (a.asname or a.name) == name:
                        src = (importlib.util.resolve_name("." * stmt.level + (stmt.module or ""), spec.parent)
                               if stmt.level else stmt.module)
                        return _import_class(src, a.name, depth + 1)
    return getattr(importlib.import_module(module), name)


def describe_parameters(path: str | Path) -> str:
    """One line per notebook parameter: ``name: type = default  # help`` (for error hints)."""
    return "\n".join(f"{p.name}: {p.annotation} = {p.default_text}  # {p.help} ({describe_type(p.type)})"
                     for p in notebook_parameters(path).values())
