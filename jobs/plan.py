"""The driver's first step: what a run will do, from the config, the input's metadata and the output. No Ray here.

``plan(cfg)`` opens the source and the sink the format table names (``pipeline.formats``), plans the read units,
checks the columns, and resolves the served model when the variant is known without the cluster (forced by
``--precision``, or recorded by the interrupted run a resume finishes). It fails before anything starts when the
model does not resolve, the input has no such column, or the output refuses the mode. ``settle`` completes a plan
once its model is resolved: the job's identity, what the output already holds, the units still to answer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace

import pyarrow as pa

from jobs.config import JobConfig
from pipeline.auto import decide_shapes
from pipeline.backends import legacy_as_is
from pipeline.commit import OutputState, StagedPart, pending_units
from pipeline.config import OUTPUT_COLUMNS, TOP_ANSWERS_COLUMN, ColumnError, Columns
from pipeline.formats import ReadOptions, Sink, Source, SourcePlan, open_sink, open_source
from pipeline.model_dir import MODEL_ZOO
from pipeline.precision import AUTO, PrecisionChoice, Variant
from pipeline.records import JobIdentity, identity_version, recorded_variant
from pipeline.refresh import CommittedOutput, RefreshPlan, input_key, settings_of, why_not_reused
from pipeline.served import ServedModel, resolve, variant_for
from pipeline.units import ReadUnit, with_derived_ids


@dataclass(frozen=True)
class JobPlan:
    """Everything the later steps need, decided before the cluster is touched (the model: see ``served``)."""

    config: JobConfig
    model_dir: str  # the resolved directory (or graph file) the model comes from
    source: Source
    read: SourcePlan  # files, units and schema the source planned
    sink: Sink
    columns: Columns  # what the answering stage reads (fan-out: the questions' column)
    questions: pa.Table | None  # fan-out questions
    rows_per_input_row: int  # output rows each input row yields
    # The model actors serve; None: --precision auto with nothing recorded, chosen for the cluster's nodes
    # (jobs.choose) before anything is staged. The fields below are set once it is (``settle``).
    served: ServedModel | None = None
    identity: JobIdentity | None = None  # what staged answers depend on
    state: OutputState = field(default_factory=OutputState)  # what the output already holds
    pending: tuple[ReadUnit, ...] = ()  # units still to answer
    staged_rows: int = 0  # input rows already staged by an interrupted run of this job
    adopted: tuple[StagedPart, ...] = ()  # complete units staged by an earlier (dead) run of this job: kept
    stale: tuple[StagedPart, ...] = ()  # staged parts of incomplete units, removed before answering
    recorded: dict | None = None  # --mode resume: the identity the interrupted (else committed) run recorded
    begin_mode: str = ""  # the mode the sink begins the run with ("": the config's)
    refresh: Refresh | None = None  # --mode refresh (or the resume of one): what it reuses
    committed: CommittedOutput | None = None  # the output's committed rows, as a refresh reads them

    @property
    def units(self) -> tuple[ReadUnit, ...]:
        return self.read.units

    @property
    def rows_in(self) -> int:
        return sum(u.length for u in self.units)

    @property
    def needs_cluster(self) -> bool:
        """Whether the cluster decides anything: the variant (auto), a resumed auto variant's check, or answers."""
        return self.served is None or bool(self.pending) or (self.refresh is not None and self.refresh.pass_pending)


@dataclass(frozen=True)
class Refresh:
    """What a refresh reuses: the committed output, and whether its answers hold for this run's settings."""

    committed: CommittedOutput | None
    reuse: bool  # the committed answers were made with this run's settings: rows with unchanged texts take them
    reason: str  # why every row is answered (reuse False), in words
    pass_pending: bool = False  # the reuse pass is still to run (jobs/reuse.py)
    plan: RefreshPlan | None = None  # what the reuse pass left in staging
    reuse_s: float | None = None  # how long this run's reuse pass took (None: it ran in an earlier attempt)

    def line(self, output: str) -> str:
        if not self.reuse:
            return f"refresh: every row is answered: {self.reason}"
        return (f"refresh: rows whose question and context are unchanged take the committed answers of "
                f"{output} ({self.committed.rows} rows, {_ref(self.committed.ref)})")

    def report(self) -> dict:
        """The manifest's ``refresh``."""
        if self.plan is None:
            rows = None if self.committed is None else self.committed.rows
            return {"replaces": None if self.committed is None else self.committed.ref, "rows_reused": 0,
                    "answered_because": {self.reason: "every row"}, "committed_rows_before": rows}
        return {"replaces": self.committed.ref, "rows_reused": self.plan.rows_reused,
                "rows_answered": self.plan.rows_in - self.plan.rows_reused,
                "answered_because": self.plan.answered_because, "committed_rows_before": self.committed.rows,
                "buckets": self.plan.buckets, "reuse_pass_s": self.reuse_s}


def _ref(ref: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in ref.items() if k != "job_sha256")


def plan(cfg: JobConfig) -> JobPlan:
    from models.registry import resolve_model
    from pipeline.fanout import QUESTION, QUESTION_ID

    model_dir = str(resolve_model(cfg.model, MODEL_ZOO))
    questions, columns = None, cfg.columns
    if cfg.questions:
        questions = load_questions(cfg.questions)
        columns = Columns(cfg.columns.id, QUESTION, cfg.columns.context)
    needed = (columns.id, columns.context) if questions is not None else (columns.id, columns.question, columns.context)
    rows_per_input_row = questions.num_rows if questions is not None and not cfg.wide else 1
    select = tuple(c.strip() for c in cfg.select.split(",") if c.strip()) if cfg.select else ()
    source = open_source(cfg.input, ReadOptions(cfg.where, select, cfg.skip_bad_files), cfg.input_format)
    sink = open_sink(cfg.output, rows_per_input_row, source, cfg.output_format)
    recorded = sink.recorded_job() if cfg.mode == "resume" else None
    # what a refresh (or the resume of one) reuses, read once
    committed = sink.committed_output() if cfg.mode == "refresh" or (recorded or {}).get("replaces") else None
    source = source.pinned(recorded)  # a resume reads what the interrupted run read, even if the table moved on
    read = source.plan(cfg.rows_per_unit, needed)
    if read.skipped_files:  # the manifest lists them too; the log is where a nightly job's owner looks first
        bad = read.skipped_files
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        print(f"note: skipped {len(bad)} input file(s) not readable as Parquet (--skip-bad-files): {shown}; "
              "the manifest's skipped_bad_files lists them", file=sys.stderr, flush=True)
    names = read.schema.names
    if questions is not None:
        clash = [c for c in (QUESTION, QUESTION_ID) if c in names]
        if clash:
            raise ColumnError(f"input {cfg.input}: has a column {clash[0]!r}, which fan-out adds; rename it")
    missing = [c for c in needed if c not in names and c != columns.id]
    if missing:
        raise ColumnError(f"input {cfg.input}: no column {missing[0]!r} (columns: {names}); "
                          f"choose columns with --id-column/--question-column/--context-column")
    if columns.id not in names:
        read = derive_ids(read, source, columns.id)
        names = read.schema.names
        print(f"note: input {cfg.input} has no column {columns.id!r} (--id-column): each row's id is derived as "
              f"'<file>:<row>', the file's path below the input and the row's 0-based index in it, in output "
              f"column {columns.id!r}", file=sys.stderr, flush=True)
    if questions is None:  # fan-out's columns: checked at commit
        sink.check_columns(names + list(OUTPUT_COLUMNS) + ([TOP_ANSWERS_COLUMN] if cfg.decode.top_k > 1 else []))
    job = JobPlan(cfg, model_dir, source, read, sink, columns, questions, rows_per_input_row, recorded=recorded,
                  committed=committed)
    choice = forced_choice(cfg, model_dir) or resumed_choice(cfg, model_dir, recorded) or \
        kept_choice(cfg, model_dir, committed)
    return settle(job, choice) if choice is not None else job


def derive_ids(read: SourcePlan, source: Source, column: str) -> SourcePlan:
    """``read`` for an input without an id column: its reader adds ``column`` first, each row's
    ``<file>:<row>`` (pipeline.units.derived_ids), the file's path below the input's root (a folder, a glob's
    fixed prefix, a table's folder; an Iceberg table's data files: their whole path)."""
    from pipeline.lake import input_base

    try:
        base = input_base(source.uri)
    except (ValueError, OSError, pa.ArrowException):  # not a path (iceberg://): the files' whole paths
        base = None
    schema = read.schema.insert(0, pa.field(column, pa.string()))
    return replace(read, units=tuple(with_derived_ids(read.units, column, base)), schema=schema)


def forced_choice(cfg: JobConfig, model_dir: str) -> PrecisionChoice | None:
    """The variant --precision forces (None for auto)."""
    if cfg.precision == AUTO:
        return None
    choice = PrecisionChoice(variant_for(model_dir, cfg.backend, cfg.precision), cfg.precision,
                             "--precision on the command line")
    # Static shapes only where asked for: auto's rule needs the nodes, which a forced precision does not wait for.
    return decide_shapes(model_dir, choice, "static", ()) if cfg.shapes == "static" else choice


def resumed_choice(cfg: JobConfig, model_dir: str, recorded: dict | None) -> PrecisionChoice | None:
    """--precision auto on a resume: the variant the interrupted run chose (jobs.choose checks the nodes)."""
    variant = recorded_variant(recorded)
    if cfg.precision != AUTO or variant is None:
        return None
    if identity_version(recorded) == 1 and variant == Variant("onnxruntime", "fp32"):
        variant = legacy_as_is(model_dir)  # what that name meant then: the graph as it is
    return PrecisionChoice(variant, AUTO, "chosen by the earlier run of this job at this output, "
                                                    "kept on resume")


def kept_choice(cfg: JobConfig, model_dir: str, committed: CommittedOutput | None) -> PrecisionChoice | None:
    """--precision auto on a refresh: the committed run's variant, where the model directory still serves it, so
    that a nightly job does not answer every row again for a near-equal variant (jobs.choose checks the nodes)."""
    settings = None if committed is None or committed.settings is None else {"version": 2, **committed.settings}
    variant = recorded_variant(settings)
    if cfg.precision != AUTO or variant is None:
        return None
    try:
        variant_for(model_dir, variant.backend, variant.precision)
    except (ValueError, OSError):  # the directory no longer has that graph: auto chooses again
        return None
    return PrecisionChoice(variant, AUTO, "the committed run's variant, kept by --mode refresh (another variant "
                                          "would answer every row again)")


def settle(job: JobPlan, choice: PrecisionChoice) -> JobPlan:
    """``job`` serving ``choice``: the model resolved, the identity, what the output holds, the units left."""
    cfg = job.config
    served = resolve(job.model_dir, choice, cfg.windows.as_dict(), cfg.batch_tokens)
    identity = JobIdentity(job.read.identity, served.hashes, served.variant, cfg.columns, cfg.decode,
                           served.spec.windows, cfg.rows_per_unit,
                           None if job.questions is None else job.questions.to_pydict(), cfg.wide,
                           (job.recorded or {}).get("replaces"))
    mode, refresh = cfg.mode, None
    if cfg.mode == "refresh":
        identity, mode = refreshed(job, identity)
    if identity.replaces is not None or cfg.mode == "refresh":
        refresh = refresh_decision(job.committed, identity)
    state = job.sink.inspect(mode, identity)
    if cfg.mode == "refresh" and mode == "refresh" and unchanged(refresh, identity):
        state = replace(state, committed=refresh.committed.manifest)
    # Committed already, or everything staged (the commit only has to roll forward): nothing to answer, so no Ray
    # to start either (a re-run of a finished nightly job returns at once).
    finishing = state.committed is not None or state.commit_list is not None
    if finishing:
        pending, staged_rows, adopted, stale = [], job.rows_in, (), ()
    elif refresh is not None and refresh.reuse:  # the reuse pass plans the units (jobs/reuse.py)
        pending, staged_rows, adopted, stale = [], 0, (), ()
        refresh = replace(refresh, pass_pending=True)
    else:
        pending, staged_rows, adopted, stale = pending_units(list(job.units), state.staged, job.rows_per_input_row)
    return replace(job, served=served, identity=identity, state=state, pending=tuple(pending),
                   staged_rows=staged_rows, adopted=adopted, stale=stale,
                   begin_mode="overwrite" if mode == "refresh" else mode, refresh=refresh)


def refreshed(job: JobPlan, identity: JobIdentity) -> tuple[JobIdentity, str]:
    """A refresh's identity (``replaces``: the committed output) and how to take the output: "resume" when the
    staging holds an interrupted run of this very refresh (it is finished), else "refresh" (staging cleared)."""
    committed = job.committed
    staged = job.sink.staged_job()
    if staged is not None:
        for ref in (staged.get("replaces"), None if committed is None else committed.ref, None):
            candidate = replace(identity, replaces=ref)
            if candidate.compare(staged).same:
                return candidate, "resume"
    return replace(identity, replaces=None if committed is None else committed.ref), "refresh"


def refresh_decision(committed: CommittedOutput | None, identity: JobIdentity) -> Refresh:
    if committed is None:
        return Refresh(None, False, "no committed output yet")
    if identity.replaces != committed.ref:
        return Refresh(committed, False, "the output was committed again since this refresh began")
    why = why_not_reused(committed.settings, settings_of(identity.to_json()), committed.unknown_because)
    return Refresh(committed, why is None, why or "")


def unchanged(refresh: Refresh, identity: JobIdentity) -> bool:
    """The committed output already answers exactly this input with these settings: nothing to do."""
    c = refresh.committed
    return (c is not None and refresh.reuse and c.manifest is not None
            and c.input_key == input_key(identity.to_json()))


def load_questions(uri: str) -> pa.Table:
    """The fan-out questions table, validated (unique non-null question_id, a question column)."""
    import pyarrow.parquet as pq

    from pipeline.fanout import validate_questions
    from pipeline.lake import expand_input

    fs, files = expand_input(uri)
    return validate_questions(pq.ParquetDataset(files, filesystem=fs).read(), uri)
