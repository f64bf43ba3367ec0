"""`labcore bench NAME ...` / `python -m labcore.bench NAME ...` dispatch."""

import subprocess
import sys
import types

import labcore.bench as bench


def test_dispatch_routes_options_to_the_module(monkeypatch):
    seen = {}
    fake = types.ModuleType("labcore_fake_bench")
    fake.main = lambda argv: seen.setdefault("argv", list(argv)) and 7
    monkeypatch.setitem(sys.modules, "labcore_fake_bench", fake)
    monkeypatch.setitem(bench.COMMANDS, "fake", ("labcore_fake_bench", "a fake benchmark"))
    assert bench.cli_main(["fake", "--x", "1"]) == 7
    assert seen["argv"] == ["--x", "1"]


def test_unknown_and_missing_benchmarks(monkeypatch, capsys):
    assert bench.cli_main(["nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'nope'" in err and "layers" in err and "inference" in err
    monkeypatch.setitem(bench.COMMANDS, "ghost", ("labcore.bench.ghost_module_that_does_not_exist", "x"))
    assert bench.cli_main(["ghost"]) == 2
    assert "not available" in capsys.readouterr().err
    assert bench.cli_main([]) == 2
    assert bench.cli_main(["--help"]) == 0
    assert "inference" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "labcore.bench", "nope"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown benchmark" in r.stderr
