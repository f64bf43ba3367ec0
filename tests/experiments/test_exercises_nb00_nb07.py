"""The exercises of 00_tour and 07_memory_family: a right and a wrong answer each, an answer of the
wrong kind, and the right answers recomputed here by the slow, obvious route."""

import math

import pytest

from labcore import exercises
from labcore.config import ConfigError
from labcore.exercises import nb00, nb07
from labcore.experiments import memory_family as mf
from labcore.experiments.params import MemoryFamilyParams, TourParams


def test_each_notebook_has_its_exercises_with_solutions():
    assert [e.id for e in exercises.exercises_for("00")] == ["00.1", "00.2", "00.3"]
    assert [e.id for e in exercises.exercises_for("07_memory_family")] == ["07.1", "07.2", "07.3"]
    for e in exercises.exercises_for("00") + exercises.exercises_for("07"):
        assert e.question and len(exercises.solution(e.id)) > 80
        assert not exercises.check(e.id, ...).right                   # the notebook's prefilled answer


def test_00_1_expected_experts_touched():
    P = TourParams()
    miss = (1 - P.moe_top_k / P.n_experts) ** 4                        # one expert missed by all 4 tokens
    right = P.n_experts * (1 - miss)
    assert right == pytest.approx(5.46875)
    assert exercises.check("00.1", round(right, 2)).right
    assert not exercises.check("00.1", 2 * 4).right                    # B*K ignores the repeats
    with pytest.raises(ConfigError, match="must be a finite number"):
        exercises.check("00.1", "5.47")


def test_00_2_saturation_batch():
    assert exercises.check("00.2", 9).right
    v = exercises.check("00.2", 8)
    assert not v.right and "too small" in v.why
    assert not exercises.check("00.2", 10).right
    assert 1 - 0.75 ** 8 < 0.9 <= 1 - 0.75 ** 9                          # the answer, by hand
    assert nb00.saturation_batch(4, 4) == 1                              # K = E: one token touches all


def test_00_3_bytes_per_token_ratio():
    b = nb00.bytes_per_token(64)
    moe, pkm = nb00.MOE.cost(), nb00.PKM.cost()
    assert abs(moe.total_params / pkm.total_params - 1) < 0.01           # about the same size
    # by hand: the MoE's 64 tokens touch all experts; PKM reads U(64) rows of 16 floats + its dense part
    n = nb00.PKM.n_keys ** 2
    rows = n * (1 - (1 - nb00.PKM.top_k / n) ** 64)
    assert b["pkm"] == pytest.approx(4 * (pkm.dense_params + 16 * rows) / 64)
    assert b["moe"] == pytest.approx(4 * moe.total_params / 64, rel=1e-3)
    assert exercises.check("00.3", b["moe"] / b["pkm"]).right
    assert not exercises.check("00.3", 1.0).right
    with pytest.raises(ConfigError):
        exercises.check("00.3", True)


def test_07_1_reads_per_row():
    P = MemoryFamilyParams()
    mem = mf.family(P)["pkm"].plan.memory
    right = P.steps * P.batch_size * mem.heads * mem.top_k / mem.n_keys ** 2
    assert nb07.reads_per_row()[0] == pytest.approx(right)
    assert exercises.check("07.1", round(right)).right
    assert not exercises.check("07.1", right / mem.heads).right        # K instead of H*K
    with pytest.raises(ConfigError):
        exercises.check("07.1", [right])


def test_07_2_fewer_bytes_per_token():
    v = exercises.check("07.2", "PKM")
    b = nb07._bytes_per_token(64)
    assert b["pkm"] < b["moe"] and v.right and "B/token" in v.why
    assert not exercises.check("07.2", "moe").right
    with pytest.raises(ConfigError, match="moe"):
        exercises.check("07.2", "dense")


def test_07_3_stored_bits_floor_at_zero():
    right = 600 * (7 - 1.5) / 1e3
    assert exercises.check("07.3", right).right
    v = exercises.check("07.3", (600 * 5.5 - 200) / 1e3)               # subtracting the below-chance facts
    assert not v.right and "floored at 0" in v.why
    assert not exercises.check("07.3", 800 * 7 / 1e3).right
    assert math.isclose(right, 3.3)
