"""The driver's first step: what a run will do, from the config and the input's metadata. No Ray here.

``plan(cfg)`` fails before anything starts when the model does not load, the input has no such column,
or the output refuses the mode; it returns a ``JobPlan`` that ``jobs.execute`` runs and ``jobs.answer``
commits.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from jobs.config import REPO, JobConfig
from pipeline.backends import graph_as_is, graph_file, load_model, resolve_backend, runtime_for, servable_variants
from pipeline.commit import OutputCommitter, OutputState, StagedPart, pending_units
from pipeline.config import OUTPUT_COLUMNS, TOP_ANSWERS_COLUMN, Columns
from pipeline.model_dir import ModelSpec
from pipeline.precision import AUTO as PRECISION_AUTO
from pipeline.precision import ClassMeasurements, NodeCpu, PrecisionChoice, Variant, choose, parse_table, runnable
from pipeline.units import ReadUnit, plan_units

MODEL_ZOO = Path(os.environ.get("QA_MODEL_ZOO", REPO / "models" / "zoo"))  # where registry names resolve
# --precision auto's measurements for a model whose card has none: the default model's (pipeline/precision.py)
DEFAULT_CARD = REPO / "models" / "minilm-squad" / "card.json"


class PrecisionChoiceError(ValueError):
    """A resume whose recorded variant the cluster cannot compute as it was computed."""


@dataclass(frozen=True)
class JobPlan:
    """Everything ``execute`` and ``commit`` need, decided before the cluster is touched."""

    config: JobConfig
    model_dir: str  # the resolved directory (or graph file) actors load
    spec: ModelSpec
    input_fs: pafs.FileSystem
    input_files: tuple[str, ...]
    skipped_files: tuple[str, ...]  # unreadable, with --skip-bad-files
    units: tuple[ReadUnit, ...]
    columns: Columns  # what the answering stage reads (fan-out: the questions' column)
    questions: pa.Table | None  # fan-out questions
    rows_per_input_row: int  # output rows each input row yields
    identity: dict  # what staged answers depend on: resume refuses to mix runs that differ in any of it
    output: OutputCommitter
    state: OutputState  # what the output already holds
    pending: tuple[ReadUnit, ...]  # units still to answer
    staged_rows: int  # input rows already staged by an interrupted run of this job
    adopted: tuple[StagedPart, ...]  # complete units staged by an earlier (dead) run of this job: kept
    stale: tuple[StagedPart, ...]  # staged parts of incomplete units, removed before answering
    # The variant actors serve; None: --precision auto on an output with nothing recorded, chosen from the
    # cluster's nodes by settle_precision before anything is staged.
    precision: PrecisionChoice | None = None

    @property
    def chooses_on_cluster(self) -> bool:
        """Whether the nodes' CPUs decide (auto) or must be checked (a resumed auto choice, with rows left to
        answer) before answering."""
        return self.precision is None or (bool(self.pending) and self.precision.requested == PRECISION_AUTO)

    @property
    def rows_in(self) -> int:
        return sum(u.length for u in self.units)

    @property
    def model_bytes(self) -> int:
        """The graph's size on disk (an OpenVINO IR keeps its weights in the .bin beside it)."""
        files = [self.spec.model_file, self.spec.model_file.with_suffix(".bin")]
        return sum(f.stat().st_size for f in files if f.exists())


def plan(cfg: JobConfig) -> JobPlan:
    from models.registry import resolve_model
    from pipeline.fanout import QUESTION, QUESTION_ID
    from pipeline.lake import expand_input, input_base

    model_dir = str(resolve_model(cfg.model, MODEL_ZOO))
    questions, columns = None, cfg.columns
    if cfg.questions:
        questions = load_questions(cfg.questions)
        columns = Columns(cfg.columns.id, QUESTION, cfg.columns.context)
    needed = (columns.id, columns.context) if questions is not None else (columns.id, columns.question, columns.context)
    rows_per_input_row = questions.num_rows if questions is not None and not cfg.wide else 1
    table_in = open_table_input(cfg) if cfg.input.startswith("iceberg://") else None
    output = open_output(cfg, rows_per_input_row, table_in)
    spec, choice = load_variant(cfg, model_dir, output)
    if table_in is not None:
        if cfg.mode == "resume":  # read the snapshot the interrupted run read, even if the table moved on
            table_in = open_table_input(cfg, pinned_snapshot(output, table_in))
        in_fs, in_files, bad_files = table_in.fs, list(table_in.files), []
        units, schema = table_in.plan_units(cfg.rows_per_unit, needed)
    else:
        in_fs, in_files = expand_input(cfg.input)
        units, schema, bad_files = plan_units(in_fs, in_files, cfg.rows_per_unit, skip_bad_files=cfg.skip_bad_files,
                                              base=input_base(cfg.input))
    if bad_files:  # the manifest lists them too; the log is where a nightly job's owner looks first
        shown = ", ".join(bad_files[:5]) + (f" and {len(bad_files) - 5} more" if len(bad_files) > 5 else "")
        print(f"note: skipped {len(bad_files)} input file(s) not readable as Parquet (--skip-bad-files): {shown}; "
              "the manifest's skipped_bad_files lists them", file=sys.stderr, flush=True)
    if questions is not None:
        clash = [c for c in (QUESTION, QUESTION_ID) if c in schema.names]
        if clash:
            raise KeyError(f"input {cfg.input}: has a column {clash[0]!r}, which fan-out adds; rename it")
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise KeyError(f"input {cfg.input}: no column {missing[0]!r} (columns: {schema.names}); "
                       f"choose columns with --id-column/--question-column/--context-column")
    if cfg.output.startswith("iceberg://") and questions is None:  # fan-out's columns: checked at commit
        top = [TOP_ANSWERS_COLUMN] if cfg.decode.top_k > 1 else []
        output.check_columns(schema.names + list(OUTPUT_COLUMNS) + top)
    identity = job_identity(cfg, spec, choice, in_fs, [f for f in in_files if f not in bad_files], questions,
                            table_in)
    job = JobPlan(cfg, model_dir, spec, in_fs, tuple(in_files), tuple(bad_files), tuple(units), columns, questions,
                  rows_per_input_row, identity, output, OutputState(), (), 0, (), (), choice)
    return inspected(job)


def inspected(job: JobPlan) -> JobPlan:
    """``job`` with what its output already holds for its identity, and so the units still to answer."""
    state = job.output.inspect(job.config.mode, job.identity)
    # Committed already, or everything staged (the commit only has to roll forward): nothing to answer, so no Ray
    # to start either (a re-run of a finished nightly job returns at once).
    if state.committed is not None or state.commit_list is not None:
        pending, staged_rows, adopted, stale = [], job.rows_in, (), ()
    else:
        pending, staged_rows, adopted, stale = pending_units(list(job.units), state.staged, job.rows_per_input_row)
    return replace(job, state=state, pending=tuple(pending), staged_rows=staged_rows, adopted=adopted, stale=stale)


def load_variant(cfg: JobConfig, model_dir: str, output) -> tuple[ModelSpec, PrecisionChoice | None]:
    """The model's spec as the job will serve it, and the variant: forced by --precision, or (auto) the one
    an earlier run of this job recorded at this output, else None (settle_precision chooses on the cluster;
    meanwhile the spec is the graph's as it is: windows and tokenizer are the same for every variant)."""
    overrides = cfg.windows.as_dict()
    if cfg.precision != PRECISION_AUTO:
        spec, _ = load_model(model_dir, 1, overrides, cfg.backend, cfg.precision)
        variant = Variant(runtime_for(spec.model_file, spec.spec, resolve_backend(cfg.backend, cfg.precision)),
                          cfg.precision)
        return spec, PrecisionChoice(variant, cfg.precision, "--precision on the command line")
    recorded = (output.recorded_job() or {}).get("precision_choice") if cfg.mode == "resume" else None
    choice = None
    if recorded:
        choice = PrecisionChoice(Variant(**recorded), PRECISION_AUTO,
                                 "chosen by the earlier run of this job at this output, kept on resume")
    variant = choice.variant if choice else graph_as_is(model_dir, cfg.backend)
    spec, _ = load_model(model_dir, 1, overrides, variant.backend, variant.precision)
    return spec, choice


def auto_table(model_dir: str) -> dict[str, ClassMeasurements]:
    """The auto_precision measurements of the model's own card, else the default model's."""
    d = Path(model_dir)
    for card in (d / "card.json" if d.is_dir() else d.parent / "card.json", DEFAULT_CARD):
        if card.exists():
            table = parse_table(json.loads(card.read_text()))
            if table:
                return table
    return {}


def settle_precision(job: JobPlan, nodes: Sequence[NodeCpu]) -> JobPlan:
    """Choose auto's variant for the nodes of the cluster (all of them: one choice per job), or check that a
    resumed choice is one they compute as it was computed; a forced --precision is left as it is."""
    cfg = job.config
    if job.precision is None:
        choice = choose(auto_table(job.model_dir), nodes, servable_variants(job.model_dir, cfg.backend),
                        graph_as_is(job.model_dir, cfg.backend), job.spec.shape)
        return with_precision(job, choice)
    if job.precision.requested == PRECISION_AUTO and not runnable(job.precision.variant, nodes):
        lacking = sorted({n.cpu_class for n in nodes if not n.bf16})
        raise PrecisionChoiceError(
            f"output {cfg.output}: the interrupted run of this job answered with {job.precision.variant}, and "
            f"nodes of this cluster (CPU class {', '.join(lacking)}) have no bfloat16 matmuls, so their answers "
            "would differ; resume on nodes with bfloat16 matmuls (AMX, AVX512-BF16), or start again with "
            "--mode overwrite")
    return job


def with_precision(job: JobPlan, choice: PrecisionChoice) -> JobPlan:
    """``job`` serving ``choice``: its spec (graph), identity and output state follow."""
    v = choice.variant
    spec = job.spec
    if graph_file(job.model_dir, v.backend, v.precision) != spec.model_file:
        spec, _ = load_model(job.model_dir, 1, job.config.windows.as_dict(), v.backend, v.precision)
    identity = {**job.identity, **model_identity(spec, choice)}
    return inspected(replace(job, spec=spec, identity=identity, precision=choice))


def open_table_input(cfg: JobConfig, snapshot_id: int | None = None):
    """An iceberg:// input pinned to ``snapshot_id`` (default: the table's current snapshot)."""
    from pipeline.iceberg import open_input

    select = tuple(c.strip() for c in cfg.select.split(",") if c.strip()) if cfg.select else ()
    return open_input(cfg.input, cfg.where, select, snapshot_id)


def pinned_snapshot(output, table_in) -> int:
    """The input snapshot an interrupted run of this job staged answers for, else ``table_in``'s."""
    staged = (output.staged_job() or {}).get("input_table") or {}
    return staged.get("snapshot_id", table_in.snapshot_id) if staged.get("table") == table_in.ref.uri \
        else table_in.snapshot_id


def open_output(cfg: JobConfig, rows_per_input_row: int, table_in=None):
    """The committer of ``cfg.output``: a folder's (``pipeline.commit``) or an Iceberg table's."""
    if cfg.output.startswith("iceberg://"):
        from pipeline.iceberg import IcebergCommitter

        return IcebergCommitter(cfg.output, rows_per_input_row,
                                partition_fields=table_in.partition_fields if table_in is not None else ())
    from pipeline.lake import filesystem_and_path

    out_fs, out_path = filesystem_and_path(cfg.output)
    return OutputCommitter(out_fs, out_path, rows_per_input_row)


def job_identity(cfg: JobConfig, spec: ModelSpec, choice: PrecisionChoice | None, in_fs: pafs.FileSystem,
                 in_files: list[str], questions: pa.Table | None, table_in=None) -> dict:
    """What staged answers depend on: resume refuses to mix runs that differ in any of it.

    Input files by path, size and modification time (S3: LastModified), so a file rewritten with the same size
    is a different input; an Iceberg input by its snapshot, filter and projection (its data files never change);
    the model by the sha256 of its graph, tokenizer and qa_spec.json, and the variant that serves it.
    """
    if table_in is not None:
        inputs = {"input_table": table_in.identity()}
    else:
        from pipeline.lake import stat_files  # S3: the HEADs 32 at a time, not one after another

        inputs = {"input_files": [{"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns}
                                  for f in stat_files(in_fs, in_files)]}
    return {
        "questions": None if questions is None else questions.to_pydict(),
        "wide": cfg.wide,
        **inputs,
        "columns": asdict(cfg.columns),
        "decode": asdict(cfg.decode),
        "windows": asdict(spec.windows),
        **model_identity(spec, choice),
        "rows_per_unit": cfg.rows_per_unit,
    }


def model_identity(spec: ModelSpec, choice: PrecisionChoice | None) -> dict:
    """The model's part of a job's identity: its graph (as the chosen variant reads it) and that variant."""
    model = spec.identity()
    return {
        "model_sha256": model["sha256"],
        "weights_sha256": model["weights_sha256"],
        "tokenizer_sha256": model["tokenizer_sha256"],
        "spec_sha256": model["spec_sha256"],
        "precision_choice": None if choice is None else choice.identity(),
    }


def load_questions(uri: str) -> pa.Table:
    """The fan-out questions table, validated (unique non-null question_id, a question column)."""
    import pyarrow.parquet as pq

    from pipeline.fanout import validate_questions
    from pipeline.lake import expand_input

    fs, files = expand_input(uri)
    return validate_questions(pq.ParquetDataset(files, filesystem=fs).read(), uri)
