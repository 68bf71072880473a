"""The reuse pass of ``--mode refresh``: find the committed answers that still hold, on the cluster's workers.

Runs after the sink is taken (the lease) and before the answering passes, as two rounds of Ray tasks over files
in ``<staging>/_refresh`` (pipeline/refresh.py has the rule and the join):

1. map: each task reads whole read units of the input (fan-out: expanded to one row per question) or whole
   committed files, keys every row by its texts, and writes its rows split by the key's bucket;
2. reduce: one task per bucket joins its input rows with its committed rows; rows that match are staged as
   read unit ``bucket * GROUPS + k`` of the new output, with their committed answers (the stager's own
   ``write_block``, so a crash point ``stage:<k>`` falls here too); the others go to ``miss-<bucket>-<k>.parquet``.
   ``k`` numbers the partitions of a partitioned table output (each staged file goes into one partition).

The driver only sends file names and receives counts, so its memory does not grow with the rows reused.
Once every reduce is done it writes ``_plan.json``; the answering passes then answer the miss files' rows as
read units numbered after the buckets. A refresh that dies before ``_plan.json`` starts the pass again (its
scratch files and staged parts removed first); one that dies after it keeps every staged unit, as any resume.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.plan import JobPlan
from pipeline import fanout
from pipeline.commit import ROW_COLUMN, UNIT_COLUMN, pending_units, write_json_atomic
from pipeline.config import Columns
from pipeline.formats import SourcePlan
from pipeline.lake import read_json
from pipeline.refresh import (
    CRASHED_BEFORE,
    GROUPS,
    KEY,
    MAP_ROWS,
    NEW_CONTENT,
    ORDER,
    PLAN_FILE,
    RefreshPlan,
    bucket_count,
    buckets_of,
    content_keys,
    join,
    partition_groups,
    reusable,
    split,
    wide_columns,
)
from pipeline.units import ReadUnit, UnitReader, plan_units

SCRATCH = "_refresh"


def reuse(job: JobPlan, stager) -> JobPlan:
    """``job`` with the reuse pass done: its units are the buckets' staged reused rows and the rows left to
    answer (read from staging), its pending units those still to answer."""
    fs, scratch = stager.fs, f"{stager.staging}/{SCRATCH}"
    plan_path = f"{scratch}/{PLAN_FILE}"
    if fs.get_file_info(plan_path).type == pafs.FileType.File:
        plan = RefreshPlan.from_json(read_json(fs, plan_path))
    else:
        _clear(fs, scratch, stager)
        plan = _run(job, stager, fs, scratch)
        write_json_atomic(fs, plan_path, plan.to_json())
    units = [ReadUnit(u, "", 0, 0, rows) for u, rows in sorted(plan.reused.items()) if rows]
    schema = job.read.schema
    if plan.missing_files:
        missing, schema, _ = plan_units(fs, plan.missing_files, job.config.rows_per_unit)
        units += [replace(u, index=plan.buckets * GROUPS + u.index) for u in missing]
    stager.rows_per_input_row = 1  # the units hold output rows now (fan-out: one per document and question)
    pending, staged_rows, adopted, stale = pending_units(units, tuple(stager.staged_parts()), 1)
    for p in stale:
        fs.delete_file(p.path)
    read = SourcePlan(fs, tuple(plan.missing_files), (), tuple(units), schema, job.read.identity)
    # long-form fan-out's rows were expanded by the map step: answered as plain rows; wide rows are documents
    questions = job.questions if job.config.wide else None
    return replace(job, read=read, questions=questions, rows_per_input_row=1, pending=tuple(pending),
                   staged_rows=staged_rows, adopted=adopted, stale=(),
                   refresh=replace(job.refresh, plan=plan, pass_pending=False))


def recorded_plan(job: JobPlan, stager) -> JobPlan:
    """``job`` with the plan its interrupted reuse pass left (for the manifest), where staging still has it."""
    path = f"{stager.staging}/{SCRATCH}/{PLAN_FILE}"
    if job.refresh is None or stager.fs.get_file_info(path).type != pafs.FileType.File:
        return job
    return replace(job, refresh=replace(job.refresh, plan=RefreshPlan.from_json(read_json(stager.fs, path))))


def _clear(fs: pafs.FileSystem, scratch: str, stager) -> None:
    """Before a pass: no scratch file and no staged part of an earlier attempt (nothing was answered yet)."""
    if fs.get_file_info(scratch).type != pafs.FileType.NotFound:
        fs.delete_dir(scratch)
    for p in stager.staged_parts():
        fs.delete_file(p.path)
    fs.create_dir(scratch, recursive=True)


def _run(job: JobPlan, stager, fs: pafs.FileSystem, scratch: str) -> RefreshPlan:
    import ray

    task = ray.remote(num_cpus=1, max_retries=3)
    _map_input, _map_committed, _reduce = task(_map_input_fn), task(_map_committed_fn), task(_reduce_fn)
    committed = job.refresh.committed
    per_row = job.rows_per_input_row
    rows_in = job.rows_in * per_row
    n = bucket_count(max(rows_in, committed.rows))
    fan, wide = job.questions is not None, job.config.wide
    added = wide_columns(job.questions.column(fanout.QUESTION_ID).to_pylist()) if wide else None
    maps = []
    for k, group in enumerate(_groups(list(job.units), lambda u: u.length * per_row)):
        maps.append(_map_input.remote(job.read.fs, group, job.questions, job.columns, n, fs, f"{scratch}/in-{k:05d}",
                                      wide))
    files = list(committed.files)
    per_file = max(1, committed.rows // max(1, len(files)))
    for k, group in enumerate(_groups(files, lambda f: per_file)):
        maps.append(_map_committed.remote(committed.fs, group, job.columns, fan, n, fs, f"{scratch}/old-{k:05d}",
                                          added))
    inputs: dict[int, list[str]] = {}
    olds: dict[int, list[str]] = {}
    for written in ray.get(maps):
        for side, b, path in written:
            (inputs if side == "in" else olds).setdefault(b, []).append(path)
    partition_by = [src for src, _, _ in getattr(job.sink, "partition_fields", ())]
    reduces = [_reduce.remote(fs, b, inputs[b], olds.get(b, []), stager, f"{scratch}/miss-{b:05d}", partition_by)
               for b in sorted(inputs)]
    reused, missing_files, new, crashed = {}, [], 0, 0
    for staged, miss_paths, missed, crashed_here in ray.get(reduces):
        reused.update(staged)
        missing_files += miss_paths
        new += missed - crashed_here
        crashed += crashed_here
    because = {k: v for k, v in ((NEW_CONTENT, new), (CRASHED_BEFORE, crashed)) if v}
    return RefreshPlan(n, reused, sorted(missing_files), rows_in, because)


def _groups(items: list, rows) -> list[list]:
    """Consecutive items, about MAP_ROWS rows a group."""
    out, group, size = [], [], 0
    for item in items:
        group.append(item)
        size += rows(item)
        if size >= MAP_ROWS:
            out.append(group)
            group, size = [], 0
    return out + ([group] if group else [])


def _write_buckets(table: pa.Table, n: int, fs: pafs.FileSystem, prefix: str, side: str) -> list:
    out = []
    for b, part in split(table, buckets_of(table.column(KEY).combine_chunks(), n), n).items():
        path = f"{prefix}-{b:05d}.parquet"
        pq.write_table(part, path, filesystem=fs)
        out.append((side, b, path))
    return out



def _map_input_fn(src_fs, units: list[ReadUnit], questions: pa.Table | None, columns: Columns, n: int,
                  fs: pafs.FileSystem, prefix: str, wide: bool = False) -> list:
    """Read units (fan-out, long form: one row per question), keyed and split by bucket, with their place in the
    input."""
    reader, parts = UnitReader(src_fs), []
    for u in units:
        rows = reader.read(u)
        if questions is not None and not wide:
            rows = fanout.expand(rows, questions)
        order = (np.int64(u.index) << 32) + np.arange(rows.num_rows, dtype=np.int64)
        rows = rows.append_column(KEY, content_keys(rows, columns, questions is not None, wide))
        parts.append(rows.append_column(ORDER, pa.array(order)))
    return _write_buckets(pa.concat_tables(parts), n, fs, prefix, "in")


def _map_committed_fn(old_fs, files: list[str], columns: Columns, fan: bool, n: int, fs: pafs.FileSystem,
                      prefix: str, wide: list[str] | None = None) -> list:
    """Committed files' rows as cached answers (pipeline.refresh.reusable), split by bucket."""
    parts = []
    for path in files:
        with old_fs.open_input_file(path) as f:
            table = pq.read_table(f)
        parts.append(reusable(table, columns, fan, wide))
    return _write_buckets(pa.concat_tables(parts, promote_options="default"), n, fs, prefix, "old") if parts else []


def _reduce_fn(fs: pafs.FileSystem, b: int, inputs: list[str], olds: list[str], stager, miss_prefix: str,
               partition_by: list[str]):
    """Join one bucket: stage the rows that keep their answers as units ``b * GROUPS + k`` (one per partition of
    a partitioned output), write the rest to ``miss_prefix-<k>.parquet``. Returns ({unit: rows staged}, the miss
    files, rows missed, of which crashed before)."""
    rows = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in inputs], promote_options="default")
    if olds:
        cache = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in olds], promote_options="default")
        joined = join(rows, cache)
        reused, missing, crashed = joined.reused, joined.missing, joined.crashed_before
    else:
        reused, missing, crashed = rows.slice(0, 0), rows.sort_by(ORDER).drop_columns([KEY, ORDER]), 0
    where = f"output {stager.staging}"
    staged = {}
    for k, group in enumerate(partition_groups(reused, partition_by, where)):
        unit = b * GROUPS + k
        group = group.append_column(UNIT_COLUMN, pa.array(np.full(group.num_rows, unit, np.int64)))
        stager.write_block(group.append_column(ROW_COLUMN, pa.array(np.arange(group.num_rows, dtype=np.int64))))
        staged[unit] = group.num_rows
    miss_paths = []
    for k, group in enumerate(partition_groups(missing, partition_by, where)):
        miss_paths.append(f"{miss_prefix}-{k:04d}.parquet")
        pq.write_table(group, miss_paths[-1], filesystem=fs)
    return staged, miss_paths, missing.num_rows, crashed

