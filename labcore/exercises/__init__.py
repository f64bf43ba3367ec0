"""Self-checked exercises for the notebooks: ``check("03.1", answer)`` says right or wrong, and why.

Each notebook ends with a few exercises. A learner writes an answer in a cell and calls
:func:`check`; the checker computes the right answer from labcore itself (a layer's config, its
cost model, a run's table) rather than from a stored constant, so an exercise stays right when
the code changes, and it explains *why* an answer is right or wrong. :func:`solution` prints the
worked solution; notebooks only call it in a cell a learner runs on purpose (solutions are never
shown by default).

Exercises are registered per notebook in ``labcore/exercises/nbXX.py`` with :func:`exercise`::

    @exercise("03.1", "Set E so that the virtual table has 4x the physical rows.",
              solution="E is the expansion: each physical row serves E virtual rows ...")
    def _(answer):
        ok = int(answer) == 4
        return ok, "E = 4: N_virtual = E * N_physical" if ok else f"E = {answer} gives {answer}x, not 4x"

A checker returns ``(right, why)``; it raises :class:`~labcore.config.ConfigError` for an answer of
the wrong kind (a string where a number is asked), naming what is allowed.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from labcore.config import ConfigError

__all__ = ["Exercise", "Solution", "Verdict", "exercise", "as_number", "as_whole", "as_choice", "check", "solution", "exercises_for", "get"]


@dataclass(frozen=True)
class Exercise:
    """One exercise: ``id`` ("NN.k": notebook NN, k-th exercise), the question, the checker
    ``answer -> (right, why)`` and the worked solution (markdown text)."""

    id: str
    question: str
    checker: Callable[[Any], tuple[bool, str]]
    solution: str

    @property
    def notebook(self) -> str:
        return self.id.split(".")[0]


@dataclass(frozen=True)
class Verdict:
    """What :func:`check` returns: ``right`` and the explanation. Truthy when right; shown in a
    notebook as one line ("right: ..." / "not yet: ...")."""

    exercise: str
    right: bool
    why: str

    def __bool__(self) -> bool:
        return self.right

    def __str__(self) -> str:
        return f"[{self.exercise}] {'right' if self.right else 'not yet'}: {self.why}"

    def _repr_markdown_(self) -> str:
        mark = "✅ **right**" if self.right else "❌ **not yet**"
        return f"{mark} ({self.exercise}): {self.why}"

    __repr__ = __str__


# Answer checks the checkers share: the right kind of answer, or a ConfigError naming what is allowed.


def as_number(id: str, answer: Any, name: str = "answer") -> float:
    """``answer`` as a float; ConfigError unless it is a finite int or float (not a bool)."""
    if isinstance(answer, bool) or not isinstance(answer, int | float) or not math.isfinite(answer):
        raise ConfigError(f"exercise {id}: {name}={answer!r} is not allowed: must be a finite number")
    return float(answer)


def as_whole(id: str, answer: Any, name: str = "answer") -> int:
    """``answer`` as an int; ConfigError unless it is a finite int or float with no fractional part."""
    if (isinstance(answer, bool) or not isinstance(answer, int | float) or not math.isfinite(answer)
            or answer != int(answer)):
        raise ConfigError(f"exercise {id}: {name}={answer!r} is not allowed: must be a whole number")
    return int(answer)


def as_choice(id: str, answer: Any, allowed: tuple[str, ...]) -> str:
    """``answer`` stripped and lower-cased; ConfigError unless it is one of ``allowed``."""
    if not isinstance(answer, str) or answer.strip().lower() not in allowed:
        raise ConfigError(f"exercise {id}: answer={answer!r} is not allowed: must be one of {list(allowed)}")
    return answer.strip().lower()


_REGISTRY: dict[str, Exercise] = {}
_LOADED = False


def exercise(id: str, question: str, *, solution: str) -> Callable[[Callable[[Any], tuple[bool, str]]], Exercise]:
    """Decorator registering a checker as exercise ``id`` (unique)."""
    if not isinstance(id, str) or "." not in id:
        raise ConfigError(f"exercise: id={id!r} is not allowed: must look like 'NN.k' (notebook, number)")

    def wrap(fn: Callable[[Any], tuple[bool, str]]) -> Exercise:
        if id in _REGISTRY:
            raise ConfigError(f"exercise: id={id!r} is already registered")
        ex = Exercise(id, question, fn, solution)
        _REGISTRY[id] = ex
        return ex

    return wrap


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    for m in pkgutil.iter_modules(__path__):
        if m.name.startswith("nb"):
            importlib.import_module(f"{__name__}.{m.name}")
    _LOADED = True


def get(id: str) -> Exercise:
    """The exercise ``id``; ConfigError naming the known ids if there is none."""
    _load()
    if id not in _REGISTRY:
        raise ConfigError(f"exercise id={id!r} is not known: must be one of {sorted(_REGISTRY)}")
    return _REGISTRY[id]


def exercises_for(notebook: str) -> list[Exercise]:
    """The exercises of notebook ``notebook`` ("03" or "03_virtual_memory"), in id order."""
    _load()
    nb = notebook.split("_")[0]
    return sorted((e for e in _REGISTRY.values() if e.notebook == nb),
                  key=lambda e: [int(x) if x.isdigit() else x for x in e.id.split(".")])


def check(id: str, answer: Any) -> Verdict:
    """Check ``answer`` to exercise ``id``: a :class:`Verdict` (right or not, and why)."""
    ex = get(id)
    if answer is None or answer is Ellipsis:
        return Verdict(id, False, "no answer yet: replace the ... with yours")
    right, why = ex.checker(answer)
    return Verdict(id, bool(right), why)


class Solution(str):
    """A worked solution: a str that a notebook renders as markdown."""

    def _repr_markdown_(self) -> str:
        return str(self)


def solution(id: str) -> Solution:
    """The worked solution of exercise ``id`` (markdown). Shown only when asked for."""
    return Solution(get(id).solution)
