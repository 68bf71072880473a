"""Poison rows: read units whose rows crash the model process, split until only the rows that do are left.

A ``Piece`` is a row range of one read unit. The job's first pass answers pending units whole, except towards
its end, where pieces shrink so that the actors finish together (``first_pass``). A piece
whose actor process died on it ``CRASHES_PER_PASS`` times in a pass (Ray retries it on the restarted actor)
is split in halves for the next pass, down to single rows; a single row that still crashes it is written by
the driver (``crashed_rows``) with ``error`` = CRASHED and no answer. Pieces keep their unit's index, and
stage their rows at their offset inside the unit, so the commit sees each unit's rows once, in order, however
it was cut. Pure: no Ray (jobs/execute.py runs the passes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import pyarrow as pa

from . import fanout
from .answer import TOP_ANSWER_TYPE
from .config import TOP_ANSWERS_COLUMN
from .faults import restart_budget_cap
from .units import ReadUnit

CRASHED = "crashed the model process"
CRASHES_PER_PASS = 3  # attempts of a piece in one pass (Ray's max_task_retries + 1) before it is split
POISON_PIECES_PER_PASS = 10  # a pass's restart budget: CRASHES_PER_PASS for each of this many pieces ...
POISON_SHARE = 0.1  # ... or this share of the pass's pieces, whichever is more
FIRST_ROW = "first_row"  # the piece's first output row inside its unit, beside ReadUnit.as_row()'s fields
# The answering stage's columns with no answer (pipeline.answer.Answerer._columns gives the same types).
_NO_ANSWER = (("answer", pa.string()), ("answer_start", pa.int64()), ("answer_end", pa.int64()),
              ("score", pa.float64()), ("probability", pa.float64()))


class ModelCrashLoopError(RuntimeError):
    """The model process crashed more often in one pass than poison rows explain."""


def restart_budget(pieces: int) -> int:
    """Actor restarts a pass of ``pieces`` pieces may take: CRASHES_PER_PASS for each poison piece, for up to
    max(POISON_PIECES_PER_PASS, POISON_SHARE of the pieces) of them. More is a broken model, runtime or node."""
    budget = CRASHES_PER_PASS * max(POISON_PIECES_PER_PASS, math.ceil(POISON_SHARE * pieces))
    cap = restart_budget_cap()
    return budget if cap is None else min(budget, cap)


def crash_loop(restarts: int, budget: int) -> ModelCrashLoopError:
    return ModelCrashLoopError(
        f"the model process crashed {restarts} times in one pass, more than the {budget} restarts a pass may "
        f"take ({CRASHES_PER_PASS} for each read unit with a poison row, for up to "
        f"max({POISON_PIECES_PER_PASS}, {POISON_SHARE:.0%} of the pass's units) of them): that is a broken model, "
        "runtime or node rather than a few poison rows; the answers staged so far are kept: fix the cause and "
        "run again with --mode resume")


@dataclass(frozen=True)
class Piece:
    """Rows ``start .. start + length - 1`` of read unit ``unit`` (counted from the unit's first row)."""

    unit: ReadUnit
    start: int
    length: int

    def __post_init__(self) -> None:
        if self.length < 1 or self.start < 0 or self.start + self.length > self.unit.length:
            raise ValueError(f"piece rows {self.start}..{self.start + self.length - 1} are not inside unit "
                             f"{self.unit.index} (rows 0..{self.unit.length - 1})")

    @property
    def read_unit(self) -> ReadUnit:
        """What a reader reads: the same file and row group, this piece's rows; the unit's index."""
        return replace(self.unit, offset=self.unit.offset + self.start, length=self.length)

    def first_row(self, rows_per_input_row: int = 1) -> int:
        """The piece's first output row inside its unit (fan-out: ``rows_per_input_row`` per input row)."""
        return self.start * rows_per_input_row

    def as_row(self, rows_per_input_row: int = 1) -> dict:
        return {**self.read_unit.as_row(), FIRST_ROW: self.first_row(rows_per_input_row)}

    def halves(self) -> tuple[Piece, Piece]:
        if self.length < 2:
            raise ValueError(f"a piece of one row (unit {self.unit.index}, row {self.start}) cannot be split")
        half = self.length // 2
        return replace(self, length=half), replace(self, start=self.start + half, length=self.length - half)


def whole(unit: ReadUnit) -> Piece:
    return Piece(unit, 0, unit.length)


MIN_PIECE_ROWS = 16  # the smallest piece a pass cuts for balance (a few seconds of BERT-base on one core)


def first_pass(units: Sequence[ReadUnit], actors: int, min_rows: int = MIN_PIECE_ROWS) -> list[Piece]:
    """The first pass's pieces: each unit whole while much of the pass is left, then pieces that shrink towards
    its end (guided self-scheduling: a piece takes 1/(2 x actors) of the rows still to come, at least
    ``min_rows``), so that the actors finish together instead of one answering the last unit while the rest idle.

    A job of a few units no longer runs on a few actors: 1000 rows in one 1024-row unit on 2 actors become
    pieces of 250, 188, 141, ... rows, down to ``min_rows``. A large job cuts only its last 2 x actors units.
    Pieces stage at their offset inside their unit, as poison-row halves do, so the commit is unchanged."""
    remaining = sum(u.length for u in units)
    pieces = []
    for unit in units:
        start = 0
        while start < unit.length:
            size = max(min_rows, math.ceil(remaining / (2 * max(1, actors))))
            left = unit.length - start
            if left - size < min_rows:  # no sliver at the unit's end
                size = left
            pieces.append(Piece(unit, start, size))
            start += size
            remaining -= size
    return pieces


def unit_and_first_row(row: dict) -> tuple[ReadUnit, int]:
    """A piece's row (``Piece.as_row``, or a bare ``ReadUnit.as_row``: the whole unit) as the reader's unit
    and the output row its rows start at."""
    fields = dict(row)
    first = fields.pop(FIRST_ROW, None) or 0
    return ReadUnit.from_row(fields), first


Part = tuple[int, int, int]  # a staged file: (unit index, first output row, rows)


def unstaged(pieces: Sequence[Piece], parts: Iterable[Part], rows_per_input_row: int = 1
             ) -> tuple[list[Piece], list[Part]]:
    """The pieces whose output rows the staged ``parts`` (this pass's) do not cover, and the parts that overlap
    them (a task that died between two of its blocks): the next pass stages those rows again, cut otherwise,
    so those parts must go first. A piece that shares a part with one of those goes again too."""
    def rows(piece: Piece) -> tuple[int, int, int]:
        lo = piece.first_row(rows_per_input_row)
        return piece.unit.index, lo, lo + piece.length * rows_per_input_row

    def overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
        return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]

    spans = [(u, first, first + n) for u, first, n in parts]
    missing = [p for p in pieces if not _covered(rows(p), spans)]
    while True:
        leftovers = [s for s in spans if any(overlap(s, rows(p)) for p in missing)]
        more = [p for p in pieces if p not in missing and any(overlap(s, rows(p)) for s in leftovers)]
        if not more:
            return missing, [(u, lo, hi - lo) for u, lo, hi in leftovers]
        missing.extend(more)


def _covered(want: tuple[int, int, int], spans: list[tuple[int, int, int]]) -> bool:
    unit, at, hi = want
    for _, lo, end in sorted(s for s in spans if s[0] == unit):
        if lo > at:
            break
        at = max(at, end)
    return at >= hi


def after_crashes(failed: Sequence[Piece]) -> tuple[list[Piece], list[Piece]]:
    """Pieces that crashed their actor CRASHES_PER_PASS times: (the next pass's pieces, their halves; the
    single rows that crashed it, for the driver to write)."""
    again, rows = [], []
    for piece in failed:
        if piece.length == 1:
            rows.append(piece)
        else:
            again.extend(piece.halves())
    return again, rows


def crashed_rows(documents: pa.Table, questions: pa.Table | None = None, wide: bool = False,
                 top_k: int = 1) -> pa.Table:
    """The output rows of ``documents`` (input rows that crash the model process) in the answering stage's
    schema: input columns, then null answer columns and ``error`` = CRASHED. With fan-out, one row per
    question (``wide``: one per document, null answer_/score_ columns per question, one error)."""
    rows = documents if questions is None else fanout.expand(documents, questions)
    n = rows.num_rows
    for name, kind in _NO_ANSWER:
        rows = rows.append_column(name, pa.nulls(n, kind))
    rows = rows.append_column("error", pa.array([CRASHED] * n, pa.string()))
    if top_k > 1:
        rows = rows.append_column(TOP_ANSWERS_COLUMN, pa.nulls(n, TOP_ANSWER_TYPE))
    if questions is None or not wide:
        return rows
    out = fanout.to_wide(rows, documents, questions)
    # One reason for the document, not the same one per question.
    return out.set_column(out.schema.get_field_index("error"), "error",
                          pa.array([CRASHED] * documents.num_rows, pa.string()))
