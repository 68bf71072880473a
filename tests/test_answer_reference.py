"""The answering stage against a brute-force reference written plainly here.

The reference cuts windows as BERT's run_squad does (from the context's own tokens, step
doc_stride), runs each window alone and unpadded, and scores every start/end pair.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.answer import Answerer
from pipeline.backends import load_model
from pipeline.config import DecodeSettings

CONTEXTS = [
    "The king of France was born in Paris in 1789, the first year of the war. " * 6,
    "Café naïve résumé — Zürich, Ōsaka and São Paulo; the river 😀 runs east. 北京 is a city. " * 4,
    "Short one: the queen.",
    "who what when " * 60,
]
QUESTIONS = [
    "Who was the king of France?",
    "Which city is on the river?",
    "what is the name of the queen and the king and the year " * 8,  # far over max_query_len
    "when?",
]


def reference(session, tok, question: str, context: str, max_seq_len: int, doc_stride: int,
              max_query_len: int, max_answer_len: int):
    """Best (score, char_start, char_end) over every window and every start/end pair."""
    q = tok.encode(question, add_special_tokens=False)
    q_ids = q.ids[:max_query_len]
    c = tok.encode(context, add_special_tokens=False)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    room = max_seq_len - len(q_ids) - 3
    best = (-np.inf, None, None)
    start = 0
    while True:
        length = min(len(c.ids) - start, room)
        ids = [cls_id, *q_ids, sep_id, *c.ids[start:start + length], sep_id]
        types = [0] * (len(q_ids) + 2) + [1] * (length + 1)
        arr = np.array([ids], dtype=np.int64)
        s, e = session.run(arr, np.ones_like(arr), np.array([types], dtype=np.int64))
        first = len(q_ids) + 2
        for i in range(length):
            for j in range(i, min(length, i + max_answer_len)):
                score = float(s[0, first + i]) + float(e[0, first + j])
                if score > best[0]:
                    best = (score, c.offsets[start + i][0], c.offsets[start + j][1])
        if start + length >= len(c.ids):
            break
        start += min(length, doc_stride)
    return best


def check_against_reference(model_dir, batch_tokens: int, seq_multiple: int | None = None) -> pa.Table:
    spec, session = load_model(str(model_dir))
    if seq_multiple is not None:  # as OpenVINO's session asks on AMX (pipeline.cpu)
        session.seq_multiple = seq_multiple
    answerer = Answerer(spec, session, batch_tokens=batch_tokens)
    table = pa.table({"id": list(range(len(QUESTIONS))), "question": QUESTIONS, "context": CONTEXTS})
    out = answerer(table)
    w = spec.windows
    for i, (q, c) in enumerate(zip(QUESTIONS, CONTEXTS)):
        score, cs, ce = reference(session, answerer.tokenizer, q, c, w.max_seq_len, w.doc_stride, w.max_query_len, 30)
        row = out.slice(i, 1).to_pylist()[0]
        assert row["error"] is None
        assert (row["answer_start"], row["answer_end"]) == (cs, ce), f"question {i}"
        assert row["answer"] == c[cs:ce]
        assert row["score"] == pytest.approx(score, abs=1e-3)
        assert 0 < row["probability"] <= 1
    return out


def test_many_windows_match_reference(tiny_model_64):
    out = check_against_reference(tiny_model_64, batch_tokens=4096)
    assert out.num_rows == len(QUESTIONS)


def test_default_windows_match_reference(tiny_model):
    check_against_reference(tiny_model, batch_tokens=16384)


def test_window_count_is_run_squads(tiny_model_64):
    """Windows start every doc_stride tokens until one reaches the context's end."""
    from pipeline.windows import make_windows

    spec, _ = load_model(str(tiny_model_64))
    answerer_tok = Answerer(spec, load_model(str(tiny_model_64))[1]).tokenizer
    windows, errors = make_windows(answerer_tok, QUESTIONS, CONTEXTS, spec.windows)
    assert not errors
    w = spec.windows
    for i, (q, c) in enumerate(zip(QUESTIONS, CONTEXTS)):
        n_q = min(len(answerer_tok.encode(q, add_special_tokens=False).ids), w.max_query_len)
        n_c = len(answerer_tok.encode(c, add_special_tokens=False).ids)
        room = w.max_seq_len - n_q - 3
        expected = 1 if n_c <= room else 1 + -(-(n_c - room) // w.doc_stride)
        got = windows.context_mask[windows.row == i]
        assert len(got) == expected
        # first context token of window k is context token k * doc_stride
        firsts = [int(np.argmax(m)) for m in got]
        assert len(set(firsts)) == 1  # same question -> same prefix length
    assert (windows.row == 0).sum() >= 5  # the long paragraph spans 5+ windows


def test_batched_equals_unbatched(tiny_model_64):
    """Token budgets that force one window per batch or all in one give the same answers."""
    one = check_against_reference(tiny_model_64, batch_tokens=1)
    many = check_against_reference(tiny_model_64, batch_tokens=1 << 20)
    assert one.column("answer").to_pylist() == many.column("answer").to_pylist()
    np.testing.assert_allclose(one.column("score").to_numpy(), many.column("score").to_numpy(), atol=1e-4)


@pytest.mark.parametrize("multiple", [16, 48])
def test_batches_padded_to_a_multiple_match_reference(tiny_model_64, multiple):
    """A session asking for lengths in multiples (OpenVINO on AMX) gets batches that long, never longer than the
    windows' max_seq_len (64: 48 rounds 50 up to 96, cut to 64), and the same answers as the unpadded reference."""
    spec, session = load_model(str(tiny_model_64))
    seen = []
    run = session.run

    def recording(ids, mask, types):
        longest = int(mask.sum(axis=1).max())
        seen.append((ids.shape[1], longest))
        assert not mask[:, longest:].any()
        return run(ids, mask, types)

    session.seq_multiple = multiple
    session.run = recording
    out = Answerer(spec, session, batch_tokens=256)(
        pa.table({"id": list(range(len(QUESTIONS))), "question": QUESTIONS, "context": CONTEXTS}))
    assert seen and all(cols % multiple == 0 or cols == spec.windows.max_seq_len for cols, _ in seen), seen
    assert all(longest <= cols == min(-(-longest // multiple) * multiple, 64) for cols, longest in seen), seen
    assert any(cols > longest for cols, longest in seen)  # some batch was padded
    assert out.column("answer").to_pylist() == check_against_reference(
        tiny_model_64, batch_tokens=256, seq_multiple=multiple).column("answer").to_pylist()


def test_top_k_lists_distinct_best_first(tiny_model_64):
    spec, session = load_model(str(tiny_model_64))
    out = Answerer(spec, session, decode=DecodeSettings(top_k=5))(
        pa.table({"question": QUESTIONS, "context": CONTEXTS}))
    for row in out.to_pylist():
        top = row["top_answers"]
        assert len(top) == 5
        assert top[0]["answer"] == row["answer"] and top[0]["score"] == row["score"]
        scores = [t["score"] for t in top]
        assert scores == sorted(scores, reverse=True)
        assert len({(t["answer_start"], t["answer_end"]) for t in top}) == 5
        assert sum(t["probability"] for t in top) <= 1 + 1e-9


def test_one_window_when_context_fits(tiny_model):
    """A context that fits gives the same answer with 64-token or 384-token windows of the same model."""
    spec, session = load_model(str(tiny_model))
    small, _ = load_model(str(tiny_model), overrides={"max_seq_len": 64, "doc_stride": 16, "max_query_len": 12})
    table = pa.table({"question": ["who is the king?"], "context": ["The king of France. The queen of Paris."]})
    a = Answerer(spec, session)(table).to_pylist()[0]
    b = Answerer(small, session)(table).to_pylist()[0]
    assert (a["answer_start"], a["answer_end"]) == (b["answer_start"], b["answer_end"])
    assert a["probability"] == pytest.approx(b["probability"], rel=1e-5)
