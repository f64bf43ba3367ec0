"""labcore.exercises: registration, checking (right / wrong / no answer), solutions on request."""

import pytest

from labcore import exercises
from labcore.config import ConfigError


def _fresh(monkeypatch):
    monkeypatch.setattr(exercises, "_REGISTRY", {})
    monkeypatch.setattr(exercises, "_LOADED", True)  # no notebook modules: only what the test registers


def test_check_says_right_or_wrong_and_why(monkeypatch):
    _fresh(monkeypatch)

    @exercises.exercise("99.1", "How many values does a 16 x 16 product-key grid hold?",
                        solution="n^2 = **256**")
    def _(answer):
        if not isinstance(answer, int):
            raise ConfigError(f"answer={answer!r} is not allowed: must be an integer")
        return answer == 256, "n^2 = 256" if answer == 256 else f"{answer} != n^2 = 256"

    good, bad = exercises.check("99.1", 256), exercises.check("99.1", 32)
    assert good and good.right and "256" in good.why
    assert not bad and "32" in bad.why
    assert str(bad).startswith("[99.1] not yet")
    assert "right" in good._repr_markdown_()
    empty = exercises.check("99.1", ...)
    assert not empty and "no answer" in empty.why
    with pytest.raises(ConfigError, match="must be an integer"):
        exercises.check("99.1", "256")
    sol = exercises.solution("99.1")
    assert sol == "n^2 = **256**" and sol._repr_markdown_() == sol


def test_unknown_and_duplicate_ids_are_clear_errors(monkeypatch):
    _fresh(monkeypatch)
    exercises.exercise("99.1", "q", solution="s")(lambda a: (True, ""))
    with pytest.raises(ConfigError, match="already registered"):
        exercises.exercise("99.1", "q", solution="s")(lambda a: (True, ""))
    with pytest.raises(ConfigError, match=r"id='98.1' is not known: must be one of \['99.1'\]"):
        exercises.check("98.1", 1)
    with pytest.raises(ConfigError, match="must look like 'NN.k'"):
        exercises.exercise("99", "q", solution="s")


def test_exercises_for_a_notebook_in_number_order(monkeypatch):
    _fresh(monkeypatch)
    for i in (10, 2, 1):
        exercises.exercise(f"97.{i}", "q", solution="s")(lambda a: (True, ""))
    exercises.exercise("96.1", "q", solution="s")(lambda a: (True, ""))
    assert [e.id for e in exercises.exercises_for("97_anything")] == ["97.1", "97.2", "97.10"]


def test_every_shipped_exercise_has_a_question_a_solution_and_a_checker():
    exercises._load()
    for ex in exercises._REGISTRY.values():
        assert ex.question.strip() and ex.solution.strip() and callable(ex.checker), ex.id
        assert not exercises.check(ex.id, ...)  # no answer is never right
