"""The driver's second step, and the only one that touches Ray: answer a plan's pending units into staging.

Bounded retries, and poison rows (pipeline/poison.py). Ray Data restarts a pool's actors and retries their
tasks without limit by default, so a row that crashes the model process (a native fault in a runtime) would
be retried forever. Here every limit is finite, and a crash costs only the rows that cause it:

- A pass answers pieces of read units (the first: pending units whole, shrinking towards its end so that the
  actors finish together: ``poison.first_pass``), one piece per actor task. The first pass keeps two tasks
  in flight per actor (``FIRST_PASS_TASKS_PER_ACTOR``): Ray Data hands an actor its next task on a later tick
  of its scheduling loop (it polls every 0.1 s; 0.15 s idle between an actor's pieces measured), and a queued
  second piece fills that gap (+6% marginal questions/s on the default model, BENCHMARKS.md). A crash then
  fails the queued piece too: it may be retried behind the poison piece and leave the pass with it, and is
  answered in the next pass, in halves, like any piece that did not stage. Later passes keep one task in flight
  per actor, so there a crash is charged to the one piece its actor was answering, and only a row that
  crashed the model process alone is written as crashed.
- Ray retries a piece whose actor process died on it on the restarted actor, CRASHES_PER_PASS (3) attempts
  in all (``max_task_retries=2``); a Python exception is not retried. Ray Data then drops that piece's block
  and goes on (``DataContext.max_errored_blocks = -1``), so one poison unit does not stop the others.
- After the pass the driver compares what was staged with the pass's pieces. A piece not staged crashed its
  actor 3 times: it is split in halves for the next pass, down to single rows; a single row that crashes it
  3 times is written by the driver with ``error`` "crashed the model process" and no answer. A unit of R
  rows takes at most 1 + ceil(log2 R) passes.
- Exceptions raised in actors (which Ray Data would drop with their blocks) are reported to
  the driver, which raises the first once the pass is over: they fail the job as before.
- A pass may restart actors ``poison.restart_budget(pieces)`` times: 3 for each of max(10, 10% of its pieces)
  poison pieces. A restarted actor past the budget loads no model and fails its calls with
  ModelCrashLoopError, which ends the job in seconds (a broken model, not poison rows). Ray's
  ``max_restarts`` is that budget + 1, so no actor runs out of restarts first (a fixed pool never replaces an
  actor gone for good, and a pass without actors waits 30 minutes for Ray Data's no-progress timeout).
- An actor that dies while starting (not restarting) fails the job at once
  (``DataContext.max_consecutive_actor_init_deaths`` = 0, Ray Data's default).

Nodes that come and go (``pool_layout``, ``wait_for_workers``). The answering actors are an autoscaling pool
(Ray Data's ``ActorPoolStrategy(min_size, max_size, initial_size)``): it starts with an actor per free CPU, grows
onto nodes that join mid-run and shrinks when units run out. Its maximum is ``--max-actors``, else the cluster's
autoscaling bound (the sum over worker groups of maxReplicas x CPUs, from the cluster config Ray's autoscaler keeps
in the GCS, which Ray Data reads for the same purpose) in actors, else (a cluster with no autoscaler) the pass's
pieces: more actors than pieces would have nothing to do, and Ray Data adds an actor only when a CPU is free. Ray Data adds actors only while the pool's utilization (tasks
in flight per actor slot) is at least its upscaling threshold, 1.75 by default: with one task in flight per actor
(later passes, above) utilization never passes 1.0, so the threshold is set to 1.0 here (``UPSCALING_THRESHOLD``),
or the pool would never grow; in the first pass, two in flight, the pool grows once every actor has a piece.
Nor does it shrink on utilization (``DOWNSCALING_THRESHOLD``): Ray Data's default drops an actor
whenever half the pool is idle, which a pool of two is for a moment each time an actor starts (before its first
task), and the actor it then starts again loads the model again (seen on 2 worker nodes: one actor answered
everything while the other node's actors were dropped and restarted); the pool shrinks once the pass has no
units left (Ray Data's "consumed all inputs"). ``--concurrency N`` keeps a fixed pool of N. A job that finds
fewer CPUs than ``--min-actors`` actors need waits for them (asking an autoscaler for them), printing a line
saying so, and fails with NoWorkersError after ``--wait-for-workers`` seconds.

A lost worker node costs the pieces in flight there: Ray restarts its actors on the nodes left (a restart
because the actor's node died is not charged to the pass's restart budget) and retries their tasks; a piece
whose output went with the node is answered again. Nothing job-wide lives on a worker node: the bookkeeping
actor (StageStats) is pinned to the driver's node, reports to it are sent without waiting, and the pass's input
rows and the fan-out questions are put into the object store by the driver, on its node.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from jobs.plan import JobPlan
from pipeline import faults, poison
from pipeline.answer import StageTotals
from pipeline.poison import CRASHES_PER_PASS, Piece

LARGE_MODEL_BYTES = 256 * 2**20
REPORT_GRACE_S = 10.0  # how long the last actor reports may take to arrive after the last write
UPSCALING_THRESHOLD = 1.0  # Ray Data's default (1.75) is out of reach with one task in flight per actor
FIRST_PASS_TASKS_PER_ACTOR = 2  # later passes: 1 (module docstring)
DOWNSCALING_THRESHOLD = -1.0  # never on utilization (Ray Data's default: at 0.5); see the module docstring
WAIT_POLL_S = 1.0
POOL_ACTOR_CLASS = "MapWorker"  # Ray Data's actor class for a pool's actors (the GCS table's class name)


class NoWorkersError(RuntimeError):
    """No worker CPUs for --min-actors actors arrived within --wait-for-workers."""


@dataclass(frozen=True)
class Capacity:
    """The cluster's CPUs as the driver sees them: what is alive now, and what an autoscaler may add."""

    cpus: int  # CPUs of the alive nodes now (the head's 0 included)
    largest_node_cpus: int
    nodes: int  # alive nodes, the head included
    bound_cpus: int | None = None  # the autoscaler's bound on the cluster's CPUs; None: no autoscaler (or none told)


@dataclass(frozen=True)
class ActorLayout:
    """The answering pool: between ``min_actors`` and ``actors`` (its maximum), starting at ``initial_actors``."""

    actors: int  # the most actors at once
    cpus_per_actor: int
    cluster_cpus: int  # when the job started answering
    min_actors: int = 1
    initial_actors: int = 1
    max_from: str = "--concurrency"  # what set the maximum: --concurrency, --max-actors, autoscaling bound, pieces


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


def actor_layout(cluster_cpus: int, concurrency: int | None, cpus_per_actor: int | None,
                 model_bytes: int) -> tuple[int, int]:
    """(actors, CPUs per actor) for what the user left unset.

    One single-threaded actor per CPU by default: ONNX Runtime's threads meet at every op, and an op
    waits for the slowest, so two threads on two cores lose to two actors whenever anything else runs
    (BENCHMARKS.md: 2 x 1 CPU was 10% faster than 1 x 2 on 2000 SQuAD questions, the same answers).
    Graphs of 256 MB and more (BERT-large fp32) get 4 CPUs per actor instead: every actor holds its own
    copy, and their big matmuls keep four threads busy.
    """
    if cpus_per_actor is None:
        if concurrency is not None:
            cpus_per_actor = max(1, cluster_cpus // concurrency)
        else:
            cpus_per_actor = min(cluster_cpus, 4) if model_bytes >= LARGE_MODEL_BYTES else 1
    if concurrency is None:
        concurrency = max(1, cluster_cpus // cpus_per_actor)
    return concurrency, cpus_per_actor


def pool_layout(capacity: Capacity, min_actors: int, max_actors: int | None, concurrency: int | None,
                cpus_per_actor: int | None, model_bytes: int, pieces: int) -> ActorLayout:
    """The answering pool for a cluster of ``capacity`` and a first pass of ``pieces`` pieces (module docstring:
    where its maximum comes from). Default CPUs per actor as ``actor_layout``, never more than the largest node
    has (an actor runs on one node)."""
    initial, threads = actor_layout(capacity.cpus, concurrency, cpus_per_actor, model_bytes)
    if concurrency is not None:
        return ActorLayout(concurrency, threads, capacity.cpus, concurrency, concurrency, "--concurrency")
    if cpus_per_actor is None:
        threads = max(1, min(threads, capacity.largest_node_cpus))
    if max_actors is not None:
        most, source = max_actors, "--max-actors"
    elif capacity.bound_cpus is not None:
        most, source = max(min_actors, capacity.bound_cpus // threads), "autoscaling bound"
    else:
        most, source = max(min_actors, pieces), "pieces"
    initial = min(max(min_actors, capacity.cpus // threads), most)
    return ActorLayout(most, threads, capacity.cpus, min_actors, initial, source)


def pool_strategy(layout: ActorLayout, pieces: int, tasks_per_actor: int):
    """Ray Data's compute strategy for a pass of ``pieces`` pieces, ``tasks_per_actor`` in flight on each
    actor: fixed, or autoscaling (no bound above the pieces: an actor without a piece idles)."""
    import ray

    low, start, high = (min(n, pieces) for n in (layout.min_actors, layout.initial_actors, layout.actors))
    if low == high:
        return ray.data.ActorPoolStrategy(size=high, max_tasks_in_flight_per_actor=tasks_per_actor)
    return ray.data.ActorPoolStrategy(min_size=low, max_size=high, initial_size=start,
                                      max_tasks_in_flight_per_actor=tasks_per_actor)


def cluster_capacity() -> Capacity:
    """Alive nodes' CPUs now (one GCS call), and the autoscaler's bound."""
    import ray

    cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]]
    return Capacity(sum(cpus), max(cpus, default=0), len(cpus), autoscaling_bound_cpus())


def autoscaling_bound_cpus() -> int | None:
    """The most CPUs the cluster's autoscaler may give it (the sum over worker groups of their most nodes x CPUs:
    KubeRay's maxReplicas); None without an autoscaler, or when the bound is unlimited.

    Read with the call Ray Data and Ray Train use for the same purpose (``ray._private.state``): Ray has no
    public API for it in 2.60; a failure only means no bound."""
    import ray._private.state

    try:
        bound = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: without it the pool's maximum comes from the pieces
        return None
    cpus = (bound or {}).get("CPU") or 0
    return int(cpus) if 0 < cpus < sys.maxsize else None


def wait_for_workers(needed_cpus: int, timeout_s: float, every_s: float) -> Capacity:
    """The cluster's capacity once its alive nodes have ``needed_cpus`` CPUs; until then a line every
    ``every_s`` seconds saying the job waits, and NoWorkersError after ``timeout_s``.

    A cluster with an autoscaler is asked for the CPUs (``request_resources``; Ray Data asks for the rest once
    the pool runs); the request is withdrawn when they are there."""
    from ray.autoscaler.sdk import request_resources

    started = time.monotonic()
    capacity = cluster_capacity()
    if capacity.cpus >= needed_cpus:
        return capacity
    request_resources(bundles=[{"CPU": 1}] * needed_cpus)
    last_line = -math.inf
    try:
        while capacity.cpus < needed_cpus:
            waited = time.monotonic() - started
            if waited >= timeout_s:
                raise NoWorkersError(
                    f"no worker CPUs after --wait-for-workers {timeout_s:g} s: the job needs {needed_cpus} CPU(s) "
                    f"(--min-actors x CPUs per actor) and the cluster has {capacity.cpus} on {capacity.nodes} alive "
                    f"node(s) (resources: {_resources()}); start worker nodes, or raise the autoscaler's "
                    f"minReplicas/maxReplicas")
            if waited - last_line >= every_s:
                print(f"waiting for workers: {capacity.cpus}/{needed_cpus} CPUs on {capacity.nodes} node(s), "
                      f"{waited:.0f} s of --wait-for-workers {timeout_s:g} s", flush=True)
                last_line = waited
            time.sleep(min(WAIT_POLL_S, max(0.0, timeout_s - waited)))
            capacity = cluster_capacity()
    finally:
        request_resources(bundles=[])
    print(f"workers: {capacity.cpus} CPUs on {capacity.nodes} node(s) after {time.monotonic() - started:.0f} s",
          flush=True)
    return capacity


def _resources() -> dict:
    import ray

    return {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}


def execute(plan: JobPlan) -> Execution:
    """Stage every pending unit's answers (``plan.output`` commits them afterwards)."""
    started = time.time()
    cfg = plan.config
    plan.output.begin(cfg.mode, plan.identity, plan.stale)  # the lease: a second run on this output refuses
    if not plan.pending:
        return Execution(started_at=started, finished_at=started)
    with LeaseKeeper(plan.output), contextlib.nullcontext() if cfg.verbose else ray_lines_to_file():
        return _answer(plan, started)


def _answer(plan: JobPlan, started: float) -> Execution:
    import ray

    from jobs.ray_stage import ActorSettings, alive_nodes, stage_stats

    cfg = plan.config
    start_ray(cfg.address, cfg.verbose)
    capacity = wait_for_workers(cfg.min_actors * (cfg.cpus_per_actor or 1), cfg.wait_for_workers_s,
                                cfg.progress_every_s)
    data_context()
    actors_now, _ = actor_layout(capacity.cpus, cfg.concurrency, cfg.cpus_per_actor, plan.model_bytes)
    pieces = poison.first_pass(plan.pending, actors_now)
    layout = pool_layout(capacity, cfg.min_actors, cfg.max_actors, cfg.concurrency, cfg.cpus_per_actor,
                         plan.model_bytes, len(pieces))
    variant = plan.precision.variant
    settings = ActorSettings(plan.model_dir, layout.cpus_per_actor, plan.columns, cfg.decode, cfg.windows,
                             cfg.tokens_per_call(variant.backend), variant.backend, variant.precision, cfg.wide)
    stats = stage_stats()
    answering_from = time.time()
    rows = plan.rows_in - plan.staged_rows
    crashed, passes, retried = [], 0, 0
    with ProgressReporter(stats, rows, cfg.progress_every_s):
        while pieces:
            passes += 1
            failed = _answer_pass(plan, settings, stats, pieces, layout,
                                  FIRST_PASS_TASKS_PER_ACTOR if passes == 1 else 1)
            if failed:
                split = sum(p.length > 1 for p in failed)
                print(f"retry: {len(failed)} of {len(pieces)} pieces of read units crashed the model process "
                      f"{CRASHES_PER_PASS} times each: {split} to answer again in halves, {len(failed) - split} "
                      f"single rows to write with error {poison.CRASHED!r}", flush=True)
            pieces, alone = poison.after_crashes(failed)
            crashed += alone
            retried += len(pieces)
    ids = [_write_crashed(plan, p) for p in crashed]
    totals = _final_totals(stats, rows - len(crashed))
    retries = Retries(tuple(ids), passes, retried, ray.get(stats.restart_count.remote()))
    nodes = ray.get(stats.nodes.remote(alive_nodes(), answering_from))
    return Execution(layout, totals, started, time.time(), retries, tuple(nodes),
                     ray.get_runtime_context().get_node_id(), ray.get(stats.node_losses_count.remote()))


def data_context() -> None:
    """Ray Data's settings for the job's passes (module docstring)."""
    import dataclasses

    import ray

    ctx = ray.data.DataContext.get_current()
    # No preserve_order: output files are named by read unit, so completion order changes nothing.
    ctx.enable_progress_bars = False  # headless nightly logs: no per-batch bars
    ctx.max_errored_blocks = -1  # a piece that crashed its actor 3 times leaves the pass, not the job (above)
    ctx.autoscaling_config = dataclasses.replace(ctx.autoscaling_config,
                                                 actor_pool_util_upscaling_threshold=UPSCALING_THRESHOLD,
                                                 actor_pool_util_downscaling_threshold=DOWNSCALING_THRESHOLD)


def _answer_pass(plan: JobPlan, settings, stats, pieces: list[Piece], layout: ActorLayout,
                 tasks_per_actor: int) -> list[Piece]:
    """Answer ``pieces`` into staging; the pieces that crashed their actor CRASHES_PER_PASS times (not staged).
    Raises the first exception an actor reported."""
    import ray

    from jobs.ray_stage import AnswerActor
    from pipeline.commit import part_name

    budget = poison.restart_budget(len(pieces))
    ray.get(stats.begin_pass.remote(budget))
    ds = ray.data.from_items([p.as_row(plan.rows_per_input_row) for p in pieces], override_num_blocks=len(pieces))
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for an actor pool's restarts and retries (unset, both are -1:
        # unlimited), only the ray_remote_args it calls deprecated; check again before Ray 2.64 removes them.
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            AnswerActor,
            fn_constructor_kwargs={"fs": plan.input_fs, "settings": settings, "questions": plan.questions,
                                   "stats": stats, "output": plan.output},
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
        plan.output.fs.delete_file(f"{plan.output.staging}/{part_name(plan.output.run, unit, first)}")
    return failed


def _write_crashed(plan: JobPlan, piece: Piece) -> str | int | float:
    """Stage the output of one input row that crashed the model process, read here on the driver; its id."""
    import pyarrow as pa

    from pipeline.commit import ROW_COLUMN, UNIT_COLUMN
    from pipeline.units import UnitReader

    documents = UnitReader(plan.input_fs).read(piece.read_unit)
    rows = poison.crashed_rows(documents, plan.questions, plan.config.wide, plan.config.decode.top_k)
    first = piece.first_row(plan.rows_per_input_row)
    rows = rows.append_column(UNIT_COLUMN, pa.array([piece.unit.index] * rows.num_rows, pa.int64()))
    rows = rows.append_column(ROW_COLUMN, pa.array(range(first, first + rows.num_rows), pa.int64()))
    plan.output.write_block(rows)
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


def cluster_nodes(cfg) -> list:
    """The CPU of every alive node with CPUs (``pipeline.precision.NodeCpu``), read on the node itself: what
    ``--precision auto`` chooses for. Starts (or joins) Ray. A driver-only head (0 CPUs) runs no actor and
    does not count."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.precision import NodeCpu

    with contextlib.nullcontext() if cfg.verbose else ray_lines_to_file():
        start_ray(cfg.address, cfg.verbose)
        # An autoscaling cluster may start with no worker CPUs: choose for the nodes that will answer.
        wait_for_workers(cfg.min_actors * (cfg.cpus_per_actor or 1), cfg.wait_for_workers_s, cfg.progress_every_s)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        if nodes == [ray.get_runtime_context().get_node_id()]:  # one machine, the driver's: read it here
            return [NodeCpu.from_flags(nodes[0], _cpu_flags())]
        probe = ray.remote(num_cpus=0)(_cpu_flags)
        flags = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
                         for node in nodes])
    return [NodeCpu.from_flags(node, f) for node, f in zip(nodes, flags, strict=True)]


def _cpu_flags() -> list[str]:
    from pipeline.cpu import local_flags

    return sorted(local_flags())


def start_ray(address: str | None, verbose: bool) -> None:
    """Join the cluster (``address``, RAY_ADDRESS or a running one) or start a local Ray.

    Quiet unless ``verbose``: a job's output shows our progress and summary lines, not Ray's start-up
    notices, Ray Data's execution plan or warnings meant for Ray's developers.
    """
    import ray

    from jobs.cluster import bootstrap_address

    if ray.is_initialized():
        return
    if not verbose:
        quiet_ray()
    address, note = bootstrap_address(address)
    if note:
        print(note, flush=True)
    hooks = faults.forwarded_env()  # tests only: a cluster's workers do not inherit the driver's environment
    # The job's own local Ray lives as long as the job, without the dashboard: it costs 1.5-2 s of a 6-8 s start
    # on 2 cores and CPU all the while. To watch a job in the dashboard, run it on a `ray start --head` node.
    local = {"include_dashboard": False} if address == "local" else {}
    ray.init(address=address, logging_level=logging.INFO if verbose else logging.ERROR,
             log_to_driver=verbose, configure_logging=True, **local,
             **({"runtime_env": {"env_vars": hooks}} if hooks else {}))
    if not verbose:
        quiet_ray()  # ray.init configures its loggers again


@contextlib.contextmanager
def ray_lines_to_file():
    """The driver's stderr (file descriptor 2) into a log file while Ray runs, unless --verbose.

    Ray's core worker logs from C++ straight to the process's stderr, below any Python logger: for example
    "constructor arguments in the object store" for every Ray Data actor pool (ray#57733, about restarts our
    pool does not depend on). Our own progress and summary lines go to stdout; an exception still reaches
    the terminal, after stderr is restored, with the log file named.
    """
    path = Path(tempfile.gettempdir()) / f"qa-batch-{os.getpid()}-ray.log"
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    except BaseException:
        _restore_stderr(saved)
        print(f"Ray's own log lines of this run: {path} (or run with --verbose)", file=sys.stderr)
        raise
    _restore_stderr(saved)
    path.unlink(missing_ok=True)  # nothing went wrong: nothing to read


def _restore_stderr(saved: int) -> None:
    if saved < 0:
        return
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def quiet_ray() -> None:
    """Ray's and Ray Data's loggers to errors only, their Python warnings off."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    for name in ("ray", "ray.data", "ray._private", "ray.util"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"ray(\..*)?")
    warnings.filterwarnings("ignore", category=UserWarning, message=r".*(actor|ActorPool|concurrency).*")


class Ticker:
    """Calls ``tick()`` every ``every`` seconds on a daemon thread while the context is open."""

    def __init__(self, every_s: float, name: str):
        self.every = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=name)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.tick()

    def tick(self) -> None:
        raise NotImplementedError


class LeaseKeeper(Ticker):
    """Renews the run's lease on the output every LEASE_RENEW_S while the job answers."""

    def __init__(self, output):
        from pipeline.commit import LEASE_RENEW_S

        super().__init__(LEASE_RENEW_S, "qa-lease")
        self.output = output

    def tick(self) -> None:
        try:
            self.output.renew_lease()
        except OSError:  # a missed renewal only shortens the lease; the next tick retries
            pass


class ProgressReporter(Ticker):
    """A line every few seconds for headless logs (`ray job logs`): rows done/total, rate, ETA."""

    def __init__(self, stats, total_rows: int, every_s: float):
        super().__init__(every_s, "qa-progress")
        self.stats, self.total = stats, total_rows
        self._t0 = time.time()

    def tick(self) -> None:
        import ray

        try:
            totals = ray.get(self.stats.totals.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - progress must never fail the job; the next tick retries
            return
        done = totals.input_rows
        elapsed = time.time() - self._t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        alive = answering_actors()
        actors = f"{totals.actors} actors started" if alive is None else \
            f"{alive[0]} actors on {alive[1]} nodes ({totals.actors} started)"
        print(f"progress: {done}/{self.total} rows ({100 * done / max(self.total, 1):.1f}%), "
              f"{rate:.1f} rows/s, ETA {_clock(eta)}, {actors}", flush=True)


def answering_actors() -> tuple[int, int] | None:
    """(answering actors alive now, the nodes they are on), from the GCS actor table (one call, this job's
    alive actors only); None if it cannot be read. ``ray._private.state``: Ray's public state API needs the
    dashboard, which a cluster may run without."""
    import ray
    import ray._private.state

    try:
        table = ray._private.state.actors(job_id=ray.JobID.from_hex(ray.get_runtime_context().get_job_id()),
                                          actor_state_name="ALIVE")
    except Exception:  # noqa: BLE001 - progress must never fail the job
        return None
    nodes = [a["Address"]["NodeID"] for a in table.values() if POOL_ACTOR_CLASS in a["ActorClassName"]]
    return len(nodes), len(set(nodes))


def _clock(seconds: float) -> str:
    if math.isnan(seconds):  # no rate yet
        return "unknown"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
