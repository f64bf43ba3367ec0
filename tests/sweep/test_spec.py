"""Sweep files: validation before anything runs, expansion, content-hash run ids."""

import dataclasses
import itertools
import shutil
from pathlib import Path

import nbformat
import pytest
import yaml

from labcore.cli import main as cli_main
from labcore.sweep.spec import (
    SweepError,
    load_sweep,
    make_run_id,
    notebook_fingerprint,
    notebook_schema,
    notebook_schema_ref,
)

FIXTURES = Path(__file__).parent / "fixtures"


def write_sweep(tmp_path, data, name="quick.yaml"):
    data = {"notebook_dir": str(FIXTURES), **data}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


GOOD = {"name": "quick", "seeds": [0, 1], "notebooks": [
    {"notebook": "tiny.ipynb", "grid": {"x": [1, 2.5], "n": [2, 3, 4]}},
    {"notebook": "echo.ipynb", "runs": [{"k": 3}, {"k": 5}], "seeds": [7]},
]}


def test_good_sweep_expands_cartesian_grid_times_seeds(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, GOOD))
    tiny = [r for r in spec.runs if r.notebook_name == "tiny.ipynb"]
    expected = {(float(x), n, s) for x, n, s in itertools.product([1, 2.5], [2, 3, 4], [0, 1])}
    assert {(r.params["x"], r.params["n"], r.seed) for r in tiny} == expected
    assert all(type(r.params["x"]) is float for r in tiny)  # int in YAML, float parameter
    echo = [r for r in spec.runs if r.notebook_name == "echo.ipynb"]
    assert sorted((r.params["k"], r.seed) for r in echo) == [(3, 7), (5, 7)]
    assert len(spec.runs) == 14 and len({r.run_id for r in spec.runs}) == 14
    assert all(r.sweep == "quick" and Path(r.notebook).is_absolute() for r in spec.runs)


def test_common_params_timeout_and_gpu(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, {"name": "c", "common": {"k": 2}, "timeout": 30, "notebooks": [
        {"notebook": "echo.ipynb"}, {"notebook": "echo.ipynb", "params": {"k": 9}, "timeout": 5, "gpu": True}]}))
    assert sorted((r.params["k"], r.timeout_s, r.gpu) for r in spec.runs) == [(2, 30.0, False), (9, 5.0, True)]
    assert {r.run_id for r in spec.with_timeout(99).runs} == {r.run_id for r in spec.runs}
    assert {r.timeout_s for r in spec.with_timeout(99).runs} == {99.0}


def test_duplicates_are_run_once(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, {"name": "d", "notebooks": [
        {"notebook": "echo.ipynb", "runs": [{"k": 1}, {"k": 1}]}]}))
    assert len(spec.runs) == 1 and spec.duplicates == 1


BAD_CASES = [
    # (entries or top-level changes, expected fragments of the message)
    ({"notebooks": [{"notebook": "echo.ipynb"}, {"notebook": "tiny.ipynb", "params": {"rnak": 4}}]},
     ["sweep quick.yaml: notebooks[1] (tiny.ipynb)", "parameter 'rnak' is not a parameter of this notebook",
      "known: x, n, fail"]),
    ({"notebooks": [{"notebook": "nope.ipynb"}]},
     ["notebooks[0] (nope.ipynb)", "notebook not found"]),
    ({"notebooks": [{"notebook": "tiny.ipynb", "grid": {"n": [1, "two"]}}]},
     ["notebooks[0] (tiny.ipynb) grid.n[1]", "'two'", "must be an integer"]),
    ({"notebooks": [{"notebook": "tiny.ipynb", "params": {"fail": 1}}]},
     ["notebooks[0] (tiny.ipynb) params.fail", "must be a bool"]),
    ({"notebooks": [{"notebook": "tiny.ipynb", "params": {"n": True}}]},
     ["params.n", "True", "must be an integer (not a bool)"]),
    ({"notebooks": [{"notebook": "tiny.ipynb", "params": {"tags": [1, 2.5]}}]},
     ["params.tags", "list of integers", "item 1 = 2.5"]),
    ({"notebooks": [{"notebook": "tiny.ipynb", "grid": {}}]},
     ["notebooks[0] (tiny.ipynb) grid", "empty grid"]),
    ({"notebooks": [{"notebook": "tiny.ipynb", "grid": {"x": []}}]},
     ["notebooks[0] (tiny.ipynb) grid.x", "non-empty list"]),
    ({"notebooks": [{"notebook": "tiny.ipynb", "grid": {"x": 3}}]},
     ["grid.x", "non-empty list"]),
    ({"notebooks": [{"notebook": "plain.ipynb"}]},
     ["notebooks[0] (plain.ipynb)", "no 'out_dir' parameter"]),
    ({"notebooks": [{"notebook": "tiny.ipynb", "params": {"seed": 3}}]},
     ["parameter 'seed' is set by the runner", "seeds:"]),
    ({"notebooks": [{"notebook": "tiny.ipynb", "gird": {"x": [1]}}]},
     ["notebooks[0] (tiny.ipynb)", "unknown key 'gird'"]),
    ({"notebooks": []}, ["notebooks: must be a non-empty list"]),
    ({"notebooks": [{"notebook": "echo.ipynb"}], "seeds": [0, True]}, ["seeds", "list of integers"]),
    ({"notebooks": [{"notebook": "echo.ipynb"}], "timeout": -1}, ["timeout", "positive number"]),
    ({"notebooks": [{"notebook": "echo.ipynb"}], "common": {"k": "3"}},
     ["notebooks[0] (echo.ipynb) (common).k", "'3'"]),
    ({"name": "bad name!", "notebooks": [{"notebook": "echo.ipynb"}]}, ["name: 'bad name!' is not allowed"]),
    ({"notebooks": [{"notebook": "echo.ipynb"}], "frobnicate": 1}, ["unknown key 'frobnicate'"]),
]


@pytest.mark.parametrize("change, fragments", BAD_CASES)
def test_bad_sweep_files_are_rejected_naming_the_entry(tmp_path, change, fragments):
    path = write_sweep(tmp_path, {"name": "quick", **change})
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    msg = str(e.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


def test_all_problems_are_reported_together(tmp_path):
    path = write_sweep(tmp_path, {"name": "quick", "notebooks": [
        {"notebook": "tiny.ipynb", "params": {"rnak": 1}}, {"notebook": "nope.ipynb"}]})
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and "notebooks[0]" in lines[0] and "notebooks[1]" in lines[1]


def test_bad_sweep_via_cli_exits_2_before_anything_runs(tmp_path, capsys):
    path = write_sweep(tmp_path, {"name": "quick", "notebooks": [{"notebook": "tiny.ipynb", "params": {"rnak": 1}}]})
    rc = cli_main(["sweep", str(path), "--results-root", str(tmp_path / "res"), "--reports-root",
                   str(tmp_path / "rep")])
    assert rc == 2
    assert "parameter 'rnak'" in capsys.readouterr().err
    assert not (tmp_path / "res").exists() and not (tmp_path / "rep").exists()


def test_missing_or_invalid_yaml(tmp_path):
    with pytest.raises(SweepError, match="file not found"):
        load_sweep(tmp_path / "absent.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SweepError, match="not valid YAML"):
        load_sweep(tmp_path / "broken.yaml")


def test_run_ids_stable_and_content_sensitive(tmp_path):
    nb = tmp_path / "tiny.ipynb"
    shutil.copy(FIXTURES / "tiny.ipynb", nb)
    base = make_run_id(nb, {"x": 1.0}, 0)
    assert make_run_id(nb, {"x": 1.0}, 0) == base                      # stable
    assert make_run_id(nb, {"x": 2.0}, 0) != base                      # parameters
    assert make_run_id(nb, {"x": 1.0}, 1) != base                      # seed
    assert base.startswith("tiny-") and len(base) == len("tiny-") + 12

    # outputs, execution counts and cell ids do not change the id ...
    doc = nbformat.read(nb, as_version=4)
    doc.cells[3].outputs = [nbformat.v4.new_output("stream", text="hello\n")]
    doc.cells[3].execution_count = 42
    doc.cells[3]["id"] = "changed-id"
    nbformat.write(doc, nb)
    assert make_run_id(nb, {"x": 1.0}, 0) == base
    # ... code does
    doc.cells[3].source += "\n# edited"
    nbformat.write(doc, nb)
    assert make_run_id(nb, {"x": 1.0}, 0) != base
    assert notebook_fingerprint(nb) != notebook_fingerprint(FIXTURES / "tiny.ipynb")


def test_run_ids_equal_across_loads_and_normalised_types(tmp_path):
    a = load_sweep(write_sweep(tmp_path, {"name": "a", "notebooks": [{"notebook": "tiny.ipynb",
                                                                      "grid": {"x": [1, 2]}}]}, "a.yaml"))
    b = load_sweep(write_sweep(tmp_path, {"name": "a", "notebooks": [{"notebook": "tiny.ipynb",
                                                                      "grid": {"x": [1.0, 2.0]}}]}, "b.yaml"))
    assert [r.run_id for r in a.runs] == [r.run_id for r in b.runs]


def test_dry_run_lists_runs(tmp_path, capsys):
    path = write_sweep(tmp_path, GOOD)
    assert cli_main(["sweep", str(path), "--dry-run", "--results-root", str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out
    assert out.count("to run") == 14 and "sweep quick: 14 runs" in out
    assert not (tmp_path / "res").exists()


# ----------------------------------------------------------------------------------------------
# Value checks with the notebook's own params dataclass, before any kernel starts.
# ----------------------------------------------------------------------------------------------

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def write_lab_sweep(tmp_path, entries, name="bad.yaml", **top):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"name": "bad", "notebook_dir": str(NOTEBOOKS), **top, "notebooks": entries},
                                   sort_keys=False))
    return path


def test_bad_value_names_file_run_parameter_value_and_allowed(tmp_path):
    path = write_lab_sweep(tmp_path, [{"notebook": "01_tdqkr.ipynb", "params": {"steps": -5}}])
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    assert str(e.value) == ("sweep bad.yaml: notebooks[0] (01_tdqkr.ipynb) run [seed=0]: TDQKRParams.steps=-5 "
                            "is not allowed: must be an integer in [1, inf]")


def test_value_errors_name_the_grid_point_and_count_the_other_runs(tmp_path):
    path = write_lab_sweep(tmp_path, [
        {"notebook": "01_tdqkr.ipynb", "grid": {"top_k": [4, 0]}},
        {"notebook": "00_tour.ipynb", "runs": [{"expansion": 4}, {"expansion": 8}]},
    ], seeds=[0, 1])
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    lines = str(e.value).splitlines()
    assert lines == [
        "sweep bad.yaml: notebooks[0] (01_tdqkr.ipynb) run [top_k=0, seed=0]: TDQKRParams.top_k=0 "
        "is not allowed: must be an integer in [1, 64] (and 1 more run(s) of this entry)",
        "sweep bad.yaml: notebooks[1] (00_tour.ipynb) run [runs[1], seed=0]: TourParams.expansion=8 is not "
        "allowed: must be a perfect square (1, 4, 9, 16): keys per side grow by sqrt(E) "
        "(and 1 more run(s) of this entry)",
    ]


def test_cross_field_rules_and_common_values_are_checked(tmp_path):
    # Each value alone is fine; together they break SplittingParams.__post_init__ (spans < n_layers).
    path = write_lab_sweep(tmp_path, [{"notebook": "02_layer_splitting.ipynb", "params": {"spans": [0, 3]}}],
                           common={"n_layers": 3})
    with pytest.raises(SweepError, match=r"SplittingParams.spans=\[0, 3\] is not allowed: must be a non-empty "
                                         r"list of integers in \[0, 2\]"):
        load_sweep(path)
    good = load_sweep(write_lab_sweep(tmp_path, [{"notebook": "02_layer_splitting.ipynb",
                                                  "params": {"spans": [0, 2]}}], "good.yaml", common={"n_layers": 3}))
    assert [r.params for r in good.runs] == [{"n_layers": 3, "spans": [0, 2]}]


def test_bad_value_via_cli_exits_2_and_starts_no_kernel(tmp_path, capsys, monkeypatch):
    import papermill

    import labcore.sweep.runner as runner

    def no_kernel(*a, **kw):
        raise AssertionError("the sweep was started")

    monkeypatch.setattr(papermill, "execute_notebook", no_kernel)
    monkeypatch.setattr(runner, "run_sweep", no_kernel)
    path = write_lab_sweep(tmp_path, [{"notebook": "00_tour.ipynb"},
                                      {"notebook": "01_tdqkr.ipynb", "params": {"steps": -5}}])
    rc = cli_main(["sweep", str(path), "--results-root", str(tmp_path / "res"), "--reports-root",
                   str(tmp_path / "rep")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "notebooks[1] (01_tdqkr.ipynb) run [seed=0]" in err and "steps=-5" in err
    assert not (tmp_path / "res").exists() and not (tmp_path / "rep").exists()


@pytest.mark.parametrize("nb", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_every_lab_notebook_names_an_importable_params_class(nb):
    ref = notebook_schema_ref(NOTEBOOKS / nb)
    assert ref is not None, f"{nb} has no validate_notebook_params(XParams, ...) cell importing XParams"
    cls = notebook_schema(NOTEBOOKS / nb)
    assert cls.__name__ == ref[1] and dataclasses.is_dataclass(cls)
    assert cls.__module__ in ("labcore.experiments.params", "labcore.viz.tour", "labcore.viz.widgets")
    cls()  # its defaults are valid


def test_inline_params_class_gets_type_checks_only(tmp_path):
    # tiny.ipynb defines TinyParams in a cell: nothing to import, so n=0 (rejected by its
    # __post_init__ in the kernel) passes the sweep check; a wrong type still does not.
    assert notebook_schema_ref(FIXTURES / "tiny.ipynb") is None
    assert len(load_sweep(write_sweep(tmp_path, {"name": "t", "notebooks": [
        {"notebook": "tiny.ipynb", "params": {"n": 0}}]})).runs) == 1


def _notebook_with_validation_cell(tmp_path, source):
    doc = nbformat.read(FIXTURES / "echo.ipynb", as_version=4)
    doc.cells[1].source = source + "\nprint(P)\n"
    nbformat.write(doc, tmp_path / "v.ipynb")
    return tmp_path / "v.ipynb"


def test_schema_ref_reads_imports_aliases_and_magics(tmp_path):
    nb = _notebook_with_validation_cell(tmp_path, "%matplotlib inline\nfrom labcore import params as lp\n"
                                        "from labcore.viz.tour import TourParams as TP\n"
                                        "P = lp.validate_notebook_params(TP, globals())")
    assert notebook_schema_ref(nb) == ("labcore.viz.tour", "TourParams")
    from labcore.viz.tour import TourParams

    assert notebook_schema(nb) is TourParams


def test_unimportable_params_class_is_a_sweep_error(tmp_path):
    _notebook_with_validation_cell(tmp_path, "from labcore.params import validate_notebook_params\n"
                                   "from labcore.no_such_module import EchoParams\n"
                                   "P = validate_notebook_params(EchoParams, globals())")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "notebook_dir": str(tmp_path), "notebooks": ["v.ipynb"]}))
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    assert ("sweep s.yaml: notebooks[0] (v.ipynb): cannot import the notebook's params class EchoParams from "
            "labcore.no_such_module: ModuleNotFoundError") in str(e.value)
