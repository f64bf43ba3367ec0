"""Helpers of the browser tests: screenshots and parameterised notebook copies."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = ROOT / "artifacts" / "ui"


def shot(page, name: str) -> Path:
    """Save a screenshot of the browser viewport as artifacts/ui/<name>.png and print its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    print(f"screenshot: {path}")
    return path


def copy_notebook(lab, name: str, new_name: str, params: dict[str, object]) -> str:
    """Copy notebooks/<name> into the served folder as <new_name>, with the parameters cell's
    defaults replaced by ``params`` (typed lines ``name: type = value``); returns new_name."""
    import nbformat

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    lines = cell.source.splitlines()
    for key, value in params.items():
        idx = [i for i, ln in enumerate(lines) if ln.split(":")[0].strip() == key]
        assert idx, f"{name}: no parameter {key!r} in its parameters cell"
        annotation = lines[idx[0]].split(":", 1)[1].split("=", 1)[0].strip()
        lines[idx[0]] = f"{key}: {annotation} = {value!r}"
    cell.source = "\n".join(lines)
    target = lab.root / new_name
    nbformat.write(nb, target)
    shutil.copymode(NOTEBOOKS / name, target)
    return new_name
