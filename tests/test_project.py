"""Project wiring: the commands README gives are real make targets doing what it says, CI runs
README's test command, and the three places that install torch agree with pyproject.toml."""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _torch_pin() -> str:
    deps = _pyproject()["project"]["dependencies"]
    (torch,) = [d for d in deps if re.match(r"^torch\b", d)]
    return torch


def _make_dry_run(*targets: str) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(["make", "-n", "-C", str(ROOT), *targets], capture_output=True, text=True,
                          timeout=60)


def _readme_make_targets() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return sorted({m for b in blocks for m in re.findall(r"^make ([\w-]+)", b, re.M)})


def test_torch_is_pinned_exactly_and_installed_with_that_pin_everywhere():
    pin = _torch_pin()
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+", pin), pin             # exact: the CPU wheel, never a resolve
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert pin in pip
    assert f"pip install -q {pin}" in _make_dry_run("-B", "setup").stdout   # make installs torch first


def test_environment_yml_is_a_thin_wrapper_consistent_with_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    pythons = [d for d in deps if isinstance(d, str) and d.startswith("python")]
    assert pythons == ["python=" + _pyproject()["project"]["requires-python"].removeprefix(">=")]
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert any(p.startswith("-e .[") and "dev" in p for p in pip), pip
    # Only python, pip and the pip section: everything else comes from pyproject.toml.
    assert len(deps) == 3, deps


def test_every_make_command_in_the_readme_is_a_target():
    targets = _readme_make_targets()
    assert {"lab", "test"} <= set(targets), targets
    for t in targets:
        r = _make_dry_run(t)
        assert r.returncode == 0, (t, r.stderr)
    assert _make_dry_run("no-such-target").returncode != 0          # the check can fail


def test_make_test_runs_the_whole_suite_but_gpu_tests_and_ci_runs_it():
    cmds = [ln for ln in _make_dry_run("test").stdout.splitlines() if "pytest" in ln]
    assert len(cmds) == 1 and re.search(r'pytest -m "not gpu"\s*$', cmds[0]), cmds
    ci = (ROOT / ".ci" / "run").read_text()
    ci_cmds = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert ci_cmds[-1] == "make test"


def test_dev_extra_holds_test_tools_and_oracles():
    extras = _pyproject()["project"]["optional-dependencies"]
    dev = " ".join(extras["dev"])
    for tool in ("pytest", "ruff", "transformers", "playwright"):
        assert tool in dev


def test_markers_known_to_pytest(pytestconfig):
    declared = {m.split(":")[0] for m in pytestconfig.getini("markers")}
    assert {"slow", "gpu", "ui"} <= declared
