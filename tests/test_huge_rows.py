"""A row of any size (issue 34): a long context is answered a piece at a time, with the windows, spans and scores of
answering it whole, in memory that does not grow with the cell; --max-context-chars refuses longer cells; progress
lines name a long row an actor is working through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from test_windows import EDGE_CONTEXT, roberta_style
from tiny_models import write_model_dir, write_tokenizer_json, write_vocab
from tokenizers import AddedToken, Regex, pre_tokenizers

import pipeline.answer
from jobs.progress import progress_line
from jobs.ray_stage import LONG_ROW_REPORT_S, LongRow, LongRowReporter, StageBook
from pipeline.answer import Answerer
from pipeline.backends import load_model
from pipeline.config import DecodeSettings, WindowSettings
from pipeline.decode import RowSpans, best_spans
from pipeline.windows import (
    context_pieces,
    count_windows,
    encode_questions,
    load_tokenizer,
    make_windows,
    stream_windows,
)

# Mostly words of the tiny models' vocabulary (one token each), with what tokenizers treat specially: accents,
# CJK, an emoji, a literal [SEP], runs of spaces, tabs and newlines, a word longer than WordPiece's 100 characters.
PARAGRAPH = ("The king of France was born in Paris in 1789, the first year of the war.  Where is the river? "
             "The city is on the river;\tthe queen was born at the cafe.\n Naïve café — Zürich [SEP] 北京 is a city 😀 "
             "which one, two or three? " + "x" * 120 + " The last name of the king was Louis. ")
QUESTIONS = ["Who was the king of France?", "where is the river?", "what " * 40 + "year?"]


def long_text(chars: int) -> str:
    return (PARAGRAPH * (chars // len(PARAGRAPH) + 1))[:chars]


def assert_same_windows(tok, question: str, context: str, settings: WindowSettings, piece_chars: int) -> None:
    want, errors = make_windows(tok, [question], [context], settings)
    assert not errors
    q = encode_questions(tok, [question], settings)[0]
    got = list(stream_windows(tok, q, context, settings, piece_chars=piece_chars))
    assert sum(map(len, got)) == len(want) == count_windows(tok, q, context, settings, piece_chars)
    k = 0
    for batch in got:
        assert batch.input_ids.shape[1] == max(batch.lengths)  # as wide as make_windows makes its windows alone
        for i, n in enumerate(batch.lengths):
            assert n == want.lengths[k]
            for name in ("input_ids", "token_type_ids", "attention_mask", "context_mask", "offsets"):
                a, b = getattr(batch, name)[i, :n], getattr(want, name)[k, :n]
                assert (a == b).all(), f"{name} of window {k} (piece_chars {piece_chars})"
            k += 1


@pytest.mark.parametrize("settings", [WindowSettings(), WindowSettings(max_seq_len=64, doc_stride=16, max_query_len=20),
                                      WindowSettings(max_seq_len=48, doc_stride=200, max_query_len=8)],
                         ids=["run_squad", "many-windows", "stride-past-room"])
def test_streamed_windows_are_make_windows(settings, tmp_path):
    """Cut into pieces of 40 to 2000 characters (many seams, tokens across none) and windowed piece by piece, a
    context gets make_windows' windows, in its order, for BERT-style and RoBERTa-style tokenizers."""
    context = long_text(6000) + " " + EDGE_CONTEXT
    for tok in (load_tokenizer(write_vocab(tmp_path), True), load_tokenizer(write_tokenizer_json(tmp_path), True),
                roberta_style([PARAGRAPH, EDGE_CONTEXT] * 5)):
        assert len(context_pieces(tok, context, 40)) > 100
        for piece_chars in (40, 2000):
            for question in QUESTIONS:
                assert_same_windows(tok, question, context, settings, piece_chars)


def test_pieces_only_where_tokens_do_not_cross_spaces(tmp_path):
    """A tokenizer whose tokens might cross a space (a regex split of its own, an added word) tokenizes the context
    in one piece: the same windows still, without the bound on memory."""
    context = long_text(5000)
    tok = load_tokenizer(write_tokenizer_json(tmp_path), True)
    assert len(context_pieces(tok, context, 100)) > 10
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"king of"), "isolated")
    assert context_pieces(tok, context, 100) == [(0, len(context))]
    tok = load_tokenizer(write_tokenizer_json(tmp_path), True)
    tok.add_tokens([AddedToken("of france", normalized=True)])
    assert context_pieces(tok, context, 100) == [(0, len(context))]
    assert_same_windows(tok, QUESTIONS[0], context, WindowSettings(max_seq_len=64, doc_stride=16, max_query_len=20),
                        100)


@pytest.mark.parametrize("top_k", [1, 4])
@pytest.mark.parametrize("seed", range(4))
def test_row_spans_batch_by_batch_are_best_spans(seed, top_k):
    """Windows of one question fed a few at a time give best_spans' spans over them all: the same characters and
    scores (ties too: logits on a coarse grid, overlapping windows listing the same span), the same
    probabilities within rounding."""
    rng = np.random.default_rng(seed)
    n_win, width, max_len = 23, 30, 5
    start = np.round(rng.standard_normal((n_win, width)) * 2) / 2
    end = np.round(rng.standard_normal((n_win, width)) * 2) / 2
    mask = np.zeros((n_win, width), bool)
    mask[:, 4:28] = True
    mask[5, :] = False  # a window with no context
    first = np.arange(n_win)[:, None] * 10 + np.arange(width)[None, :]  # window w's token t is word 10 w + t
    offsets = np.stack([first * 3, first * 3 + 2], axis=2).astype(np.int32)
    settings = DecodeSettings(max_answer_len=max_len, top_k=top_k)
    whole = best_spans(start, end, mask, np.zeros(n_win, np.int64), 1, settings, offsets)
    k = int((whole.window[0] >= 0).sum())
    w = whole.window[0, :k]
    for sizes in ([n_win], [1] * n_win, [3, 7, 1, 12]):
        spans = RowSpans(settings)
        for a, b in zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes)):
            spans.add(start[a:b], end[a:b], mask[a:b], offsets[a:b])
        got = spans.result()
        assert spans.windows == n_win
        assert got.start.tolist() == offsets[w, whole.start_token[0, :k], 0].tolist()
        assert got.end.tolist() == offsets[w, whole.end_token[0, :k], 1].tolist()
        assert got.score.tolist() == whole.score[0, :k].tolist()
        np.testing.assert_allclose(got.probability, whole.probability[0, :k], rtol=1e-12)


@pytest.mark.parametrize("top_k", [1, 3])
def test_long_rows_answer_as_answered_whole(tiny_model_64, monkeypatch, top_k):
    """Long contexts (over LONG_CONTEXT_CHARS, here lowered) among short ones, and rows cut into groups
    (GROUP_CHARS): every row's answers are those of the whole table answered at once."""
    spec, session = load_model(str(tiny_model_64))
    decode = DecodeSettings(top_k=top_k)
    contexts = [long_text(n) for n in (300, 9000, 700, 5000, 40, 12000)] + ["   ", long_text(8000)]
    table = pa.table({"id": [f"r{i}" for i in range(len(contexts))],
                      "question": [QUESTIONS[i % len(QUESTIONS)] for i in range(len(contexts))],
                      "context": contexts})
    at_once = Answerer(spec, session, decode=decode)
    whole = at_once(table).to_pylist()
    monkeypatch.setattr(pipeline.answer, "LONG_CONTEXT_CHARS", 4000)
    monkeypatch.setattr(pipeline.answer, "GROUP_CHARS", 800)
    seen = []
    answerer = Answerer(spec, session, decode=decode, row_progress=lambda *a: seen.append(a))
    got = answerer(table).to_pylist()
    assert [s[0] for s in seen if s[1] == s[2]] == ["r1", "r3", "r5", "r7"]  # each long row, to its last window
    assert answerer.times.windows == at_once.times.windows and answerer.times.tokens == at_once.times.tokens
    for a, b in zip(got, whole):
        assert (a["answer"], a["answer_start"], a["answer_end"], a["error"]) == \
               (b["answer"], b["answer_start"], b["answer_end"], b["error"]), a["id"]
        if b["error"] is None:
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
            assert a["probability"] == pytest.approx(b["probability"], rel=1e-4)
        if top_k > 1 and b["error"] is None:
            assert [(t["answer_start"], t["answer_end"]) for t in a["top_answers"]] == \
                   [(t["answer_start"], t["answer_end"]) for t in b["top_answers"]]
    assert whole[6]["error"] == got[6]["error"] == "context is empty"


def reference_answer(answerer: Answerer, question: str, context: str) -> tuple[int, int, float, float]:
    """The answer of one row as the stage computed it before long contexts were streamed: all its windows cut,
    run and decoded at once."""
    session = answerer.session
    windows, errors = make_windows(answerer.tokenizer, [question], [context], answerer.spec.windows,
                                   pad_to=session.fixed_seq_len, multiple=session.seq_multiple)
    assert not errors
    start, end = answerer.logits(windows)
    spans = best_spans(start, end, windows.context_mask, windows.row, 1, answerer.decode, windows.offsets)
    w, i, j = spans.window[0, 0], spans.start_token[0, 0], spans.end_token[0, 0]
    return (int(windows.offsets[w, i, 0]), int(windows.offsets[w, j, 1]), float(spans.score[0, 0]),
            float(spans.probability[0, 0]))


# The 20 MB row takes minutes on 2 cores (its reference computes every window at once): run with QA_SLOW_TESTS=1.
ROW_SIZES = [2_000_000] + ([20_000_000] if os.environ.get("QA_SLOW_TESTS") == "1" else [])


@pytest.mark.parametrize("chars", ROW_SIZES)
def test_a_megabytes_row_among_normal_rows_answers_as_the_reference(tiny_model, chars):
    """A context of megabytes among short rows: its answer is the reference's (its windows all at once), and so
    are the short rows'."""
    spec, session = load_model(str(tiny_model))
    big = long_text(chars)
    questions = QUESTIONS + ["which city?"]
    contexts = [PARAGRAPH, PARAGRAPH * 3, big, "the river runs by the city of paris."]
    table = pa.table({"id": ["a", "b", "big", "c"], "question": questions, "context": contexts})
    answerer = Answerer(spec, session, row_progress=lambda *a: None)
    got = answerer(table).to_pylist()
    for row, question, context in zip(got, questions, contexts):
        start, end, score, probability = reference_answer(answerer, question, context)
        assert (row["answer_start"], row["answer_end"]) == (start, end), row["id"]
        assert row["answer"] == context[start:end] and row["error"] is None
        assert row["score"] == pytest.approx(score, abs=1e-5)
        assert row["probability"] == pytest.approx(probability, rel=1e-6)


PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys
    import pyarrow as pa
    from pipeline.answer import Answerer
    from pipeline.backends import load_model

    model, chars, paragraph, question = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    spec, session = load_model(model)
    big = (paragraph * (chars // len(paragraph) + 1))[:chars]
    table = pa.table({"question": [question] * 21, "context": [paragraph] * 20 + [big]})
    del big
    out = Answerer(spec, session, row_progress=lambda *a: None)(table)
    assert out.column("error").null_count == 21, out.column("error").to_pylist()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


def test_peak_memory_does_not_grow_with_the_cell(tmp_path):
    """The answering stage's peak resident memory, each size in a fresh process: a 10 MB cell costs less than
    100 MB more than a 2 MB one, the cell's own copies included (Python's string, four bytes a character here:
    the paragraph has an emoji; the table's). Holding the cell's windows at once would cost more than that
    (their token arrays alone: about 40 bytes a token, a token every 4-5 characters), its encoding more again.
    Windows of 256 tokens, one every 240, keep the model's time on 10 MB short; the memory kept per piece of
    context does not depend on them."""
    model = write_model_dir(tmp_path / "model", spec={"max_seq_len": 256, "doc_stride": 240, "max_query_len": 16})
    peak = {}
    for size in (2_000_000, 10_000_000):
        done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(model), str(size), PARAGRAPH, QUESTIONS[0]],
                              cwd=REPO,
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        peak[size] = int(done.stdout.split()[-1])
    assert peak[10_000_000] - peak[2_000_000] < 100, peak
    print(f"peak RSS MB by cell size: {peak}")


# ---------------------------------------------------------------------------------------- progress reports


class FakeStats:
    """The stats actor's handle, as LongRowReporter calls it."""

    def __init__(self, book: StageBook):
        self.book = book
        self.long_row = self

    def remote(self, actor, row):
        self.book.long_row(actor, row)


def test_long_row_reports_and_progress_line():
    """A row is reported once it has kept its actor busy LONG_ROW_REPORT_S, then at most that often, and cleared
    when done (or when the actor reports its units); the progress line lists the rows left, most windows left
    first."""
    now = [0.0]
    book = StageBook(alive=lambda: frozenset())
    report = LongRowReporter(FakeStats(book), "a1", clock=lambda: now[0])
    report("quick", 1, 2)
    report("quick", 2, 2)  # done before anyone heard of it
    report("r123", 10, 25000)
    assert book.long_rows() == []
    now[0] = LONG_ROW_REPORT_S
    report("r123", 4100, 25000)
    now[0] += 0.5
    report("r123", 4200, 25000)  # too soon: not sent
    other = LongRowReporter(FakeStats(book), "a2", clock=lambda: now[0])
    other("r9", 1, 10)
    now[0] += LONG_ROW_REPORT_S + 1
    other("r9", 5, 10)
    assert book.long_rows() == [LongRow("r123", 4100, 25000, LONG_ROW_REPORT_S),
                                LongRow("r9", 5, 10, LONG_ROW_REPORT_S + 1)]
    line = progress_line(40, 101, 20.0, "2 actors on 1 nodes (2 started)", book.long_rows())
    assert line == ("progress: 40/101 rows (39.6%), 2.0 rows/s, ETA 0:00:30, 2 actors on 1 nodes (2 started); "
                    "row r123: 4100/25000 windows; row r9: 5/10 windows")
    slow = [LongRow("huge", 1000, 8000, 100.0)]  # 700 s left at its rate: later than the rows' 30 s
    assert "ETA 0:11:40" in progress_line(40, 101, 20.0, "", slow)
    report("r123", 25000, 25000)
    assert [r.row for r in book.long_rows()] == ["r9"]
    from jobs.ray_stage import ActorReport
    from pipeline.answer import StageTimes

    book.report(ActorReport("a2", StageTimes(), 3))
    assert book.long_rows() == []


# --------------------------------------------------------------------------------------------- a real job


def test_job_refuses_contexts_over_the_limit_and_shows_a_long_row(tiny_model, tmp_path, joined_ray):
    """--max-context-chars: the longer row gets the error and no answer, the others their answers, and the
    limit is part of the job's identity. A long row under the limit shows in the progress lines."""
    from test_exactly_once import run_job

    rows = [("short", "who was the king?", PARAGRAPH), ("over", "who was the king?", long_text(1_200_000)),
            ("long", "where is the river?", long_text(700_000)), ("edge", "which city?", long_text(1_000_000))]
    src, out = tmp_path / "in.parquet", tmp_path / "out"
    pq.write_table(pa.table({k: [r[i] for r in rows] for i, k in enumerate(("id", "question", "context"))}), src)
    text = run_job(["--input", str(src), "--output", str(out), "--model", str(tiny_model),
                    "--max-context-chars", "1000000", "--progress-every", "0.5", "--rows-per-unit", "1"])
    manifest = json.loads((out / "_manifest.json").read_text())
    got = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert got["over"]["error"] == "context has 1200000 characters, over --max-context-chars 1000000"
    assert got["over"]["answer"] is None and got["over"]["score"] is None
    for name in ("short", "long", "edge"):
        assert got[name]["error"] is None and got[name]["answer"], name
    assert manifest["job"]["decode"]["max_context_chars"] == 1_000_000
    assert manifest["errors_by_kind_this_run"] == {"context has N characters, over --max-context-chars N": 1}
    assert "; row long: " in text or "; row edge: " in text, text[-3000:]
