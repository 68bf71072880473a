"""Fan-out: ask the same questions of every document.

Long form: one row per (document, question), document-major, with both the document's id and the
``question_id``. Wide form: one row per document with ``answer_<question_id>`` and
``score_<question_id>`` columns (and one ``error`` column joining any per-question errors), for
enriching a documents table in place.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

QUESTION_ID = "question_id"
QUESTION = "question"


class QuestionsError(ValueError):
    """The questions table cannot be used; the message names the file and the problem."""


def validate_questions(table: pa.Table, source: str) -> pa.Table:
    missing = [c for c in (QUESTION_ID, QUESTION) if c not in table.column_names]
    if missing:
        raise QuestionsError(f"questions {source}: no column {missing[0]!r} (columns: {table.column_names})")
    table = table.select([QUESTION_ID, QUESTION])
    ids = table.column(QUESTION_ID)
    if ids.null_count or len(pc.unique(ids)) != len(ids):
        raise QuestionsError(f"questions {source}: question_id must be unique and not null")
    if table.num_rows == 0:
        raise QuestionsError(f"questions {source}: no questions")
    return table.cast(pa.schema([(QUESTION_ID, pa.string()), (QUESTION, pa.string())]))


def expand(documents: pa.Table, questions: pa.Table) -> pa.Table:
    """Every document row repeated once per question, document-major, with question_id and question."""
    n, q = documents.num_rows, questions.num_rows
    out = documents.take(pa.array(np.repeat(np.arange(n), q)))
    idx = pa.array(np.tile(np.arange(q), n))
    out = out.append_column(QUESTION_ID, questions.column(QUESTION_ID).take(idx))
    return out.append_column(QUESTION, questions.column(QUESTION).take(idx))


def to_wide(answered: pa.Table, documents: pa.Table, questions: pa.Table) -> pa.Table:
    """Long answers of ``expand(documents, questions)`` back to one row per document."""
    n, q = documents.num_rows, questions.num_rows
    out = documents
    errors = [[] for _ in range(n)]
    for j, qid in enumerate(questions.column(QUESTION_ID).to_pylist()):
        rows = pa.array(np.arange(j, n * q, q)) if n else pa.array([], pa.int64())
        out = out.append_column(f"answer_{qid}", answered.column("answer").take(rows))
        out = out.append_column(f"score_{qid}", answered.column("score").take(rows))
        for i, e in enumerate(answered.column("error").take(rows).to_pylist()):
            if e is not None:
                errors[i].append(f"{qid}: {e}")
    return out.append_column("error", pa.array(["; ".join(e) if e else None for e in errors], pa.string()))
