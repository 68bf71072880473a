"""Answer every question of a Parquet table with an extractive QA model, on Ray.

    python -m jobs.answer --input questions.parquet --output answers/ [--model MODEL_DIR]

Runs on a local Ray when no cluster is running and neither RAY_ADDRESS nor --address is set;
otherwise joins the cluster (as under ``ray job submit``). Writes one output row per input row
(input columns, then answer, answer_start, answer_end, score, probability, error) as Parquet
files under --output, and ``_manifest.json`` at its root.

The driver reads top to bottom: plan (``jobs.plan``: source, sink, units, model; no Ray), connect
(``jobs.connect``: Ray started and workers awaited, once), choose (``jobs.choose``: the variant for the nodes'
CPUs), execute (``jobs.execute``: answer the pending units into staging) and commit (the sink publishes, once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, replace

from jobs.choose import PrecisionChoiceError, choose_variant
from jobs.cluster import ClusterAddressError
from jobs.config import JobConfig, add_flags, from_args
from jobs.connect import Cluster, NoWorkersError, connect, ray_lines_to_file
from jobs.execute import Execution, execute
from jobs.plan import ColumnError, JobPlan, plan
from jobs.progress import LeaseKeeper
from jobs.reuse import recorded_plan, reuse
from models.registry import ModelNotFoundError
from pipeline.answer import answered_schema
from pipeline.commit import OutputExistsError
from pipeline.extras import exits_on_missing_extra
from pipeline.fanout import QuestionsError
from pipeline.formats.parquet import FolderSink
from pipeline.lake import TableError
from pipeline.model_dir import ModelDirError
from pipeline.poison import ModelCrashLoopError
from pipeline.records import IdentityVersionError, Manifest
from pipeline.session import ModelLoadError
from pipeline.units import InputFileError

# What a user can fix from the message alone: bad paths, columns, model directories, an output in the way.
# Not KeyError or other programming slips: those keep their traceback.
USER_ERRORS = (OutputExistsError, ModelNotFoundError, ModelDirError, ModelLoadError, InputFileError, QuestionsError,
               ClusterAddressError, TableError, ModelCrashLoopError, NoWorkersError, PrecisionChoiceError,
               FileNotFoundError, ColumnError, IdentityVersionError)

def parse_args(argv: list[str] | None = None) -> JobConfig:
    """The job's config from ``qa-batch answer``'s flags; a usage error or a combination the config refuses is one
    line on stderr and exit status 2."""
    from jobs.cli import answer_parser

    p = answer_parser()
    add_flags(p)
    args: argparse.Namespace = p.parse_args(argv)
    try:
        return from_args(args)
    except ValueError as exc:
        p.refuse(str(exc))


def run(cfg: JobConfig) -> Manifest:
    """Run the job and return its manifest (a folder output also has it, written last, as _manifest.json)."""
    return run_once(cfg)[0]


def run_once(cfg: JobConfig) -> tuple[Manifest, bool]:
    """Run the job: its manifest, and whether this run committed it (False: the output already held this job's
    committed answers, and nothing was done)."""
    started = time.time()
    job = plan(cfg)
    # No input rows: the output still gets a file, empty, with the output's columns (a reader finds the schema)
    empty = answered_schema(job.read.schema, cfg.decode, job.questions, cfg.wide) if not job.rows_in else None
    try:
        with contextlib.nullcontext() if cfg.verbose or not job.needs_cluster else ray_lines_to_file():
            cluster = connect(cfg) if job.needs_cluster else Cluster.here()
            capacity = cluster.capacity
            job = choose_variant(job, cluster.nodes, capacity.bound_cpus or capacity.cpus,
                                 capacity.largest_node_cpus)
            if job.state.committed is not None:
                print(nothing_to_do(cfg.output, job.state.committed), flush=True)
                return job.state.committed, False
            # the lease: a second run refuses from here on
            stager = job.sink.begin(job.begin_mode or cfg.mode, job.identity, job.stale)
            if job.refresh is not None:
                print(job.refresh.line(cfg.output), flush=True)
                if job.refresh.pass_pending:
                    reusing = time.time()
                    with LeaseKeeper(job.sink):
                        job = reuse(job, stager)
                    job = replace(job, refresh=replace(job.refresh, reuse_s=round(time.time() - reusing, 3)))
                else:
                    job = recorded_plan(job, stager)
            done = execute(job, cluster, stager)
            if empty is not None and job.state.commit_list is None and isinstance(stager, FolderSink):
                stager.write_empty(empty)  # a table output has its schema in its metadata
            return commit(job, done, started), True
    except BaseException:
        job.sink.release_lease()  # this process may run again on the same output (a retry, a notebook)
        raise


def nothing_to_do(output: str, committed: Manifest) -> str:
    """The one line of a re-run that finds its answers committed: what is there, not figures of a run now."""
    return (f"nothing to do: output {output} already holds this job's committed answers ({committed.rows_out} rows, "
            f"{committed.errors} with errors, committed by run {committed.run or 'unknown'}: "
            f"{committed.committed_to()})")


def commit(job: JobPlan, done: Execution, started: float) -> Manifest:
    """Publish the staged answers through the sink, once; returns the manifest."""
    answered_rows = job.rows_in - job.staged_rows if done.layout else 0
    seconds = done.finished_at - done.started_at
    durations = {"total": round(time.time() - started, 3), "answer_and_write": round(seconds, 3)}
    if done.totals.first_actor_ready_at is not None:
        # Ray start-up, actor processes, imports and model load: what a short job pays before its first answer.
        durations["until_first_actor_ready"] = round(done.totals.first_actor_ready_at - done.started_at, 3)
    report = {
        "config": asdict(job.config),
        "model": job.served.identity(),
        "precision": job.served.choice.as_dict(),  # the variant served, and why (pipeline/precision.py)
        "batch_tokens": job.served.batch_tokens,
        "input_files": list(job.read.files),
        "skipped_bad_files": list(job.read.skipped_files),
        "read_units": len(job.units),
        "rows_in": job.rows_in,
        "rows_per_input_row": job.rows_per_input_row,
        "units_answered_now": len(job.pending) if done.layout else 0,
        "rows_staged_before": job.staged_rows,
        "errors_by_kind_this_run": dict(done.totals.times.errors),
        "retries": asdict(done.retries),  # rows that crashed the model process, passes, restarts (jobs/execute.py)
        "ray": {} if done.layout is None else ray_fields(done),
        "stages": done.totals.manifest_stages() if done.layout else {},
        "durations_s": durations,
        "questions_per_s": round(answered_rows / max(seconds, 1e-9), 3),
        "refresh": job.refresh.report() if job.refresh is not None else {},
    }
    manifest = job.sink.commit(list(job.units), job.identity, report, job.adopted, job.state.commit_list)
    expected = job.rows_in * job.rows_per_input_row
    if manifest.rows_out != expected:
        raise RuntimeError(f"{job.rows_in} rows in but {manifest.rows_out} rows out (expected {expected}); "
                           f"see {manifest.committed_to()}")
    print(f"done: {job.rows_in} rows in, {manifest.rows_out} rows out, {manifest.errors} with errors, "
          f"{durations['total']:.1f} s ({report['questions_per_s']:.1f} rows/s); {manifest.committed_to()}",
          flush=True)
    return manifest


def ray_fields(done: Execution) -> dict:
    """The manifest's ``ray``: the answering pool's bounds, and what each node's actors did
    (docs/concepts/scaling.md)."""
    layout = done.layout
    return {"min_actors": layout.min_actors, "initial_actors": layout.initial_actors, "max_actors": layout.actors,
            "max_actors_from": layout.max_from, "cpus_per_actor": layout.cpus_per_actor,
            "cluster_cpus": layout.cluster_cpus, "driver_node": done.driver_node,
            "actor_restarts_after_node_loss": done.restarts_after_node_loss,
            "nodes": [asdict(n) for n in done.nodes]}


SUMMARY = ("rows_in", "rows_out", "errors", "durations_s", "questions_per_s")


@exits_on_missing_extra
def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        manifest, committed_now = run_once(cfg)
    except USER_ERRORS as exc:  # the message names the file, column or setting; a traceback adds nothing
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if committed_now:  # a re-run with nothing to do said so in its one line: no figures of an earlier run
        print(json.dumps({k: getattr(manifest, k) for k in SUMMARY}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
