"""labcore.params: notebook namespace validation and papermill's view of a parameters cell."""

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional  # noqa: UP035

import pytest

from labcore import params as params_module
from labcore.config import ConfigError, check_int
from labcore.experiments import params as lab_params
from labcore.params import (
    NotebookParamError,
    TypeMismatch,
    check_value,
    notebook_parameters,
    parse_annotation,
    schema_mismatches,
    user_namespace,
    validate_notebook_params,
)

FIXTURES = Path(__file__).parent / "sweep" / "fixtures"


@dataclass(frozen=True)
class DemoParams:
    smoke: bool = False
    rank: int = 2
    lr: float = 1e-3
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3])
    label: Optional[str] = None  # noqa: UP045 - the notebook form
    scoring: Literal["tucker", "additive"] = "tucker"
    out_dir: str = "out"
    seed: int = 0

    def __post_init__(self):
        check_int("DemoParams", "rank", self.rank, min_value=1)


def ipython_like_namespace(**params):
    """What globals() holds in a kernel after the parameters cell: IPython's names, imports,
    helpers, plus the parameters."""
    ns = {"__name__": "__main__", "__builtins__": __builtins__, "_ih": [], "_oh": {}, "_": None,
          "In": ["", "x = 1"], "Out": {}, "get_ipython": lambda: None, "exit": object(),
          "quit": object(), "open": open, "dataclasses": dataclasses, "field": field,
          "Optional": Optional, "DemoParams": DemoParams, "validate_notebook_params": validate_notebook_params,
          "types": types}
    ns.update(params)
    return ns


def test_valid_namespace_builds_the_dataclass_with_conversions():
    ns = ipython_like_namespace(smoke=True, rank=4, lr=1, lrs=(1, 0.5), label="a", scoring="additive",
                                out_dir="/tmp/x", seed=3)
    p = validate_notebook_params(DemoParams, ns)
    assert p == DemoParams(smoke=True, rank=4, lr=1.0, lrs=[1.0, 0.5], label="a", scoring="additive",
                           out_dir="/tmp/x", seed=3)
    assert type(p.lr) is float and all(type(v) is float for v in p.lrs)  # int accepted for float, converted


def test_missing_names_take_dataclass_defaults():
    p = validate_notebook_params(DemoParams, ipython_like_namespace(rank=3))
    assert p.rank == 3 and p.smoke is False and p.lrs == [1e-3, 3e-3]


def test_user_namespace_excludes_ipython_internals_modules_and_callables():
    ns = ipython_like_namespace(rank=3, other="x")
    assert user_namespace(ns) == {"rank": 3, "other": "x"}


def test_unknown_name_is_rejected_naming_it_and_the_known_ones():
    with pytest.raises(NotebookParamError) as e:
        validate_notebook_params(DemoParams, ipython_like_namespace(rnak=4))
    msg = str(e.value)
    assert "'rnak'" in msg and "DemoParams" in msg and "rank" in msg and "smoke" in msg
    assert isinstance(e.value, ConfigError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("name, value, allowed", [
    ("rank", True, "integer"),          # bool is not an int
    ("rank", 2.0, "integer"),           # nor is an integral float
    ("rank", "2", "integer"),
    ("smoke", 1, "bool"),               # 1 is not a bool
    ("lr", True, "number"),
    ("lrs", [1e-3, "a"], "list of numbers"),
    ("lrs", 0.1, "list of numbers"),
    ("label", 3, "string or None"),
    ("scoring", "tuker", "'tucker', 'additive'"),
])
def test_wrong_types_are_rejected_naming_parameter_value_and_allowed(name, value, allowed):
    with pytest.raises(NotebookParamError) as e:
        validate_notebook_params(DemoParams, ipython_like_namespace(**{name: value}))
    msg = str(e.value)
    assert f"DemoParams.{name}={value!r}" in msg and allowed in msg


def test_optional_accepts_none_and_post_init_range_checks_still_run():
    assert validate_notebook_params(DemoParams, ipython_like_namespace(label=None)).label is None
    with pytest.raises(ConfigError, match="rank=0"):
        validate_notebook_params(DemoParams, ipython_like_namespace(rank=0))


def test_non_dataclass_schema_is_a_type_error():
    with pytest.raises(TypeError):
        validate_notebook_params(dict, {})


@pytest.mark.parametrize("text, value, ok", [
    ("int", 3, True), ("int", True, False), ("float", 3, True), ("bool", 0, False),
    ("list[float]", [1, 2.5], True), ("list[int]", [1, 2.5], False),
    ("Optional[int]", None, True), ("Optional[int]", "x", False), ("int | None", None, True),
    ("dict[str, float]", {"a": 1}, True), ("dict[str, float]", {"a": "b"}, False),
    ("tuple[int, ...]", [1, 2], True), ("None", object(), True), ("Frobnicate", 1, True),
])
def test_parse_annotation_and_check_value(text, value, ok):
    tp = parse_annotation(text)
    if ok:
        check_value(tp, value)
    else:
        with pytest.raises(TypeMismatch):
            check_value(tp, value)


def test_parse_annotation_does_not_evaluate_code():
    assert parse_annotation("__import__('os').system('false')") is Any


def test_notebook_parameters_reads_the_typed_cell_via_papermill():
    params = notebook_parameters(FIXTURES / "tiny.ipynb")
    assert list(params) == ["x", "n", "fail", "sleep_s", "tags", "label", "marker", "out_dir", "seed"]
    assert params["n"].type is int and params["n"].default == 3 and params["n"].help == "history rows to log"
    assert params["x"].type is float and params["fail"].default is False
    assert params["tags"].default == [1, 2]
    check_value(params["tags"].type, [3, 4])
    with pytest.raises(TypeMismatch, match="integers"):
        check_value(params["tags"].type, [3.5])
    assert params["label"].annotation == "Optional[str]" and params["label"].default is None


def test_papermill_help_notebook_lists_the_parameters():
    from click.testing import CliRunner
    from papermill.cli import papermill

    res = CliRunner().invoke(papermill, ["--help-notebook", str(FIXTURES / "tiny.ipynb")])
    assert res.exit_code == 0, res.output
    for line in ("x: float (default 1.0)", "n: int (default 3)", "fail: bool (default False)",
                 "tags: list[int] (default [1, 2])", "label: Optional[str] (default None)",
                 "seed: int (default 0)"):
        assert line in res.output


def test_schema_mismatches_detects_drift_between_cell_and_dataclass():
    @dataclass(frozen=True)
    class Tiny:
        x: float = 1.0
        n: int = 4           # differs from the cell (3)
        fail: bool = False
        sleep_s: float = 0.0
        tags: list[int] = field(default_factory=lambda: [1, 2])
        label: Optional[str] = None  # noqa: UP045
        marker: str = ""
        out_dir: str = "out/tiny"
        extra: int = 0       # not in the cell; and 'seed' is missing

    problems = schema_mismatches(Tiny, FIXTURES / "tiny.ipynb")
    assert any(p.startswith("n: default 3") for p in problems)
    assert any(p.startswith("seed:") for p in problems) and any(p.startswith("extra:") for p in problems)
    assert len(problems) == 3


def test_notebook_param_error_is_a_plain_config_error_subclass():
    assert issubclass(NotebookParamError, ConfigError) and issubclass(NotebookParamError, ValueError)
    assert NotebookParamError.__module__ == "labcore.params"
    assert params_module.NotebookParamError is NotebookParamError
    with pytest.raises(ConfigError):  # what callers catch
        validate_notebook_params(DemoParams, ipython_like_namespace(rnak=3))


# ----------------------------------------------------------------------------------------------
# The lab notebooks' params dataclasses (labcore.experiments.params): value checks.
# ----------------------------------------------------------------------------------------------

LAB_CLASSES = [lab_params.TDQKRParams, lab_params.SplittingParams, lab_params.VirtualMemoryParams,
               lab_params.ArchitecturesParams, lab_params.PaperTableParams]


@pytest.mark.parametrize("cls", LAB_CLASSES, ids=lambda c: c.__name__)
def test_lab_params_defaults_are_valid_and_shared_checks_apply(cls):
    p = cls()
    assert p.steps >= 1 and p.effective() == p and p.seeds == [p.seed + i for i in range(p.n_seeds)]
    assert cls(smoke=True).effective().steps <= 12
    for name, bad, allowed in [("steps", -5, "an integer in [1, inf]"), ("smoke", 1, "True or False"),
                               ("lr", 0.0, "a finite number in (0.0, 1.0]"),
                               ("device", "tpu", "one of 'auto', 'cpu', 'cuda'"),
                               ("out_dir", "", "a non-empty string")]:
        with pytest.raises(ConfigError) as e:
            cls(**{name: bad})
        assert str(e.value) == f"{cls.__name__}.{name}={bad!r} is not allowed: must be {allowed}"
    with pytest.raises(ConfigError, match=f"{cls.__name__}.d_model=40 .*multiple of 16"):
        cls(d_model=40)


@pytest.mark.parametrize("cls, kw, fragment", [
    (lab_params.TDQKRParams, {"top_k": 65}, "TDQKRParams.top_k=65 is not allowed: must be an integer in [1, 64]"),
    (lab_params.TDQKRParams, {"ranks": [2, 9]}, "TDQKRParams.ranks=[2, 9] is not allowed: must be a non-empty "
                                                "list of integers in [2, 8]"),
    (lab_params.TDQKRParams, {"ranks": []}, "TDQKRParams.ranks=[] is not allowed"),
    (lab_params.TDQKRParams, {"aux_loss": "yes"}, "TDQKRParams.aux_loss='yes' is not allowed: must be True or False"),
    (lab_params.SplittingParams, {"splits": [1, 2]}, "SplittingParams.splits=[1, 2] is not allowed with "
                                                     "total_values=9216: 9216/2 is not a perfect square"),
    (lab_params.SplittingParams, {"splits": [4]}, "SplittingParams.splits=[4] is not allowed: must include 1"),
    (lab_params.SplittingParams, {"top_k": 30}, "SplittingParams.splits=[1, 4] is not allowed with top_k=30: "
                                                "top_k must be divisible by every S"),
    (lab_params.SplittingParams, {"spans": [4]}, "SplittingParams.spans=[4] is not allowed: must be a non-empty "
                                                 "list of integers in [0, 3]"),
    (lab_params.SplittingParams, {"n_layers": 2}, "SplittingParams.n_layers=2 is not allowed: must be an integer "
                                                  "in [3, inf]"),
    (lab_params.VirtualMemoryParams, {"expansions": [4, 9]}, "including 1 (the baseline)"),
    (lab_params.VirtualMemoryParams, {"expansions": [1, 8]}, "VirtualMemoryParams.expansions=[1, 8] is not allowed"),
    (lab_params.VirtualMemoryParams, {"references": ["half"]}, "VirtualMemoryParams.references=['half'] is not "
                                                               "allowed: must list distinct names of"),
    (lab_params.VirtualMemoryParams, {"d_value": 15}, "VirtualMemoryParams.d_value=15 is not allowed: must be even"),
    (lab_params.ArchitecturesParams, {"ratio": 100.0}, "ArchitecturesParams.ratio=100.0 is not allowed: must be a "
                                                       "finite number in [0.5, 64.0]"),
    (lab_params.ArchitecturesParams, {"batch_sizes": [0]}, "ArchitecturesParams.batch_sizes=[0] is not allowed"),
    (lab_params.PaperTableParams, {"rows": ["+IVE"]}, "PaperTableParams.rows=['+IVE'] is not allowed: must start "
                                                      "with 'PKM'"),
    (lab_params.PaperTableParams, {"heads": 0}, "PaperTableParams.heads=0 is not allowed"),
    (lab_params.PaperTableParams, {"top_k": 7}, "PaperTableParams.top_k=7 is not allowed: must be even"),
])
def test_lab_params_reject_bad_values_naming_field_value_and_allowed(cls, kw, fragment):
    with pytest.raises(ConfigError) as e:
        cls(**kw)
    assert fragment in str(e.value)


def test_experiment_modules_re_export_the_params_classes():
    from labcore.experiments import architectures, paper_table, splitting, tdqkr, virtual_memory

    assert tdqkr.TDQKRParams is lab_params.TDQKRParams
    assert splitting.SplittingParams is lab_params.SplittingParams
    assert virtual_memory.VirtualMemoryParams is lab_params.VirtualMemoryParams
    assert architectures.ArchitecturesParams is lab_params.ArchitecturesParams
    assert paper_table.PaperTableParams is lab_params.PaperTableParams and paper_table.ROWS == lab_params.ROWS
