"""The ``labcore`` command: subcommand wiring, delegation to other modules, argument errors."""

import sys
import types
from pathlib import Path

import pytest
import yaml

from labcore import cli

FIXTURES = Path(__file__).parent / "fixtures"


def test_no_subcommand_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    for sub in ("sweep", "report", "train", "bench", "lab"):
        assert sub in out


@pytest.mark.parametrize("name", ["train", "bench"])
def test_train_and_bench_are_delegated_with_argv_untouched(monkeypatch, name):
    seen = []
    fake = types.ModuleType(cli.DELEGATES[name])
    fake.cli_main = lambda argv: seen.append(list(argv)) or 5
    monkeypatch.setitem(sys.modules, cli.DELEGATES[name], fake)
    assert cli.main([name, "--help", "--steps", "3"]) == 5
    assert seen == [["--help", "--steps", "3"]]


def test_missing_module_gives_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(cli.DELEGATES, "train", "labcore.no_such_module_for_test")
    assert cli.main(["train", "x"]) == 2
    assert "labcore.no_such_module_for_test is not available" in capsys.readouterr().err


def test_lab_dry_run_prints_the_jupyter_command(capsys):
    assert cli.main(["lab", "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == "jupyter lab --ip 127.0.0.1 --notebook-dir notebooks"


@pytest.mark.parametrize("args, fragment", [
    (["sweep", "x.yaml", "--jobs", "0"], "must be >= 1"),
    (["sweep", "x.yaml", "--cluster", "remote:3"], "must be local:N"),
    (["sweep", "x.yaml", "--scheduler", "127.0.0.1:8786"], "tcp://HOST"),
    (["sweep", "x.yaml", "--timeout", "-5"], "must be > 0"),
    (["sweep", "x.yaml", "--cluster", "local:2", "--scheduler", "tcp://h:1"], "not allowed with"),
])
def test_bad_arguments_are_rejected(capsys, args, fragment):
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2 and fragment in capsys.readouterr().err


def test_report_of_missing_dir_is_an_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unreachable_scheduler_is_reported(tmp_path, capsys, monkeypatch):
    from labcore.sweep import dask_exec

    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "notebook_dir": str(FIXTURES),
                                     "notebooks": [{"notebook": "echo.ipynb"}]}))

    def refuse(address, timeout=20.0):
        raise dask_exec.DaskUnavailable(f"cannot reach the dask scheduler at {address} within 1 s: OSError")

    monkeypatch.setattr(dask_exec, "connect_scheduler", refuse)
    rc = cli.main(["sweep", str(sweep), "--scheduler", "tcp://127.0.0.1:9", "--results-root", str(tmp_path / "r")])
    assert rc == 3 and "cannot reach the dask scheduler at tcp://127.0.0.1:9" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
