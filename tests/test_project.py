"""Project wiring: README's commands, CI, environment.yml and pyproject stay consistent."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_torch_is_pinned_exactly():
    deps = _pyproject()["project"]["dependencies"]
    torch = [d for d in deps if re.match(r"^torch\b", d)]
    assert torch == ["torch==2.13.0"], torch


def test_environment_yml_is_a_thin_wrapper_consistent_with_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    pythons = [d for d in deps if isinstance(d, str) and d.startswith("python")]
    assert pythons == ["python=3.11"]
    req = _pyproject()["project"]["requires-python"]
    assert req == ">=3.11"
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert "torch==2.13.0" in pip
    assert any(p.startswith("-e .[") and "dev" in p for p in pip), pip
    # Only python, pip and the pip section: everything else comes from pyproject.toml.
    assert len(deps) == 3, deps


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make lab" in readme
    ci_cmds = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert ci_cmds[-1] == "make test"


def test_makefile_targets_exist():
    mk = (ROOT / "Makefile").read_text()
    for target in ("setup", "lab", "test", "jupyter", "bench"):
        assert re.search(rf"^{target}:", mk, re.M), target
    # The test target runs the full suite (no marker deselection except gpu).
    test_recipe = mk.split("\ntest:")[1].split("\n\n")[0]
    assert '-m "not gpu"' in test_recipe


def test_dev_extra_holds_test_tools_and_oracles():
    extras = _pyproject()["project"]["optional-dependencies"]
    dev = " ".join(extras["dev"])
    for tool in ("pytest", "ruff", "transformers", "playwright"):
        assert tool in dev


def test_markers_declared():
    markers = " ".join(_pyproject()["tool"]["pytest"]["ini_options"]["markers"])
    for m in ("slow:", "gpu:", "ui:"):
        assert m in markers
