"""Property test: whatever the text, the answering stage never crashes and keeps every row."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.answer import Answerer
from pipeline.backends import load_model

NASTY = ["", " ", "\t\n ", "\x00\x01\x07", "\u200b\u200e\u202e", "😀🚀👩‍👩‍👧", "e\u0301\u0301\u0301",
         "مرحبا بالعالم", "שלום", "北京是中国的首都", "Ω≈ç√∫", "[SEP] [CLS] [PAD]", "\ufeff", "a" * 500]
WORDS = ["the", "king", "of", "France", "Paris", "1789", "river", "Café", "naïve", "Zürich", "?", ",", "."]

text_piece = st.one_of(st.sampled_from(NASTY), st.sampled_from(WORDS), st.text(max_size=30))
ROWS_PER_EXAMPLE = 420  # x 25 examples = 10,500 rows


def build_rows(pieces: list[str], seed: int) -> list[tuple]:
    """Many rows from a few generated pieces: hypothesis draws the pieces and the seed (cheap to
    generate and shrink), a seeded RNG assembles the rows from them, the stock words and NASTY."""
    rng = random.Random(seed)
    pool = pieces + WORDS + NASTY

    def cell():
        kind = rng.random()
        if kind < 0.08:
            return None
        if kind < 0.2:
            return rng.choice(NASTY)
        if kind < 0.25:
            return " ".join(rng.choice(WORDS) for _ in range(rng.randint(200, 400)))  # longer than a window
        return " ".join(rng.choice(pool) for _ in range(rng.randint(0, 40)))

    return [(cell(), cell()) for _ in range(ROWS_PER_EXAMPLE)]


SEEN = {"rows": 0}


@pytest.fixture(scope="module")
def answerer(tiny_model):
    spec, session = load_model(str(tiny_model))
    return Answerer(spec, session)


def check(answerer: Answerer, table: pa.Table) -> None:
    out = answerer(table)
    assert out.num_rows == table.num_rows
    for q, c, r in zip(table.column("question").to_pylist(), table.column("context").to_pylist(), out.to_pylist()):
        if r["error"] is None:
            assert isinstance(r["answer"], str) and r["answer"]
            assert 0 <= r["answer_start"] < r["answer_end"] <= len(c)
            assert c[r["answer_start"]:r["answer_end"]] == r["answer"]
            assert 0 < r["probability"] <= 1
        else:
            assert r["answer"] is None and r["answer_start"] is None and r["score"] is None
            assert r["error"].split()[0] in ("question", "context")  # names the bad column
        if q is None:
            assert r["error"] == "question is null"
        elif c is None:
            assert r["error"] is not None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pieces=st.lists(text_piece, min_size=1, max_size=30), seed=st.integers(0, 2**32 - 1), huge=st.booleans())
def test_never_crashes_one_row_each(answerer, pieces, seed, huge):
    rows = build_rows(pieces, seed)
    questions = [q for q, _ in rows]
    contexts = [c for _, c in rows]
    if huge:  # one 100,000-character context: hundreds of windows
        contexts[0] = ("The king of France was born in Paris. " * 2700)[:100_000]
        questions[0] = "who was born in Paris?"
    check(answerer, pa.table({"question": pa.array(questions, pa.string()),
                              "context": pa.array(contexts, pa.string())}))
    SEEN["rows"] += len(rows)


def test_saw_ten_thousand_rows():
    """Runs after the property test (file order): the property covered 10,000+ generated rows."""
    assert SEEN["rows"] >= 10_000


def test_non_string_and_all_null_columns(answerer):
    table = pa.table({"question": pa.array([b"who", b"what"], pa.binary()), "context": ["a b", "c d"]})
    assert answerer(table).column("error").to_pylist() == ["question column has type binary, expected string"] * 2
    table = pa.table({"question": pa.array([None, None], pa.null()), "context": ["a b", "c d"]})
    assert answerer(table).column("error").to_pylist() == ["question is null"] * 2
    table = pa.table({"question": pa.array([], pa.string()), "context": pa.array([], pa.string())})
    assert answerer(table).num_rows == 0
