"""Answer a pyarrow Table or a pandas DataFrame in this process, with one call: no Ray, no files.

    from pipeline.api import answer
    out = answer(df)                      # df: question and context columns; out: df plus the answer columns

    from pipeline.api import QA
    qa = QA(precision="auto")             # a service: the model is opened once, then answers table after table
    out = qa(table)

What comes back is what was given, one row per input row in the input's order: a Table gets the answer columns
appended (``answer``, ``answer_start``, ``answer_end``, ``score``, ``probability``, ``error``, and ``top_answers``
with ``top_k`` > 1), as a job's output rows have them; a DataFrame comes back as a new DataFrame with the same
index and columns plus those, typed as pandas reads a job's output (``pd.read_parquet``). A bad row gets an
``error`` and no answer, as in a job; a missing column raises ColumnError.

The model and its variant are resolved as a job resolves them (``--model``: a directory, a graph file inside one,
a registry name, else ``QA_MODEL`` or the default model; ``--precision``/``--backend``), and ``precision="auto"``
chooses with the job's rule (``pipeline.precision.choose``) for this machine's CPU, as a job does for a one-node
cluster of it. The answering is the job's own stage (``pipeline.answer.Answerer``) over the one session this object
holds. pandas is imported only when a DataFrame is given. docs/guides/python-api.md has examples, and says when a
job (``jobs.answer.run``) is the better tool.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any, TypeVar

import pyarrow as pa

from .answer import Answerer
from .config import OUTPUT_COLUMNS, TOP_ANSWERS_COLUMN, ColumnError, Columns, DecodeSettings, WindowOverrides
from .precision import AUTO, NodeCpu, PrecisionChoice, memory_bytes
from .served import ServedModel, resolve, variant_for

Data = TypeVar("Data")  # a pyarrow Table or a pandas DataFrame: what comes back is what was given


class QA:
    """One model session, opened once, answering tables and DataFrames in this process (``qa(data)``).

    ``model``: a model directory, a graph file inside one, or a registry name (None: ``QA_MODEL``, else the
    default model). ``precision``/``backend``: as the job's flags (``"auto"``: the job's choice for this machine's
    CPU; ``served.choice`` says what was chosen and why). ``columns``: a ``Columns`` or a mapping such as
    ``{"question": "q", "context": "ctx"}``. ``top_k``, ``max_answer_len``, ``max_context_chars``: span decoding, as
    the job's ``--top-k`` etc. ``windows``: window overrides (``WindowOverrides`` or a mapping). ``batch_tokens``:
    tokens per inference call (None: the backend's default, as in a job). ``threads``: the runtime's threads (None:
    the CPUs this process may run on; a job's actors run one each). ``shapes``: as the job's ``--shapes``
    (pipeline/shapes.py). Not thread-safe: one call at a time.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, precision: str = AUTO, backend: str = AUTO,
                 columns: Columns | Mapping[str, str] | None = None, top_k: int = 1, max_answer_len: int = 30,
                 max_context_chars: int | None = None, windows: WindowOverrides | Mapping[str, int] | None = None,
                 batch_tokens: int | None = None, threads: int | None = None, shapes: str = AUTO):
        self.columns = columns if isinstance(columns, Columns) else Columns(**(columns or {}))
        self.decode = DecodeSettings(max_answer_len, top_k, max_context_chars)
        overrides = windows if isinstance(windows, WindowOverrides) else WindowOverrides(**(windows or {}))
        if batch_tokens is not None and batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        self.threads = threads or _cpus()
        model_dir = _model_dir(model)
        self.served: ServedModel = resolve(model_dir, _choice(model_dir, backend, precision, shapes), overrides.as_dict(),
                                           batch_tokens)
        self.answerer = Answerer(self.served.spec, self.served.open(self.threads), self.columns, self.decode,
                                 self.served.batch_tokens)

    def __call__(self, data: Data) -> Data:
        """``data`` with the answer columns added, one row per input row (the module docstring)."""
        pd = sys.modules.get("pandas")  # a DataFrame can only exist once pandas is imported
        if pd is not None and isinstance(data, pd.DataFrame):
            return self._frame(data, pd)
        if isinstance(data, pa.RecordBatch):  # comes back as a Table
            data = pa.Table.from_batches([data])
        if not isinstance(data, pa.Table):
            raise TypeError(f"answer: expected a pyarrow Table or a pandas DataFrame, got {type(data).__name__}")
        return self.answerer(data)

    @property
    def output_columns(self) -> tuple[str, ...]:
        """The columns each call adds, in order."""
        return OUTPUT_COLUMNS + ((TOP_ANSWERS_COLUMN,) if self.decode.top_k > 1 else ())

    def _frame(self, df, pd):
        """A DataFrame's answers: only its question and context columns go through Arrow, so its other columns and
        its index come back untouched; the answer columns as ``Table.to_pandas`` (and so ``pd.read_parquet`` on a
        job's output) types them."""
        names = [str(c) for c in df.columns]
        clash = [c for c in self.output_columns if c in names]
        if clash:
            raise ColumnError(f"answer stage: input already has output column {clash[0]!r}; rename it first")
        texts = {c: _texts(df[c], c) for c in (self.columns.question, self.columns.context) if c in df.columns}
        answered = self.answerer(pa.table(texts) if texts else pa.table({"_": pa.nulls(len(df))}))
        found = answered.select(list(self.output_columns)).to_pandas()
        return df.assign(**{c: found[c].array for c in self.output_columns})


def answer(data: Data, model: str | os.PathLike | None = None, **settings: Any) -> Data:
    """``data`` (a pyarrow Table or a pandas DataFrame) answered in this process: ``QA(model, **settings)(data)``.
    Opens the model for this one call; a service that answers again and again keeps a ``QA``."""
    return QA(model, **settings)(data)


def _model_dir(model: str | os.PathLike | None) -> str:
    """What ``--model`` resolves to in a job: a path as is, a registry name under the zoo, None the default."""
    from models.registry import resolve_model
    from pipeline.model_dir import MODEL_ZOO, default_model

    return str(resolve_model(str(model) if model is not None else default_model(), MODEL_ZOO))


def _choice(model_dir: str, backend: str, precision: str, shapes: str = AUTO) -> PrecisionChoice:
    """The variant served: a forced precision as the job's plan resolves it (``jobs.plan.forced_choice``), or auto's
    choice for this machine's CPU, by the rule ``jobs.choose.choose_variant`` applies to a cluster's nodes."""
    from pipeline.auto import auto_choice, decide_shapes, static_shapes_bytes
    from pipeline.backends import resolve_backend

    resolve_backend(backend, precision)  # the job's one check of the pair: raises ValueError on a bad one
    if precision != AUTO:
        choice = PrecisionChoice(variant_for(model_dir, backend, precision), precision, "asked for")
        choice = decide_shapes(model_dir, choice, "static", ()) if shapes == "static" else choice
    else:
        choice = auto_choice(model_dir, backend, [NodeCpu.here()], shapes)
    need = static_shapes_bytes(model_dir, choice.variant)
    if need is not None and need > (memory := memory_bytes()):  # killed for memory mid-answering otherwise
        raise ValueError(f"shapes='static': {model_dir}: the compiled shapes (about {need / 2**30:.1f} GiB, a copy "
                         f"of the weights per batch shape) would not fit this machine's {memory / 2**30:.1f} GiB; "
                         "use shapes='auto' or 'dynamic'")
    return choice


def _texts(column, name: str) -> pa.Array:
    """A DataFrame column as Arrow (None and NaN: null). A column of strings and numbers, which no Parquet column
    can be, is refused with its first non-text cell named, rather than answered as text it may not be."""
    try:
        return pa.array(column, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        position, bad = next(((i, v) for i, (v, present) in enumerate(zip(column.tolist(), column.notna().tolist()))
                              if present and not isinstance(v, str)), (None, None))
        where = "" if position is None else f": row {position} holds {type(bad).__name__} {bad!r}"
        raise ColumnError(f"answer: column {name!r} mixes text with other values{where}; convert it first "
                          f"(e.g. df[{name!r}].astype('string'))") from exc


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
