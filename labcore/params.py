"""Notebook parameters: one typed cell, one validation call, errors before any work.

Every lab notebook starts with a papermill ``parameters`` cell of *typed, commented* assignments::

    from typing import Optional          # optional first line: names used in the annotations
    smoke: bool = False                  # fast run: tiny sizes, few steps
    rank: int = 2                        # Tucker rank R
    lrs: list[float] = [1e-3, 3e-3]      # learning rates to compare
    label: Optional[str] = None          # free-form tag
    out_dir: str = "results/local/x"     # run directory (the sweep runner sets it)
    seed: int = 0                        # RNG seed

and its second cell mirrors those names in a frozen dataclass and validates the namespace::

    @dataclass(frozen=True)
    class XParams:
        smoke: bool = False
        rank: int = 2
        ...
        def __post_init__(self):
            check_int("XParams", "rank", self.rank, min_value=1)

    P = validate_notebook_params(XParams, globals())

Why both: papermill (and ``papermill --help-notebook``, :func:`notebook_parameters`) reads the *cell*
to know which names and types a notebook accepts, while the dataclass is the single validation path
shared with the CLI and the sweeps (ranges, choices, cross-field rules in ``__post_init__``).

What :func:`validate_notebook_params` does, in order, before the notebook does any work:

1. collect the user-defined names of the namespace: everything except IPython's own (``In``, ``Out``,
   ``get_ipython``, ``exit``, ``quit``, ``open``), names starting with ``_``, modules, callables
   (functions, classes, imported helpers) and ``typing`` objects;
2. reject names the dataclass does not have (a misspelt papermill ``-p rnak 4`` injects ``rnak``);
3. check each value against the field's annotation -- strictly: ``True`` is not an ``int``, ``1`` is
   accepted (and converted) for ``float``, lists are checked element by element, ``Optional[X]``
   allows ``None``, ``Literal[...]`` lists the choices;
4. build the dataclass, so ``__post_init__`` range checks run too.

Every error is a :class:`NotebookParamError` (a ``ConfigError``) naming the dataclass, the
parameter, the value given and what is allowed.

Annotation forms papermill can read (its regex allows word characters, ``[``, ``]``, ``,`` and
spaces only): ``bool``, ``int``, ``float``, ``str``, ``list[float]``, ``Optional[int]``,
``dict[str, float]`` (not ``tuple[int, ...]``: no dots). ``int | None`` and ``Literal["a", "b"]`` are *not* readable
by papermill: such a line silently disappears from ``--help-notebook`` and from sweep validation,
so write ``Optional[int]`` and put choices in the comment and in ``__post_init__``.
"""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union  # noqa: UP035 - names resolvable from annotation text

from labcore.config import ConfigError

__all__ = [
    "NotebookParamError",
    "NotebookParameter",
    "validate_notebook_params",
    "user_namespace",
    "notebook_parameters",
    "parse_annotation",
    "check_value",
    "describe_type",
    "schema_mismatches",
]

# Names IPython / ipykernel put in every user namespace.
IPYTHON_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "open"})


class NotebookParamError(ConfigError):
    """A notebook parameter is unknown or has a value its annotation does not allow (a ConfigError,
    hence a ValueError)."""


class TypeMismatch(Exception):
    """Internal: a value does not match a type; ``allowed`` says what would."""

    def __init__(self, allowed: str):
        super().__init__(allowed)
        self.allowed = allowed


# ----------------------------------------------------------------------------------------------
# Types: describe, check and convert values (shared with the sweep-file validation).
# ----------------------------------------------------------------------------------------------


def describe_type(tp: Any) -> str:
    """Human description of an annotation, used in error messages ("a list of numbers", ...)."""
    if tp is Any:
        return "any value"
    if tp is type(None) or tp is None:
        return "None"
    if tp is bool:
        return "a bool (True or False)"
    if tp is int:
        return "an integer (not a bool)"
    if tp is float:
        return "a number (int or float, not a bool)"
    if tp is str:
        return "a string"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        parts = [describe_type(a) for a in non_none]
        if len(non_none) < len(args):
            parts.append("None")
        return " or ".join(parts)
    if origin is list or tp is list:
        return "a list" + (f" of {_plural(args[0])}" if args else "")
    if origin is tuple or tp is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {_plural(args[0])}"
        return "a tuple" + (f" ({', '.join(describe_type(a) for a in args)})" if args else "")
    if origin is dict or tp is dict:
        return "a dict" + (f" of {describe_type(args[0])} -> {describe_type(args[1])}" if args else "")
    return getattr(tp, "__name__", repr(tp))


def _plural(tp: Any) -> str:
    plurals = {bool: "bools", int: "integers", float: "numbers", str: "strings"}
    return plurals.get(tp, f"items ({describe_type(tp)})")


def check_value(tp: Any, value: Any) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float, tuple -> list, ...) or raise TypeMismatch.

    Strict where Python is lax: ``True`` is not an int or a float; a float is not an int even when
    integral (``2.0`` for ``int`` is rejected: a sweep grid would otherwise hash 2 and 2.0 apart).
    """
    if tp is Any:
        return value
    if tp is type(None) or tp is None:
        if value is None:
            return None
        raise TypeMismatch("None")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeMismatch(describe_type(tp))
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        raise TypeMismatch(describe_type(tp))
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise TypeMismatch(describe_type(tp))
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeMismatch(describe_type(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        for choice in args:
            if type(choice) is type(value) and choice == value:
                return value
        raise TypeMismatch(describe_type(tp))
    if origin in (Union, types.UnionType):
        # Try the exact-type members first so Optional[float] keeps an int... as a float, but
        # Union[int, float] keeps 3 an int.
        for member in sorted(args, key=lambda a: 0 if _exact_match(a, value) else 1):
            try:
                return check_value(member, value)
            except TypeMismatch:
                continue
        raise TypeMismatch(describe_type(tp))
    if origin is list or tp is list:
        if not isinstance(value, list | tuple):
            raise TypeMismatch(describe_type(tp))
        return [_item(tp, args[0], i, v) for i, v in enumerate(value)] if args else list(value)
    if origin is tuple or tp is tuple:
        if not isinstance(value, list | tuple):
            raise TypeMismatch(describe_type(tp))
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_item(tp, args[0], i, v) for i, v in enumerate(value))
        if len(args) != len(value):
            raise TypeMismatch(describe_type(tp))
        return tuple(_item(tp, a, i, v) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TypeMismatch(describe_type(tp))
        if not args:
            return dict(value)
        return {_item(tp, args[0], f"key {k!r}", k): _item(tp, args[1], repr(k), v) for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise TypeMismatch(describe_type(tp))
    return value  # an annotation we do not understand: accept (the dataclass may still check it)


def _item(container: Any, tp: Any, index: Any, value: Any) -> Any:
    """Check one element of a list/tuple/dict, naming it in the error."""
    try:
        return check_value(tp, value)
    except TypeMismatch as e:
        raise TypeMismatch(f"{describe_type(container)} (item {index} = {value!r} is not {e.allowed})") from None


def _exact_match(tp: Any, value: Any) -> bool:
    return isinstance(tp, type) and type(value) is tp


_ANNOTATION_NAMES: dict[str, Any] = {
    "bool": bool, "int": int, "float": float, "str": str, "list": list, "tuple": tuple, "dict": dict,
    "List": list, "Tuple": tuple, "Dict": dict, "Any": Any, "None": type(None), "NoneType": type(None),
    "Optional": Optional, "Union": Union, "Literal": Literal,
}


def parse_annotation(text: str | None) -> Any:
    """Turn annotation text (as papermill reports it, e.g. ``"Optional[list[float]]"``) into a
    typing object, without ``eval``: only the names above, subscripts, ``|`` and constants.
    ``None``/empty/``"None"`` (papermill's "no annotation") and anything unknown give ``Any``."""
    if text is None or not str(text).strip() or str(text).strip() == "None":
        return Any
    try:
        tree = ast.parse(str(text).strip(), mode="eval").body
        return _annotation_from_ast(tree)
    except (SyntaxError, ValueError, KeyError, TypeError):
        return Any


def _annotation_from_ast(node: ast.AST) -> Any:
    if isinstance(node, ast.Name):
        return _ANNOTATION_NAMES[node.id]
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "typing":
        return _ANNOTATION_NAMES[node.attr]
    if isinstance(node, ast.Constant):
        if node.value is None:
            return type(None)
        if node.value is Ellipsis:
            return Ellipsis
        if isinstance(node.value, str):  # a quoted annotation
            return _annotation_from_ast(ast.parse(node.value, mode="eval").body)
        raise ValueError(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return Union[_annotation_from_ast(node.left), _annotation_from_ast(node.right)]  # noqa: UP007
    if isinstance(node, ast.Subscript):
        base = _annotation_from_ast(node.value)
        elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if base is Literal:
            return Literal[tuple(ast.literal_eval(e) for e in elts)]
        args = tuple(_annotation_from_ast(e) for e in elts)
        return base[args if len(args) > 1 else args[0]]
    raise ValueError(ast.dump(node))


# ----------------------------------------------------------------------------------------------
# Validation of a notebook namespace against the dataclass.
# ----------------------------------------------------------------------------------------------


def user_namespace(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The user-defined, parameter-like names of a notebook namespace (see the module docstring)."""
    out = {}
    for name, value in namespace.items():
        if name.startswith("_") or name in IPYTHON_NAMES:
            continue
        if isinstance(value, types.ModuleType) or callable(value):
            continue
        if getattr(type(value), "__module__", "") == "typing":
            continue
        out[name] = value
    return out


def validate_notebook_params(schema_cls: type, namespace: Mapping[str, Any]) -> Any:
    """Check a notebook's namespace against ``schema_cls`` (a frozen dataclass) and build it.

    ``namespace`` is the notebook's ``globals()`` right after the parameters cell (and papermill's
    injected-parameters cell). Unknown names and wrongly typed values raise
    :class:`NotebookParamError`; names the namespace lacks take the dataclass default.
    """
    if not (isinstance(schema_cls, type) and dataclasses.is_dataclass(schema_cls)):
        raise TypeError(f"schema_cls must be a dataclass type, got {schema_cls!r}")
    owner = schema_cls.__name__
    fields = {f.name: f for f in dataclasses.fields(schema_cls) if f.init}
    hints = typing.get_type_hints(schema_cls)
    given = user_namespace(namespace)

    unknown = sorted(set(given) - set(fields))
    if unknown:
        name = unknown[0]
        raise NotebookParamError(
            f"{owner}: {name!r}={given[name]!r} is not a parameter of this notebook"
            + (f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else "")
            + f"; known parameters: {', '.join(fields)}. (Helpers that are not parameters belong "
            "after the validation cell, or start their name with '_'.)")

    values = {}
    for name in fields:
        if name not in given:
            continue
        try:
            values[name] = check_value(hints.get(name, Any), given[name])
        except TypeMismatch as e:
            raise NotebookParamError(
                f"{owner}.{name}={given[name]!r} ({type(given[name]).__name__}) is not allowed: "
                f"must be {e.allowed}") from None
    return schema_cls(**values)


# ----------------------------------------------------------------------------------------------
# What a notebook file declares (papermill's inspection, typed).
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NotebookParameter:
    """One parameter of a notebook's ``parameters`` cell, as papermill infers it.

    annotation: the annotation text (``"None"`` when absent); ``type``: its typing object, or the
    type of the literal default when unannotated, or ``Any``; ``default``: the default as a Python
    value when it is a literal (``has_default`` False otherwise), ``default_text`` the source text.
    """

    name: str
    annotation: str
    type: Any
    default_text: str
    default: Any
    has_default: bool
    help: str


def notebook_parameters(path: str | Path) -> dict[str, NotebookParameter]:
    """Parameters of a notebook file via ``papermill.inspect_notebook`` (what ``--help-notebook``
    prints), with types parsed and literal defaults evaluated."""
    import papermill  # lazy: papermill pulls in nbclient etc.

    raw = papermill.inspect_notebook(str(path))
    out = {}
    for name, p in raw.items():
        text = p.get("default", "")
        try:
            default, has_default = ast.literal_eval(text), True
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            default, has_default = None, False
        tp = parse_annotation(p.get("inferred_type_name"))
        if tp is Any and has_default and default is not None:
            tp = type(default) if type(default) in (bool, int, float, str) else Any
        out[name] = NotebookParameter(name=name, annotation=str(p.get("inferred_type_name")), type=tp,
                                      default_text=text, default=default, has_default=has_default,
                                      help=p.get("help", ""))
    return out


def schema_mismatches(schema_cls: type, path: str | Path) -> list[str]:
    """Differences between a notebook's parameters cell and its params dataclass (names, literal
    defaults), one line each; empty when they mirror each other. For notebook tests."""
    params = notebook_parameters(path)
    fields = {f.name: f for f in dataclasses.fields(schema_cls) if f.init}
    problems = [f"{n}: in the parameters cell but not in {schema_cls.__name__}"
                for n in params if n not in fields]
    problems += [f"{n}: in {schema_cls.__name__} but not in the parameters cell"
                 for n in fields if n not in params]
    for name in params.keys() & fields.keys():
        f, p = fields[name], params[name]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if p.has_default and _normalise(p.default) != _normalise(default):
            problems.append(f"{name}: default {p.default_text} in the cell, {default!r} in "
                            f"{schema_cls.__name__}")
    return problems


def _normalise(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_normalise(x) for x in v]
    return v

