"""Config validation shared by every labcore config: one error type, one message format, no torch.

Every frozen config dataclass (layer configs, data configs, notebook parameters, benchmark and
profiling settings) validates itself in ``__post_init__`` with the helpers below, so bad input
stops before any work with a :class:`ConfigError` that names the owner, the field, the value and
what is allowed::

    TDQKRParams.steps=-5 is not allowed: must be an integer in [1, inf]

This module imports only the standard library: the sweep driver, the data generators and the
notebooks' parameter schemas validate values without loading torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

__all__ = ["ConfigError", "fail", "check_int", "check_float", "check_bool", "check_str", "check_choice",
           "check_int_list", "is_perfect_square", "from_dict"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config field has a value that is not allowed. Subclass of ValueError."""


def fail(owner: str, name: str, value: Any, allowed: str) -> None:
    """Raise the one ConfigError format: ``"{owner}.{name}={value!r} is not allowed: must be {allowed}"``."""
    raise ConfigError(f"{owner}.{name}={value!r} is not allowed: must be {allowed}")


def check_int(owner: str, name: str, value: Any, *, min_value: int | None = 1,
              max_value: int | None = None) -> None:
    """Raise ConfigError unless ``value`` is an int (not bool) within [min_value, max_value]."""
    lo = "-inf" if min_value is None else min_value
    hi = "inf" if max_value is None else max_value
    allowed = f"an integer in [{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, int):
        fail(owner, name, value, allowed)
    if (min_value is not None and value < min_value) or (max_value is not None and value > max_value):
        fail(owner, name, value, allowed)


def check_float(owner: str, name: str, value: Any, *, min_value: float | None = None,
                max_value: float | None = None, min_inclusive: bool = True) -> None:
    """Raise ConfigError unless ``value`` is a finite real number (int or float, not bool) within
    the bounds; ``min_inclusive=False`` excludes ``min_value`` itself."""
    lo = "-inf" if min_value is None else min_value
    hi = "inf" if max_value is None else max_value
    allowed = f"a finite number in {'[' if min_inclusive else '('}{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        fail(owner, name, value, allowed)
    if min_value is not None and (value < min_value or (not min_inclusive and value == min_value)):
        fail(owner, name, value, allowed)
    if max_value is not None and value > max_value:
        fail(owner, name, value, allowed)


def check_bool(owner: str, name: str, value: Any) -> None:
    """Raise ConfigError unless ``value`` is exactly True or False (not 0/1, not a string)."""
    if not isinstance(value, bool):
        fail(owner, name, value, "True or False")


def check_str(owner: str, name: str, value: Any) -> None:
    """Raise ConfigError unless ``value`` is a non-empty string."""
    if not isinstance(value, str) or not value:
        fail(owner, name, value, "a non-empty string")


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        fail(owner, name, value, "one of " + ", ".join(repr(c) for c in choices))


def check_int_list(owner: str, name: str, value: Any, *, min_value: int | None = 1,
                   max_value: int | None = None) -> None:
    """Raise ConfigError unless ``value`` is a non-empty list or tuple of ints (not bools), each
    within [min_value, max_value]."""
    lo = "-inf" if min_value is None else min_value
    hi = "inf" if max_value is None else max_value
    allowed = f"a non-empty list of integers in [{lo}, {hi}]"
    if not isinstance(value, list | tuple) or not value:
        fail(owner, name, value, allowed)
    for v in value:
        if (isinstance(v, bool) or not isinstance(v, int) or (min_value is not None and v < min_value)
                or (max_value is not None and v > max_value)):
            fail(owner, name, value, allowed)


def is_perfect_square(n: int) -> bool:
    """True when ``n`` is k*k for an integer k >= 0."""
    return n >= 0 and math.isqrt(n) ** 2 == n


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build the dataclass ``cls`` from plain data (a mapping, e.g. parsed JSON or YAML).

    Unknown keys and missing required ones raise ConfigError naming them and the allowed keys;
    the dataclass's own ``__post_init__`` then checks the values. Nested configs are the caller's
    business (build them first and pass the objects)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict: cls={cls!r} is not a dataclass type")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    if not isinstance(data, Mapping):
        raise ConfigError(f"{cls.__name__}: {data!r} is not allowed: must be a mapping of field: value; "
                          f"allowed keys: {sorted(names)}")
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; allowed keys: {sorted(names)}")
    missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{cls.__name__}: missing required key(s) {missing}; allowed keys: {sorted(names)}")
    return cls(**data)
