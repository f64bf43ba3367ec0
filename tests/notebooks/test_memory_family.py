"""07_memory_family: committed clean, parameters mirror MemoryFamilyParams, and the notebook runs end to
end through papermill in smoke mode, writing every architecture x seed, the tables and the figures."""

import json
from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm

from labcore.experiments.memory_family import MemoryFamilyParams
from labcore.params import schema_mismatches

NB = Path(__file__).resolve().parents[2] / "notebooks" / "07_memory_family.ipynb"
ARCHS = ["dense", "moe", "pkm", "ultramem", "ultramem_v2", "memory_plus", "peer"]


def test_notebook_is_clean_and_mirrors_its_schema():
    nb = nbformat.read(NB, as_version=4)
    assert not any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    assert "parameters" in nb.cells[1].metadata.get("tags", [])
    assert "validate_notebook_params(MemoryFamilyParams" in nb.cells[2].source
    assert schema_mismatches(MemoryFamilyParams, NB) == []


def test_notebook_runs_in_smoke_mode(tmp_path):
    out = tmp_path / "run"
    pm.execute_notebook(str(NB), str(tmp_path / "executed.ipynb"),
                        parameters=dict(smoke=True, out_dir=str(out), n_seeds=2, capacity_ratios=[2.5, 10.0],
                                        batch_sizes=[1, 8]),
                        kernel_name="python3", progress_bar=False, cwd=str(NB.parent))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["notebook"] == "07_memory_family"
    table = pd.read_parquet(out / "summary.parquet")
    family = table[table["variant"].isin(ARCHS)]
    assert list(dict.fromkeys(family["variant"])) == ARCHS
    assert len(family) == 2 * len(ARCHS)                          # every architecture x 2 seeds
    assert sorted(table["seed"].unique()) == [0, 1]
    assert set(table["variant"]) - set(ARCHS) == {"pkm x2.5", "ultramem x2.5"}   # capacity points
    assert table["answer_accuracy"].between(0.0, 1.0).all()
    assert (table["stored_bits"] >= 0).all()
    assert table["answer_loss"].between(0.0, 10.0).all()
    # equal activated FLOPs within 2% of dense, sparse totals within 2% of (1 + ratio) x dense
    dense = family[family["variant"] == "dense"].iloc[0]
    assert (family["flops_per_token"] / dense["flops_per_token"]).between(0.98, 1.02).all()
    sparse = family[family["variant"] != "dense"]
    assert (sparse["total_params"] / dense["total_params"]).between(0.98 * 11, 1.02 * 11).all()
    figs = sorted(p.stem for p in (out / "figures").glob("*.html"))
    assert figs == ["accuracy", "bytes_per_token", "capacity", "latency", "stored_bits"]
    headline = pd.read_parquet(out / "tables" / "1_headline.parquet")
    assert headline["architecture"].tolist() == ARCHS
    cost = pd.read_parquet(out / "tables" / "3_inference_cost.parquet")
    assert set(cost["architecture"]) == set(ARCHS) and len(cost) == 2 * len(ARCHS)   # every model at B = 1, 8
    assert (cost["latency_ms"] > 0).all() and (cost["bytes_per_token"] > 0).all()
    b1 = cost[cost["batch"] == 1].set_index("architecture")["bytes_per_token"]
    b8 = cost[cost["batch"] == 8].set_index("architecture")["bytes_per_token"]
    assert (b8 <= b1).all()          # the dense part is read once per step: bytes per token fall with B
    claims = pd.read_parquet(out / "tables" / "4_paper_claims.parquet")
    assert claims["architecture"].tolist() == ARCHS[1:]
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert {h["variant"] for h in history} >= set(ARCHS)
