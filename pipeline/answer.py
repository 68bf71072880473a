"""The whole answering stage over one Arrow table: rows in, the same rows with answers out."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pyarrow as pa

from .config import BATCH_TOKENS, OUTPUT_COLUMNS, TOP_ANSWERS_COLUMN, ColumnError, Columns, DecodeSettings
from .decode import CharSpans, RowSpans, Spans, best_spans
from .model_dir import ModelSpec
from .session import QASession
from .windows import (
    Windows,
    context_room,
    count_windows,
    encode_questions,
    load_tokenizer,
    make_windows,
    padded_length,
    question_error,
    stream_windows,
)

TOP_ANSWER_TYPE = pa.list_(pa.struct([
    ("answer", pa.string()), ("answer_start", pa.int64()), ("answer_end", pa.int64()),
    ("score", pa.float64()), ("probability", pa.float64()),
]))
# A context longer than this is answered alone, its windows streamed through the model a piece of the context at a
# time (pipeline.windows.stream_windows, pipeline.decode.RowSpans): memory no longer grows with the cell.
LONG_CONTEXT_CHARS = 50_000
# The other rows are answered together, as many at a time as hold this many characters of context in all (their
# windows, and so memory, grow with it); a SQuAD-like read unit fits in one group.
GROUP_CHARS = 1_000_000
# (row id, windows done, windows in all) while a long context is answered; see Answerer.
RowProgress = Callable[[str, int, int], None]


@dataclass
class StageTimes:
    """Seconds spent per stage; summed over batches into the run's manifest."""

    tokenize: float = 0.0
    infer: float = 0.0
    decode: float = 0.0
    model_load: float = 0.0  # once per actor: session creation (graph optimization, weight packing)
    rows: int = 0
    windows: int = 0
    tokens: int = 0  # non-padding tokens the model saw
    padded_tokens: int = 0  # tokens the model computed, padding included
    errors: Counter = field(default_factory=Counter)  # rows by error kind

    def __add__(self, other: StageTimes) -> StageTimes:
        """Summed over actors (or batches)."""
        total = StageTimes(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                              for f in fields(self) if f.name != "errors"})
        total.errors = self.errors + other.errors
        return total


@dataclass(frozen=True)
class StageTotals:
    """The job's answering work, summed over actors: what the manifest's ``stages`` records."""

    times: StageTimes = field(default_factory=StageTimes)
    input_rows: int = 0
    actors: int = 0
    first_actor_ready_at: float | None = None  # wall clock, when the first actor had loaded its model

    def manifest_stages(self) -> dict:
        times = {k: v for k, v in asdict(self.times).items() if k != "errors"}
        return {**times, "actors": self.actors, "input_rows": self.input_rows}


def error_kind(message: str) -> str:
    """A row error's kind, for the manifest's counts: the message before any detail in brackets, its numbers as N
    (a context's length, a limit), so that rows refused for one reason count together."""
    return re.sub(r"\d+", "N", message.split(" (")[0])


def validate_texts(column: pa.ChunkedArray | pa.Array, name: str) -> tuple[list, dict[int, str]]:
    """Python strings of a column, and an error for each row that is not a non-empty string."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or pa.types.is_null(column.type)):
        return [None] * len(column), {i: f"{name} column has type {column.type}, expected string"
                                      for i in range(len(column))}
    values = column.to_pylist()
    errors = {}
    for i, v in enumerate(values):
        if v is None:
            errors[i] = f"{name} is null"
        elif not v or v.isspace():  # not v.strip(): that copies a cell that may be huge
            errors[i] = f"{name} is empty"
    return values, errors


class Answerer:
    """Answers a table's questions; holds one tokenizer and one session for its lifetime.

    ``batch_tokens`` bounds the tokens (padding included) per inference call; windows are sorted
    by length so each batch pads only to its own longest window. Small budgets are faster on CPU, not
    slower: a batch's activations (for BERT-base's FFN, tokens x 3072 floats) stay in cache between the
    ops that write and read them, and a sorted batch of fewer windows spans fewer lengths (docs/log/,
    "A 512-token budget": the default model and BERT-base, on AVX2 and AVX-512 VNNI).
    """

    def __init__(self, spec: ModelSpec, session: QASession, columns: Columns | None = None,
                 decode: DecodeSettings | None = None, batch_tokens: int = BATCH_TOKENS,
                 row_progress: RowProgress | None = None):
        self.spec, self.session = spec, session
        self.columns, self.decode = columns or Columns(), decode or DecodeSettings()
        self.tokenizer = load_tokenizer(spec.tokenizer_file, spec.lowercase)
        self.batch_tokens = batch_tokens
        self.row_progress = row_progress  # told of each long context's windows as they are answered
        self.times = StageTimes()

    def __call__(self, table: pa.Table) -> pa.Table:
        """The table with the answer columns added. A context over ``decode.max_context_chars`` gets an error; one
        over LONG_CONTEXT_CHARS is answered alone, its windows streamed (``_answer_long``); the other rows in
        groups of GROUP_CHARS characters of context."""
        missing = [c for c in (self.columns.question, self.columns.context) if c not in table.column_names]
        if missing:
            raise ColumnError(f"answer stage: input has no column {missing[0]!r} (columns: {table.column_names})")
        clash = [c for c in (*OUTPUT_COLUMNS, TOP_ANSWERS_COLUMN) if c in table.column_names]
        if clash:
            raise ColumnError(f"answer stage: input already has output column {clash[0]!r}; rename it first")
        n = table.num_rows
        t0 = time.perf_counter()
        questions, q_err = validate_texts(table.column(self.columns.question), "question")
        contexts, c_err = validate_texts(table.column(self.columns.context), "context")
        errors = {**c_err, **q_err}
        limit = self.decode.max_context_chars
        if limit is not None:
            for i, c in enumerate(contexts):
                if i not in errors and len(c) > limit:
                    errors[i] = f"context has {len(c)} characters, over --max-context-chars {limit}"
        good = [i for i in range(n) if i not in errors]
        long = [i for i in good if len(contexts[i]) > LONG_CONTEXT_CHARS]
        self.times.tokenize += time.perf_counter() - t0
        found: dict[int, list[dict]] = {}
        for group in _groups([i for i in good if len(contexts[i]) <= LONG_CONTEXT_CHARS], contexts, GROUP_CHARS):
            found.update(self._answer_group(group, questions, contexts, errors))
        if long:
            ids = table.column(self.columns.id).to_pylist() if self.columns.id in table.column_names else None
            for i in long:
                got = self._answer_long(questions[i], contexts[i], str(ids[i]) if ids else f"#{i}")
                if isinstance(got, str):
                    errors[i] = got
                else:
                    found[i] = _found(contexts[i], got)
        t3 = time.perf_counter()
        out = self._columns(n, found, errors)
        self.times.decode += time.perf_counter() - t3
        self.times.rows += n
        self.times.errors.update(error_kind(e) for e in errors.values())
        for name, values in out.items():
            table = table.append_column(name, values)
        if table.num_rows != n:
            raise AssertionError(f"answer stage: {n} rows in, {table.num_rows} out")
        return table

    def _answer_group(self, rows: list[int], questions: list, contexts: list,
                      errors: dict[int, str]) -> dict[int, list[dict]]:
        """Answers of these rows (indices into the table), all windows at once; their errors go to ``errors``."""
        t0 = time.perf_counter()
        good = np.asarray(rows, dtype=np.int64)
        windows, w_err = make_windows(self.tokenizer, [questions[i] for i in rows], [contexts[i] for i in rows],
                                      self.spec.windows, pad_to=self.session.fixed_seq_len,
                                      multiple=self.session.seq_multiple)
        errors.update({int(good[i]): msg for i, msg in w_err.items()})
        t1 = time.perf_counter()
        start, end = self.logits(windows)
        t2 = time.perf_counter()
        spans = best_spans(start, end, windows.context_mask, windows.row, len(good), self.decode, windows.offsets)
        char_start, char_end = _characters(spans, windows.offsets)
        filled = (spans.window >= 0).sum(axis=1)  # filled slots come first
        found = {}
        for r, i in enumerate(rows):
            if i not in errors:
                k = filled[r]
                found[i] = _found(contexts[i], CharSpans(char_start[r, :k], char_end[r, :k], spans.score[r, :k],
                                                         spans.probability[r, :k]))
        t3 = time.perf_counter()
        self.times.tokenize += t1 - t0
        self.times.infer += t2 - t1
        self.times.decode += t3 - t2
        self.times.windows += len(windows)
        self.times.tokens += int(windows.lengths.sum())
        return found

    def _answer_long(self, question: str, context: str, row_id: str) -> CharSpans | str:
        """One long context's answers, or why it has none: its windows go through the model a piece of the context
        at a time (``stream_windows``) and only the decoder's state (``RowSpans``) outlives a piece. With
        ``row_progress`` set, a first pass over the context counts its windows and each piece reports."""
        t0 = time.perf_counter()
        w = self.spec.windows
        q = encode_questions(self.tokenizer, [question], w)[0]
        if (error := question_error(q, context_room(self.tokenizer, q, w), w)) is not None:
            self.times.tokenize += time.perf_counter() - t0
            return error
        total = count_windows(self.tokenizer, q, context, w) if self.row_progress else 0
        spans = RowSpans(self.decode)
        pieces = stream_windows(self.tokenizer, q, context, w, pad_to=self.session.fixed_seq_len,
                                multiple=self.session.seq_multiple)
        t1 = time.perf_counter()
        self.times.tokenize += t1 - t0
        for windows in pieces:
            t2 = time.perf_counter()
            self.times.tokenize += t2 - t1
            start, end = self.logits(windows)
            t3 = time.perf_counter()
            spans.add(start, end, windows.context_mask, windows.offsets)
            t1 = time.perf_counter()
            self.times.infer += t3 - t2
            self.times.decode += t1 - t3
            self.times.windows += len(windows)
            self.times.tokens += int(windows.lengths.sum())
            if self.row_progress:
                self.row_progress(row_id, spans.windows, total)
        self.times.tokenize += time.perf_counter() - t1
        if spans.windows == 0:
            return "context has no tokens"
        return spans.result()

    def logits(self, windows: Windows) -> tuple[np.ndarray, np.ndarray]:
        """Start/end logits [W, L], batches of similar length, returned in the windows' order."""
        width = windows.input_ids.shape[1]
        start = np.full((len(windows), width), -np.inf, dtype=np.float32)
        end = np.full((len(windows), width), -np.inf, dtype=np.float32)
        order = np.argsort(windows.lengths, kind="stable")
        # The length each window is computed at: its own, rounded up to the session's multiple (OpenVINO on AMX:
        # whole tiles, pipeline.cpu; the batch's longest, being sorted, sets the batch's), or the graph's fixed one.
        cols_of = (np.full(len(order), width) if self.session.fixed_seq_len else
                   padded_length(windows.lengths, self.session.seq_multiple, width))
        for b0, b1, cols, rows in cut_batches(cols_of[order], self.batch_tokens, self.session.static_shapes):
            idx = order[b0:b1]
            batch = windows.take(np.concatenate([idx, np.full(rows - len(idx), idx[-1])]), cols)
            s, e = self.session.run(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            start[idx, :cols], end[idx, :cols] = s[:len(idx)], e[:len(idx)]
            self.times.padded_tokens += rows * cols
        return start, end

    def _columns(self, n: int, found: dict[int, list[dict]], errors: dict[int, str]) -> dict[str, pa.Array]:
        answer = [None] * n
        a_start = [None] * n
        a_end = [None] * n
        score = [None] * n
        prob = [None] * n
        top: list = [None] * n
        for i, spans in found.items():
            if not spans:
                errors[i] = "no answer span found"
                continue
            best = spans[0]
            answer[i], a_start[i], a_end[i] = best["answer"], best["answer_start"], best["answer_end"]
            score[i], prob[i] = best["score"], best["probability"]
            top[i] = spans
        err = [errors.get(i) for i in range(n)]
        values = dict(zip(OUTPUT_COLUMNS, (answer, a_start, a_end, score, prob, err), strict=True))
        if self.decode.top_k > 1:
            values[TOP_ANSWERS_COLUMN] = top
        return {name: pa.array(values[name], type_) for name, type_ in answer_types(self.decode).items()}


def cut_batches(cols: np.ndarray, budget: int, canonical: bool = False) -> list[tuple[int, int, int, int]]:
    """Batches of windows sorted by length: (first, past-last, length, rows computed) each, where ``cols`` are the
    sorted windows' padded lengths and a batch computes rows x length tokens.

    Each batch is the longest run from its first window whose longest (its last) window fits ``budget`` tokens.
    ``canonical`` (a session with static shapes, one compiled model per shape): a batch of length L always computes
    budget // L rows, so a job meets one shape per length; of the lengths a batch could take, it takes the one
    that answers the most windows (the shortest of those), and rows it has no window for are copies of its last.
    """
    out = []
    b0, n = 0, len(cols)
    lengths = np.unique(cols)
    while b0 < n:
        if canonical:
            best, length = 0, int(cols[b0])
            for candidate in lengths[np.searchsorted(lengths, cols[b0]):]:
                rows = max(1, budget // int(candidate))
                if rows <= best:  # longer lengths take fewer rows still
                    break
                covered = min(rows, int(np.searchsorted(cols, candidate, side="right")) - b0)
                if covered > best:
                    best, length = covered, int(candidate)
            b1, rows = b0 + best, max(1, budget // length)
        else:
            b1 = b0 + 1
            while b1 < n and (b1 + 1 - b0) * cols[b1] <= budget:
                b1 += 1
            length, rows = int(cols[b1 - 1]), b1 - b0
        out.append((b0, b1, length, rows))
        b0 = b1
    return out


def answer_types(decode: DecodeSettings) -> dict[str, pa.DataType]:
    """The columns the stage adds, in order, and their types."""
    types = {"answer": pa.string(), "answer_start": pa.int64(), "answer_end": pa.int64(), "score": pa.float64(),
             "probability": pa.float64(), "error": pa.string()}
    return {**types, TOP_ANSWERS_COLUMN: TOP_ANSWER_TYPE} if decode.top_k > 1 else types


def answered_schema(schema: pa.Schema, decode: DecodeSettings, questions: pa.Table | None = None,
                    wide: bool = False) -> pa.Schema:
    """The schema of the answered rows of an input with ``schema``: what a job writes (fan-out: with its
    ``questions``, long or ``wide``), as a job with no rows commits it in one empty file."""
    from . import fanout

    documents = schema.empty_table()
    rows = documents if questions is None else fanout.expand(documents, questions)
    for name, type_ in answer_types(decode).items():
        rows = rows.append_column(pa.field(name, type_), pa.array([], type_))
    if questions is not None and wide:
        rows = fanout.to_wide(rows, documents, questions)
    return rows.schema


def _characters(spans: Spans, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and past-last characters [n_rows, top_k] of each span in its context (0 in empty slots)."""
    filled = spans.window >= 0
    w = np.where(filled, spans.window, 0)
    if not len(offsets):
        return np.zeros_like(w), np.zeros_like(w)
    return (offsets[w, np.where(filled, spans.start_token, 0), 0],
            offsets[w, np.where(filled, spans.end_token, 0), 1])


def _found(context: str, spans: CharSpans) -> list[dict]:
    """One question's answers, best first, as the output's top_answers list them."""
    return [{"answer": context[cs:ce], "answer_start": cs, "answer_end": ce, "score": sc, "probability": p}
            for cs, ce, sc, p in zip(spans.start.tolist(), spans.end.tolist(), spans.score.tolist(),
                                     spans.probability.tolist())]


def _groups(rows: list[int], contexts: list, chars: int) -> list[list[int]]:
    """``rows`` in order, cut into runs of at most ``chars`` characters of context (a run holds at least one row)."""
    groups: list[list[int]] = []
    size = chars
    for i in rows:
        if size + len(contexts[i]) > chars:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += len(contexts[i])
    return groups
