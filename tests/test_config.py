"""labcore.config: the validation helpers every config uses, and the torch-free import contract."""

import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from labcore import config
from labcore.config import (
    ConfigError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_int_list,
    check_str,
    from_dict,
    is_perfect_square,
)

ROOT = Path(__file__).resolve().parents[1]


def rejects(fn, *args, **kw) -> str:
    """Call a check that must fail; return its message."""
    with pytest.raises(ConfigError) as e:
        fn(*args, **kw)
    return str(e.value)


def test_config_error_is_a_value_error_and_what_the_layers_raise():
    assert issubclass(ConfigError, ValueError)
    from labcore.layers.pkm import PKMConfig

    with pytest.raises(config.ConfigError, match=r"PKMConfig.n_keys=0 is not allowed"):
        PKMConfig(d_model=16, n_keys=0)


@pytest.mark.parametrize("value, kw", [(1, {}), (0, {"min_value": 0}), (7, {"min_value": 7, "max_value": 7}),
                                       (-3, {"min_value": None}), (10**12, {})])
def test_check_int_accepts(value, kw):
    assert check_int("Cfg", "n", value, **kw) is None


@pytest.mark.parametrize("value, kw, allowed", [
    (0, {}, "an integer in [1, inf]"),
    (True, {"min_value": 0}, "an integer in [0, inf]"),      # a bool is not an int
    (2.0, {}, "an integer in [1, inf]"),                    # nor is an integral float
    ("3", {}, "an integer in [1, inf]"),
    (9, {"min_value": 1, "max_value": 8}, "an integer in [1, 8]"),
    (-1, {"min_value": None, "max_value": -2}, "an integer in [-inf, -2]"),
])
def test_check_int_rejects_naming_field_value_and_allowed(value, kw, allowed):
    msg = rejects(check_int, "Cfg", "n", value, **kw)
    assert msg == f"Cfg.n={value!r} is not allowed: must be {allowed}"


@pytest.mark.parametrize("value, kw", [(0.5, {}), (3, {}), (0.0, {"min_value": 0.0}),
                                       (1.0, {"min_value": 0.0, "max_value": 1.0}),
                                       (1e-9, {"min_value": 0.0, "min_inclusive": False})])
def test_check_float_accepts(value, kw):
    assert check_float("Cfg", "lr", value, **kw) is None


@pytest.mark.parametrize("value, kw, allowed", [
    (math.nan, {}, "a finite number in [-inf, inf]"),
    (math.inf, {}, "a finite number in [-inf, inf]"),
    (False, {}, "a finite number in [-inf, inf]"),
    ("0.1", {}, "a finite number in [-inf, inf]"),
    (0.0, {"min_value": 0.0, "min_inclusive": False}, "a finite number in (0.0, inf]"),
    (-0.1, {"min_value": 0.0}, "a finite number in [0.0, inf]"),
    (1.5, {"min_value": 0.0, "max_value": 1.0}, "a finite number in [0.0, 1.0]"),
])
def test_check_float_rejects_naming_field_value_and_allowed(value, kw, allowed):
    msg = rejects(check_float, "Cfg", "lr", value, **kw)
    assert msg == f"Cfg.lr={value!r} is not allowed: must be {allowed}"


def test_check_bool():
    check_bool("Cfg", "smoke", True)
    check_bool("Cfg", "smoke", False)
    for bad in (0, 1, "true", None):
        assert rejects(check_bool, "Cfg", "smoke", bad) == f"Cfg.smoke={bad!r} is not allowed: must be True or False"


def test_check_str():
    check_str("Cfg", "out_dir", "runs/x")
    for bad in ("", None, 3, ["a"]):
        assert rejects(check_str, "Cfg", "out_dir", bad) == (
            f"Cfg.out_dir={bad!r} is not allowed: must be a non-empty string")


def test_check_choice():
    check_choice("Cfg", "device", "cpu", ("auto", "cpu", "cuda"))
    check_choice("Cfg", "k", 2, iter([1, 2]))  # any iterable of choices
    msg = rejects(check_choice, "Cfg", "device", "tpu", ("auto", "cpu", "cuda"))
    assert msg == "Cfg.device='tpu' is not allowed: must be one of 'auto', 'cpu', 'cuda'"


@pytest.mark.parametrize("value, kw", [([1], {}), ((1, 8), {"max_value": 8}), ([0, 3], {"min_value": 0})])
def test_check_int_list_accepts(value, kw):
    check_int_list("Cfg", "ranks", value, **kw)


@pytest.mark.parametrize("value, kw, allowed", [
    ([], {}, "a non-empty list of integers in [1, inf]"),
    (3, {}, "a non-empty list of integers in [1, inf]"),
    ([1, True], {}, "a non-empty list of integers in [1, inf]"),
    ([1, 2.0], {}, "a non-empty list of integers in [1, inf]"),
    ([1, 9], {"max_value": 8}, "a non-empty list of integers in [1, 8]"),
    ([0], {}, "a non-empty list of integers in [1, inf]"),
])
def test_check_int_list_rejects_naming_field_value_and_allowed(value, kw, allowed):
    msg = rejects(check_int_list, "Cfg", "ranks", value, **kw)
    assert msg == f"Cfg.ranks={value!r} is not allowed: must be {allowed}"


def test_is_perfect_square_against_brute_force():
    squares = {k * k for k in range(40) if k * k < 1500}
    assert [n for n in range(-3, 1500) if is_perfect_square(n)] == sorted(squares)


@dataclass(frozen=True)
class Demo:
    n: int
    name: str = "a"
    tags: list[int] = field(default_factory=list)

    def __post_init__(self):
        check_int("Demo", "n", self.n)


def test_from_dict_builds_the_dataclass():
    assert from_dict(Demo, {"n": 3, "tags": [1]}) == Demo(n=3, name="a", tags=[1])
    assert from_dict(Demo, {"n": 3}).tags == []


def test_from_dict_names_unknown_and_missing_keys_and_the_allowed_ones():
    msg = rejects(from_dict, Demo, {"n": 1, "nmae": "x", "zz": 0})
    assert msg == "Demo: unknown key(s) ['nmae', 'zz']; allowed keys: ['n', 'name', 'tags']"
    msg = rejects(from_dict, Demo, {"name": "x"})
    assert msg == "Demo: missing required key(s) ['n']; allowed keys: ['n', 'name', 'tags']"
    assert "must be a mapping" in rejects(from_dict, Demo, [("n", 1)])


def test_from_dict_runs_the_value_checks():
    assert rejects(from_dict, Demo, {"n": 0}) == "Demo.n=0 is not allowed: must be an integer in [1, inf]"


def test_from_dict_needs_a_dataclass_type():
    with pytest.raises(TypeError, match="not a dataclass"):
        from_dict(dict, {})


TORCH_FREE = """
import sys
import labcore.config, labcore.params, labcore.experiments.params
import labcore.sweep, labcore.sweep.spec, labcore.sweep.runner, labcore.sweep.task, labcore.sweep.executors
assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('labcore'))
print('ok')
"""


def test_config_params_and_the_sweep_driver_import_no_torch():
    res = subprocess.run([sys.executable, "-c", TORCH_FREE], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
