"""The official SQuAD v1.1 metric, on hand-written cases and on the leaderboard's own predictions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from pipeline import squad

DEV = REPO.parent / "shared/data/squad/dev-v1.1.json"
ENSEMBLE = REPO.parent / "shared/data/squad/predictions/bert-ensemble-dev-v1.1.json"


@pytest.mark.parametrize("text, normal", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("an apple, a pear and THE plum.", "apple pear and plum"),
    ("  Theatre   then\tthem ", "theatre then them"),  # 'the' inside words stays
    ("a", ""),
    ("1,642 metres", "1642 metres"),
])
def test_normalize(text, normal):
    assert squad.normalize_answer(text) == normal


def test_exact_match_and_f1():
    assert squad.exact_match("the Eiffel tower", "Eiffel Tower.") == 1.0
    assert squad.exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert squad.f1("Eiffel", "Eiffel Tower") == pytest.approx(2 / 3)
    assert squad.f1("tower tower", "tower") == pytest.approx(2 * 0.5 * 1 / 1.5)  # bag of tokens: counts matter
    assert squad.f1("", "Eiffel Tower") == 0.0
    assert squad.f1("the", "a") == 0.0  # both normalize to nothing


def test_best_over_gold_answers_and_missing_predictions():
    items = [{"id": "1", "answers": ["Denver Broncos", "Broncos"]}, {"id": "2", "answers": ["1789"]},
             {"id": "3", "answers": ["Paris"]}]
    report = squad.score(items, {"1": "the Broncos", "2": "in 1789 or so"})
    assert report["count"] == 3 and report["unanswered"] == 1
    assert report["exact_match"] == pytest.approx(100 / 3)
    f1_2 = 2 * (1 / 4) * 1 / (1 / 4 + 1)
    assert report["f1"] == pytest.approx(100 * (1 + f1_2 + 0) / 3)


@pytest.mark.skipif(not DEV.exists(), reason="needs ../shared/data/squad")
def test_scoring_mode_reproduces_the_leaderboard(tmp_path):
    """Official figures for the BERT ensemble on dev v1.1: EM 86.2062, F1 92.1956."""
    report = tmp_path / "r.json"
    subprocess.run([sys.executable, "-m", "jobs.evaluate", "--data", str(DEV), "--predictions", str(ENSEMBLE),
                    "--report", str(report)], check=True, cwd=REPO, capture_output=True)
    r = json.loads(report.read_text())
    assert r["count"] == 10570
    assert round(r["exact_match"], 2) == 86.21 and round(r["f1"], 2) == 92.20
    assert r["exact_match"] == pytest.approx(86.2062, abs=1e-4) and r["f1"] == pytest.approx(92.1956, abs=1e-4)
