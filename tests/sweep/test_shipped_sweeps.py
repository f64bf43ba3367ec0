"""The sweep files shipped in sweeps/ validate against the real notebooks and cover all of them."""

import subprocess
import sys
from pathlib import Path

import pytest

from labcore.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("name", ["quick", "smoke", "standard", "full"])
def test_shipped_sweep_validates(name):
    spec = load_sweep(ROOT / "sweeps" / f"{name}.yaml")
    assert spec.name == name
    names = {Path(r.notebook).name for r in spec.runs}
    if name in ("quick", "smoke", "standard"):
        assert names == set(NOTEBOOKS)          # the main job runs every notebook
    else:
        assert {"01_tdqkr.ipynb", "05_paper_table.ipynb"} <= names
    ids = [r.run_id for r in spec.runs]
    assert len(ids) == len(set(ids))


SHIPPED_CHECK_NO_TORCH = """
import sys
from labcore.sweep.spec import load_sweep, notebook_schema
n = sum(len(load_sweep(f"sweeps/{name}.yaml").runs) for name in ("quick", "smoke", "standard", "full"))
schemas = {notebook_schema(p).__module__ for p in sorted(__import__("pathlib").Path("notebooks").glob("*.ipynb"))}
assert "torch" not in sys.modules, "validating the shipped sweeps imported torch"
print(n, sorted(schemas))
"""


def test_shipped_sweeps_value_check_without_torch():
    # The value check imports each notebook's params class from where it is defined (following the
    # experiment modules' re-exports), so the sweep driver never loads torch.
    res = subprocess.run([sys.executable, "-c", SHIPPED_CHECK_NO_TORCH], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    n, modules = res.stdout.split(" ", 1)
    assert int(n) > 0
    assert modules.strip() == "['labcore.experiments.params']"  # every notebook's class is torch-free there
