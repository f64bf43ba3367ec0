"""07_memory_family: committed clean, parameters mirror MemoryFamilyParams, teaching cells in place,
and the notebook runs end to end through papermill in smoke mode (a smoke ``run()``), writing every
architecture x seed, the step-0 stds, the paired-deltas table first (the report leads with it) and
the figures."""

import json
from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm

from labcore.experiments.memory_family import MemoryFamilyParams
from labcore.params import schema_mismatches
from labcore.results import RunDir
from labcore.viz.report import finding, headline_deltas

NB = Path(__file__).resolve().parents[2] / "notebooks" / "07_memory_family.ipynb"
ARCHS = ["dense", "moe", "pkm", "ultramem", "ultramem_v2", "memory_plus", "peer"]


def test_notebook_is_clean_and_mirrors_its_schema():
    nb = nbformat.read(NB, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code)
    assert "parameters" in nb.cells[1].metadata.get("tags", [])
    assert "validate_notebook_params(MemoryFamilyParams" in nb.cells[2].source
    assert schema_mismatches(MemoryFamilyParams, NB) == []
    assert not any(line.lstrip().startswith(("def ", "class ")) for c in code for line in c.source.splitlines())


def test_notebook_teaches():
    nb = nbformat.read(NB, as_version=4)
    text = "\n".join(c.source for c in nb.cells)
    assert "$$" in nb.cells[0].source                                         # the one equation
    assert text.index("memory_family.tiny_forward()") < text.index("memory_family.run(P)")
    assert text.count("Predict, then") >= 3
    assert "memory_family.interpret(result)" in text
    for i in (1, 2, 3):
        assert f'exercises.check("07.{i}", answer)' in text and f'# exercises.solution("07.{i}")' in text
    assert "answer = ..." in text and "\nexercises.solution" not in text      # solutions stay hidden


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
    assert table["answer_accuracy"].between(0.0, 1.0).all() and (table["stored_kbit"] >= 0).all()
    # equal activated FLOPs within 2% of dense, sparse totals within 2% of (1 + ratio) x dense
    dense = family[family["variant"] == "dense"].iloc[0]
    assert (family["flops_per_token"] / dense["flops_per_token"]).between(0.98, 1.02).all()
    sparse = family[family["variant"] != "dense"]
    assert (sparse["total_params"] / dense["total_params"]).between(0.98 * 11, 1.02 * 11).all()
    figs = sorted(p.stem for p in (out / "figures").glob("*.html"))
    assert figs == ["accuracy", "accuracy_delta_vs_dense", "bytes_per_token", "capacity", "capacity_diagnostics",
                    "latency", "stored_bits"]
    tables = RunDir(out).key_tables()
    assert list(tables)[0] == "1_deltas_accuracy_vs_dense"
    deltas = headline_deltas(tables)                              # what the report leads with
    assert deltas is tables["1_deltas_accuracy_vs_dense"]
    assert deltas["variant"].tolist() == ARCHS[1:] and set(deltas["reference"]) == {"dense"}
    assert (deltas["metric"] == "answer_accuracy").all() and deltas["resolution"].notna().all()
    assert "answer accuracy" in finding(deltas)
    init = tables["5_init_stds"].set_index("variant")
    assert init["calibrated"].all()                                  # PEER included (its up experts)
    assert (abs(init["step0_over_target"] - 1) < 0.05).all()         # memories start at the FFN std
    cost = tables["8_inference_cost"]
    assert set(cost["architecture"]) == set(ARCHS) and len(cost) == 2 * len(ARCHS)   # every model at B = 1, 8
    b1 = cost[cost["batch"] == 1].set_index("architecture")["bytes_per_token"]
    b8 = cost[cost["batch"] == 8].set_index("architecture")["bytes_per_token"]
    assert (b8 <= b1).all()          # the dense part is read once per step: bytes per token fall with B
    assert tables["9_paper_claims"]["architecture"].tolist() == ARCHS[1:]
    assert set(tables["7_capacity_slopes"]["arch"]) == {"pkm", "ultramem"}
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert {h["variant"] for h in history} >= set(ARCHS)
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    text = json.dumps([o.get("data", {}).get("text/markdown", "") for o in outputs])
    assert "Headline (answer accuracy vs dense" in text and "not yet" in text    # interpretation, exercise check
