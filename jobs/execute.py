"""The driver's second step, and the only one that touches Ray: answer a plan's pending units into staging.

Bounded retries, and poison rows (pipeline/poison.py). Ray Data restarts a pool's actors and retries their
tasks without limit by default, so a row that crashes the model process (a native fault in a runtime) would
be retried forever. Here every limit is finite, and a crash costs only the rows that cause it:

- A pass answers pieces of read units (the first: every pending unit whole), one piece per actor task and one
  task in flight per actor, so a crash is charged to the one piece its actor was answering (the actor reads
  its own Parquet rows, so a second task in flight would prefetch nothing).
- Ray retries a piece whose actor process died on it on the restarted actor, CRASHES_PER_PASS (3) attempts
  in all (``max_task_retries=2``); a Python exception is not retried. Ray Data then drops that piece's block
  and goes on (``DataContext.max_errored_blocks = -1``), so one poison unit does not stop the others.
- After the pass the driver compares what was staged with the pass's pieces. A piece not staged crashed its
  actor 3 times: it is split in halves for the next pass, down to single rows; a single row that crashes it
  3 times is written by the driver with ``error`` "crashed the model process" and no answer. A unit of R
  rows takes at most 1 + ceil(log2 R) passes.
- Exceptions raised in actors or write tasks (which Ray Data would drop with their blocks) are reported to
  the driver, which raises the first once the pass is over: they fail the job as before.
- A pass may restart actors ``poison.restart_budget(pieces)`` times: 3 for each of max(10, 10% of its pieces)
  poison pieces. A restarted actor past the budget loads no model and fails its calls with
  ModelCrashLoopError, which ends the job in seconds (a broken model, not poison rows). Ray's
  ``max_restarts`` is that budget + 1, so no actor runs out of restarts first (a fixed pool never replaces an
  actor gone for good, and a pass without actors waits 30 minutes for Ray Data's no-progress timeout).
- An actor that dies while starting (not restarting) fails the job at once
  (``DataContext.max_consecutive_actor_init_deaths`` = 0, Ray Data's default).
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
from pipeline import poison
from pipeline.answer import StageTotals
from pipeline.poison import CRASHES_PER_PASS, Piece

LARGE_MODEL_BYTES = 256 * 2**20
REPORT_GRACE_S = 10.0  # how long the last actor reports may take to arrive after the last write


@dataclass(frozen=True)
class ActorLayout:
    actors: int
    cpus_per_actor: int
    cluster_cpus: int


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

    from jobs.ray_stage import ActorSettings, stage_stats

    cfg = plan.config
    start_ray(cfg.address, cfg.verbose)
    ctx = ray.data.DataContext.get_current()
    # No preserve_order: output files are named by read unit, so completion order changes nothing.
    ctx.enable_progress_bars = False  # headless nightly logs: no per-batch bars
    ctx.max_errored_blocks = -1  # a piece that crashed its actor 3 times leaves the pass, not the job (above)
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    actors, threads = actor_layout(cluster_cpus, cfg.concurrency, cfg.cpus_per_actor, plan.model_bytes)
    variant = plan.precision.variant
    settings = ActorSettings(plan.model_dir, threads, plan.columns, cfg.decode, cfg.windows, cfg.batch_tokens,
                             variant.backend, variant.precision, cfg.wide)
    stats = stage_stats()
    rows = plan.rows_in - plan.staged_rows
    pieces, crashed, passes, retried = [poison.whole(u) for u in plan.pending], [], 0, 0
    with ProgressReporter(stats, rows, cfg.progress_every_s):
        while pieces:
            passes += 1
            failed = _answer_pass(plan, settings, stats, pieces, min(actors, len(pieces)))
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
    return Execution(ActorLayout(actors, threads, cluster_cpus), totals, started, time.time(), retries)


def _answer_pass(plan: JobPlan, settings, stats, pieces: list[Piece], actors: int) -> list[Piece]:
    """Answer ``pieces`` into staging; the pieces that crashed their actor CRASHES_PER_PASS times (not staged).
    Raises the first exception an actor or write task reported."""
    import ray

    from jobs.ray_stage import AnswerActor, StagedParquetDatasink
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
                                   "stats": stats},
            batch_format="pyarrow", batch_size=1, num_cpus=settings.threads,
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
            max_restarts=budget + 1, max_task_retries=CRASHES_PER_PASS - 1,
        )
    sink = StagedParquetDatasink(plan.output, stats)
    # As many write tasks at once as answering actors: they keep up, and reuse their worker processes. Unbounded
    # (num_cpus=0 admits any number), each staged unit started a Python worker of its own (16 on 2 cores for a
    # 15-unit job: a tiny job took 25 s instead of 12).
    ds.write_datasink(sink, ray_remote_args={"num_cpus": 0}, concurrency=max(1, actors))
    failure = ray.get(stats.first_failure.remote())
    if failure is not None:
        raise failure[1]
    staged = [(w["unit"], w["first_row"], w["rows"]) for w in sink.written]
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
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
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
    ray.init(address=address, logging_level=logging.INFO if verbose else logging.ERROR,
             log_to_driver=verbose, configure_logging=True)
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
        print(f"progress: {done}/{self.total} rows ({100 * done / max(self.total, 1):.1f}%), "
              f"{rate:.1f} rows/s, ETA {_clock(eta)}, {totals.actors} actors", flush=True)


def _clock(seconds: float) -> str:
    if math.isnan(seconds):  # no rate yet
        return "unknown"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
