"""Answer every question of a Parquet table with an extractive QA model, on Ray.

    python -m jobs.answer --input questions.parquet --output answers/ [--model MODEL_DIR]

Runs on a local Ray when no cluster is running and neither RAY_ADDRESS nor --address is set;
otherwise joins the cluster (as under ``ray job submit``). Writes one output row per input row
(input columns, then answer, answer_start, answer_end, score, probability, error) as Parquet
files under --output, and ``_manifest.json`` at its root.

The driver is three steps: ``jobs.plan.plan`` (what to do; no Ray), ``jobs.execute.execute`` (answer the
pending units into staging; the only step that touches Ray) and ``commit`` (publish, and write the manifest
once).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from jobs.cluster import ClusterAddressError
from jobs.config import JobConfig, add_flags, from_args
from jobs.execute import Execution, NoWorkersError, cluster_nodes, execute
from jobs.plan import JobPlan, PrecisionChoiceError, plan, settle_precision
from models.registry import ModelNotFoundError
from pipeline.commit import OutputExistsError
from pipeline.extras import exits_on_missing_extra
from pipeline.fanout import QuestionsError
from pipeline.lake import TableError
from pipeline.model_dir import ModelDirError
from pipeline.poison import ModelCrashLoopError
from pipeline.precision import NodeCpu
from pipeline.session import ModelLoadError
from pipeline.units import InputFileError

# What a user can fix from the message alone: bad paths, columns, model directories, an output in the way.
USER_ERRORS = (OutputExistsError, ModelNotFoundError, ModelDirError, ModelLoadError, InputFileError, QuestionsError,
               ClusterAddressError, TableError, ModelCrashLoopError, NoWorkersError, PrecisionChoiceError,
               FileNotFoundError, KeyError)

def parse_args(argv: list[str] | None = None) -> JobConfig:
    p = argparse.ArgumentParser(prog="qa-batch answer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p)
    try:
        return from_args(p.parse_args(argv))
    except ValueError as exc:
        p.error(str(exc))


def run(cfg: JobConfig) -> dict:
    """Run the job and return its manifest (also written, last, to OUTPUT/_manifest.json)."""
    started = time.time()
    job = plan(cfg)
    if job.chooses_on_cluster:  # --precision auto: one variant for the CPUs of every node (nothing to answer: here)
        job = settle_precision(job, cluster_nodes(cfg) if job.pending else [NodeCpu.here()])
    if job.state.committed is not None:
        print(f"output {cfg.output} already holds this job's committed answers; nothing to do", flush=True)
        return job.state.committed
    try:
        done = execute(job)
        return commit(job, done, started)
    except BaseException:
        job.output.release_lease()  # this process may run again on the same output (a retry, a notebook)
        raise


def commit(job: JobPlan, done: Execution, started: float) -> dict:
    """Publish the staged answers and write the manifest, once; returns it."""
    answered_rows = job.rows_in - job.staged_rows if done.layout else 0
    seconds = done.finished_at - done.started_at
    durations = {"total": round(time.time() - started, 3), "answer_and_write": round(seconds, 3)}
    if done.totals.first_actor_ready_at is not None:
        # Ray start-up, actor processes, imports and model load: what a short job pays before its first answer.
        durations["until_first_actor_ready"] = round(done.totals.first_actor_ready_at - done.started_at, 3)
    fields = {
        "config": asdict(job.config),
        "model": job.spec.identity(),
        "precision": job.precision.as_dict(),  # the variant served, and why (pipeline/precision.py)
        "batch_tokens": job.config.tokens_per_call(job.precision.variant.backend),  # as served (config's may be None)
        "input_files": list(job.input_files),
        "skipped_bad_files": list(job.skipped_files),
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
    }
    if job.state.commit_list is not None:  # the last run died while publishing: finish its moves
        manifest = job.output.finish_interrupted_commit(job.state.commit_list, job.identity, fields)
    else:
        manifest = job.output.commit(list(job.units), job.identity, fields, job.adopted)
    expected = job.rows_in * job.rows_per_input_row
    if manifest["rows_out"] != expected:
        raise RuntimeError(f"{job.rows_in} rows in but {manifest['rows_out']} rows out (expected {expected}); "
                           f"see {job.output.root}/_manifest.json")
    committed_to = (f"snapshot {manifest['snapshot_id']} of {manifest['table']}" if "snapshot_id" in manifest
                    else f"manifest {job.output.root}/_manifest.json")
    print(f"done: {job.rows_in} rows in, {manifest['rows_out']} rows out, {manifest['errors']} with errors, "
          f"{durations['total']:.1f} s ({fields['questions_per_s']:.1f} rows/s); {committed_to}", flush=True)
    return manifest


def ray_fields(done: Execution) -> dict:
    """The manifest's ``ray``: the answering pool's bounds, and what each node's actors did (README: On a
    cluster)."""
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
        manifest = run(cfg)
    except USER_ERRORS as exc:  # the message names the file, column or setting; a traceback adds nothing
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: manifest.get(k) for k in SUMMARY}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
