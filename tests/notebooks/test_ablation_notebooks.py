"""The ablation notebooks (01-05): committed clean, parameters mirror their schemas, and each one
executes end to end through papermill in smoke mode, writing a complete run directory."""

import json
from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm
import pytest

from labcore.experiments.architectures import ArchitecturesParams
from labcore.experiments.paper_table import PaperTableParams
from labcore.experiments.splitting import SplittingParams
from labcore.experiments.tdqkr import TDQKRParams
from labcore.experiments.virtual_memory import VirtualMemoryParams
from labcore.params import schema_mismatches

NB = Path(__file__).resolve().parents[2] / "notebooks"

# notebook -> (schema, smoke parameters, expected variants)
CASES = {
    "01_tdqkr": (TDQKRParams, dict(ranks=[2], two_sided=True, multi_core=False, aux_loss=True, recall_rows=16),
                 ["additive", "R=2", "R=2 two-sided", "R=2 +aux"]),
    "02_layer_splitting": (SplittingParams, dict(splits=[1, 4], spans=[0], batch_sizes=[1, 4]),
                           ["S=1", "S=4 same block", "S=4 depth span 0"]),
    "03_virtual_memory": (VirtualMemoryParams, dict(expansions=[1, 4]), ["E=1", "E=4", "E=1 d_v=D"]),
    "04_architectures": (ArchitecturesParams, dict(batch_sizes=[1, 8]),
                         ["dense", "moe", "pkm", "pkm_replaces_ffn", "ultramem"]),
    "05_paper_table": (PaperTableParams, dict(rows=["PKM", "+rm softmax", "+TDQKR"]),
                       ["PKM", "+rm softmax", "+TDQKR"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_is_clean_and_mirrors_its_schema(name):
    path = NB / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    assert "parameters" in nb.cells[1].metadata.get("tags", [])
    assert schema_mismatches(CASES[name][0], path) == []


@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_runs_in_smoke_mode(name, tmp_path):
    _, params, variants = CASES[name]
    out = tmp_path / "run"
    pm.execute_notebook(str(NB / f"{name}.ipynb"), str(tmp_path / "executed.ipynb"),
                        parameters=dict(smoke=True, out_dir=str(out), n_seeds=2, **params),
                        kernel_name="python3", progress_bar=False, cwd=str(NB))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["notebook"] == name
    table = pd.read_parquet(out / "summary.parquet")
    assert list(dict.fromkeys(table["variant"])) == variants
    assert len(table) == 2 * len(variants)                 # every variant x 2 seeds
    # the facts task: metrics of the answer token (cross-entropy over the byte vocabulary, ln 259 = 5.56
    # at chance; a dozen smoke steps stay near it)
    assert table["answer_accuracy"].between(0.0, 1.0).all()
    assert table["answer_loss"].between(0.01, 8.0).all()
    assert table["stored_kbit"].ge(0.0).all()
    assert sorted(table["seed"].unique()) == [0, 1]
    figs = sorted(p.name for p in (out / "figures").glob("*.html"))
    assert figs, "no figures written"
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert {h["variant"] for h in history} == set(variants)
    if name == "01_tdqkr":
        rec = table.set_index(["variant", "seed"])["search_recall"]
        assert (rec.loc["additive"] == 1.0).all()           # additive product keys are exact
        assert rec.between(0.0, 1.0).all()


def test_bad_parameter_stops_before_any_work(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(NB / "03_virtual_memory.ipynb"), str(tmp_path / "x.ipynb"),
                            parameters=dict(smoke=True, out_dir=str(out), expansion=[1, 4]),
                            kernel_name="python3", progress_bar=False, cwd=str(NB))
    assert "'expansion'=[1, 4] is not a parameter of this notebook" in str(e.value)
    assert not out.exists()
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(NB / "03_virtual_memory.ipynb"), str(tmp_path / "y.ipynb"),
                            parameters=dict(smoke=True, out_dir=str(out), expansions=[1, 8]),
                            kernel_name="python3", progress_bar=False, cwd=str(NB))
    assert "expansions=[1, 8] is not allowed: must list perfect squares" in str(e.value)
    assert not out.exists()
