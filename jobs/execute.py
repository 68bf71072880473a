"""The driver's fourth step: answer a plan's pending units into staging, in passes of Ray Data actor tasks.

Bounded retries, and poison rows (pipeline/poison.py). Ray Data restarts a pool's actors and retries their
tasks without limit by default, so a row that crashes the model process (a native fault in a runtime) would
be retried forever. Here every limit is finite, and a crash costs only the rows that cause it:

- A pass answers pieces of read units (the first: pending units whole, shrinking towards its end so that the
  actors finish together: ``poison.first_pass``), one piece per actor task. The first pass keeps two tasks
  in flight per actor (``FIRST_PASS_TASKS_PER_ACTOR``): Ray Data hands an actor its next task on a later tick
  of its scheduling loop, and a queued second piece fills that gap (docs/log/: tasks in flight). A crash
  then fails the queued piece too: it may be retried behind the poison piece and leave the pass with it, and is
  answered in the next pass, in halves, like any piece that did not stage. Later passes keep one task in flight
  per actor, so there a crash is charged to the one piece its actor was answering, and only a row that
  crashed the model process alone is written as crashed.
- Ray retries a piece whose actor process died on it on the restarted actor, CRASHES_PER_PASS attempts
  in all (``max_task_retries``); a Python exception is not retried. Ray Data then drops that piece's block
  and goes on (``DataContext.max_errored_blocks = -1``), so one poison unit does not stop the others.
- After the pass the driver compares what was staged with the pass's pieces. A piece not staged crashed its
  actor CRASHES_PER_PASS times: it is split in halves for the next pass, down to single rows; a single row that
  crashes it that often is written by the driver with ``error`` "crashed the model process" and no answer. A unit
  of R rows takes at most 1 + ceil(log2 R) passes.
- Exceptions raised in actors (which Ray Data would drop with their blocks) are reported to
  the driver, which raises the first once the pass is over: they fail the job as before.
- A pass may restart actors ``poison.restart_budget(pieces)`` times. A restarted actor past the budget loads no
  model and fails its calls with ModelCrashLoopError, which ends the job in seconds (a broken model, not poison
  rows). Ray's ``max_restarts`` is that budget + 1, so no actor runs out of restarts first (a fixed pool never
  replaces an actor gone for good, and a pass without actors waits for Ray Data's no-progress timeout).
- An actor that dies while starting (not restarting) fails the job at once
  (``DataContext.max_consecutive_actor_init_deaths`` = 0, Ray Data's default).

A lost worker node costs the pieces in flight there: Ray restarts its actors on the nodes left (a restart
because the actor's node died is not charged to the pass's restart budget) and retries their tasks; a piece
whose output went with the node is answered again. Nothing job-wide lives on a worker node: the bookkeeping
actor (StageStats) is pinned to the driver's node, reports to it are sent without waiting, and the pass's input
rows and the fan-out questions are put into the object store by the driver, on its node.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

from jobs.connect import Cluster
from jobs.plan import JobPlan
from jobs.pool import ActorLayout, actor_layout, data_context, pool_layout, pool_strategy
from jobs.progress import LeaseKeeper, ProgressReporter
from pipeline import poison
from pipeline.answer import StageTotals
from pipeline.poison import CRASHES_PER_PASS, Piece

REPORT_GRACE_S = 10.0  # how long the last actor reports may take to arrive after the last write
FIRST_PASS_TASKS_PER_ACTOR = 2  # later passes: 1 (module docstring)


@dataclass(frozen=True)
class Retries:
    """What crashes of the model process cost this run (the manifest's ``retries``)."""

    crashed_rows: tuple = ()  # ids of the rows written with error "crashed the model process"
    passes: int = 0  # passes over pieces of units; 1 when no piece crashed its actor 3 times
    pieces_retried: int = 0  # pieces answered again, halves of pieces that crashed their actor 3 times
    actor_restarts: int = 0  # actor processes restarted after a crash, in all passes
    attempts_per_piece: int = CRASHES_PER_PASS


@dataclass(frozen=True)
class Execution:
    """What ``execute`` did: the layout it chose, the actors' totals, and when."""

    layout: ActorLayout | None = None  # None: nothing was pending
    totals: StageTotals = field(default_factory=StageTotals)
    started_at: float = 0.0
    finished_at: float = 0.0
    retries: Retries = field(default_factory=Retries)
    nodes: tuple = ()  # jobs.ray_stage.NodeReport per node that ran an answering actor
    driver_node: str = ""
    restarts_after_node_loss: int = 0  # actor restarts because the actor's node died (not charged as crashes)


def execute(job: JobPlan, cluster: Cluster, stager) -> Execution:
    """Stage every pending unit's answers through ``stager``, the sink's (``job.sink`` commits them afterwards)."""
    started = time.time()
    if not job.pending:
        return Execution(started_at=started, finished_at=started)
    with LeaseKeeper(job.sink):
        return _answer(job, cluster, stager, started)


def _answer(job: JobPlan, cluster: Cluster, stager, started: float) -> Execution:
    import ray

    from jobs.ray_stage import ActorSettings, alive_nodes, stage_stats

    cfg = job.config
    data_context()
    model_bytes = job.served.graph_bytes
    actors_now, _ = actor_layout(cluster.capacity.cpus, cfg.concurrency, cfg.cpus_per_actor, model_bytes)
    pieces = poison.first_pass(job.pending, actors_now)
    layout = pool_layout(cluster.capacity, cfg.min_actors, cfg.max_actors, cfg.concurrency, cfg.cpus_per_actor,
                         model_bytes, len(pieces))
    settings = ActorSettings(job.served, layout.cpus_per_actor, job.columns, cfg.decode, cfg.wide)
    stats = stage_stats()
    answering_from = time.time()
    rows = job.rows_in - job.staged_rows
    crashed, passes, retried = [], 0, 0
    with ProgressReporter(stats, rows, cfg.progress_every_s):
        while pieces:
            passes += 1
            failed = _answer_pass(job, settings, stats, stager, pieces, layout,
                                  FIRST_PASS_TASKS_PER_ACTOR if passes == 1 else 1)
            if failed:
                split = sum(p.length > 1 for p in failed)
                print(f"retry: {len(failed)} of {len(pieces)} pieces of read units crashed the model process "
                      f"{CRASHES_PER_PASS} times each: {split} to answer again in halves, {len(failed) - split} "
                      f"single rows to write with error {poison.CRASHED!r}", flush=True)
            pieces, alone = poison.after_crashes(failed)
            crashed += alone
            retried += len(pieces)
    ids = [_write_crashed(job, stager, p) for p in crashed]
    totals = _final_totals(stats, rows - len(crashed))
    retries = Retries(tuple(ids), passes, retried, ray.get(stats.restart_count.remote()))
    nodes = ray.get(stats.nodes.remote(alive_nodes(), answering_from))
    return Execution(layout, totals, started, time.time(), retries, tuple(nodes),
                     ray.get_runtime_context().get_node_id(), ray.get(stats.node_losses_count.remote()))


def _answer_pass(plan: JobPlan, settings, stats, stager, pieces: list[Piece], layout: ActorLayout,
                 tasks_per_actor: int) -> list[Piece]:
    """Answer ``pieces`` into staging; the pieces that crashed their actor CRASHES_PER_PASS times (not staged).
    Raises the first exception an actor reported."""
    import ray

    from jobs.ray_stage import AnswerActor

    budget = poison.restart_budget(len(pieces))
    ray.get(stats.begin_pass.remote(budget))
    ds = ray.data.from_items([p.as_row(plan.rows_per_input_row) for p in pieces], override_num_blocks=len(pieces))
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for an actor pool's restarts and retries (unset, both are -1:
        # unlimited), only the ray_remote_args it calls deprecated; check again before Ray 2.64 removes them.
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            AnswerActor,
            fn_constructor_kwargs={"fs": plan.read.fs, "settings": settings, "questions": plan.questions,
                                   "stats": stats, "output": stager},
            batch_format="pyarrow", batch_size=1, num_cpus=settings.threads,
            compute=pool_strategy(layout, len(pieces), tasks_per_actor),
            max_restarts=budget + 1, max_task_retries=CRASHES_PER_PASS - 1,
        )
    # The actors stage their answers themselves (jobs/ray_stage.py says why); what comes back is one small
    # row per staged file.
    staged = [(r["unit"], r["first_row"], r["rows"]) for r in ds.iter_rows()]
    failure = ray.get(stats.first_failure.remote())
    if failure is not None:
        raise failure[1]
    failed, leftovers = poison.unstaged(pieces, staged, plan.rows_per_input_row)
    for unit, first, _ in leftovers:
        stager.discard(unit, first)
    return failed


def _write_crashed(plan: JobPlan, stager, piece: Piece) -> str | int | float:
    """Stage the output of one input row that crashed the model process, read here on the driver; its id."""
    import pyarrow as pa

    from pipeline.commit import ROW_COLUMN, UNIT_COLUMN
    from pipeline.units import UnitReader

    documents = UnitReader(plan.read.fs).read(piece.read_unit)
    rows = poison.crashed_rows(documents, plan.questions, plan.config.wide, plan.config.decode.top_k)
    first = piece.first_row(plan.rows_per_input_row)
    rows = rows.append_column(UNIT_COLUMN, pa.array([piece.unit.index] * rows.num_rows, pa.int64()))
    rows = rows.append_column(ROW_COLUMN, pa.array(range(first, first + rows.num_rows), pa.int64()))
    stager.write_block(rows)
    row_id = documents.column(plan.config.columns.id)[0].as_py()
    return row_id if isinstance(row_id, (str, int, float)) else str(row_id)  # the manifest is JSON


def _final_totals(stats, rows: int) -> StageTotals:
    """The actors' totals once their last reports (sent without waiting) have arrived, or after a grace period."""
    import ray

    deadline = time.monotonic() + REPORT_GRACE_S
    while True:
        totals = ray.get(stats.totals.remote())
        if totals.input_rows >= rows or time.monotonic() > deadline:
            return totals
        time.sleep(0.05)
