"""The sweep files shipped in sweeps/ validate against the real notebooks and cover all of them."""

from pathlib import Path

import pytest

from labcore.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("name", ["quick", "smoke", "full"])
def test_shipped_sweep_validates(name):
    spec = load_sweep(ROOT / "sweeps" / f"{name}.yaml")
    assert spec.name == name
    names = {Path(r.notebook).name for r in spec.runs}
    if name in ("quick", "smoke"):
        assert names == set(NOTEBOOKS)          # the main job runs every notebook
    else:
        assert {"01_tdqkr.ipynb", "05_paper_table.ipynb"} <= names
    ids = [r.run_id for r in spec.runs]
    assert len(ids) == len(set(ids))
