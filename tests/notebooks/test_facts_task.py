"""08_facts_task: committed clean, parameters mirror FactsTaskParams, exercises unanswered by default,
and the notebook runs end to end through papermill in smoke mode, writing every (trunk, load, seed),
the capacity table first and the capacity figure first."""

import json
from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm

from labcore.experiments.facts_task import FactsTaskParams
from labcore.params import schema_mismatches

NB = Path(__file__).resolve().parents[2] / "notebooks" / "08_facts_task.ipynb"


def test_notebook_is_clean_and_mirrors_its_schema():
    nb = nbformat.read(NB, as_version=4)
    assert not any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    assert "parameters" in nb.cells[1].metadata.get("tags", [])
    assert "validate_notebook_params(FactsTaskParams" in nb.cells[2].source
    assert schema_mismatches(FactsTaskParams, NB) == []


def test_notebook_teaches_without_giving_answers_away():
    nb = nbformat.read(NB, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "Predict, then run" in text and "$$" in text
    checks = [s for s in code if "exercises.check(" in s]
    assert len(checks) >= 2
    for s in checks:
        assert "answer = ..." in s
        assert all(line.lstrip().startswith("#") for line in s.splitlines() if "exercises.solution(" in line)
    assert not any("def " in s for s in code)   # logic lives in labcore


def test_notebook_runs_in_smoke_mode(tmp_path):
    out = tmp_path / "run"
    pm.execute_notebook(str(NB), str(tmp_path / "executed.ipynb"),
                        parameters=dict(smoke=True, out_dir=str(out), n_seeds=2, d_models=[16, 32]),
                        kernel_name="python3", progress_bar=False, cwd=str(NB.parent))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["notebook"] == "08_facts_task"
    table = pd.read_parquet(out / "summary.parquet")
    assert sorted(table["variant"].unique()) == ["D=16 40 facts", "D=16 80 facts", "D=32 40 facts", "D=32 80 facts"]
    assert len(table) == 2 * 2 * 2 and sorted(table["seed"].unique()) == [0, 1]
    assert table["answer_accuracy"].between(0.0, 1.0).all() and (table["stored_kbit"] >= 0).all()
    tables = sorted(p.name for p in (out / "tables").glob("*.parquet"))
    assert tables[:2] == ["1_capacity.parquet", "2_paired_deltas.parquet"]
    cap = pd.read_parquet(out / "tables" / "1_capacity.parquet")
    assert cap["d_model"].tolist() == [16, 32] and (cap["capacity_line_kbit"] > 0).all()
    deltas = pd.read_parquet(out / "tables" / "2_paired_deltas.parquet")
    assert {"variant", "reference", "delta_mean", "resolution", "verdict"} <= set(deltas.columns)
    figs = sorted(p.stem for p in (out / "figures").glob("*.html"))
    assert figs == ["capacity", "curve_accuracy", "curve_bits_per_param", "curve_training"]
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    printed = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "D=16 (12,416 parameters)" in printed and "no answer yet" in printed
