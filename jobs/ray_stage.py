"""The one adapter between Ray Data and the pure pipeline: an actor class for map_batches."""

from __future__ import annotations

import copy
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import fanout, faults
from pipeline.answer import Answerer, StageTimes, StageTotals
from pipeline.commit import ROW_COLUMN, UNIT_COLUMN
from pipeline.config import Columns, DecodeSettings
from pipeline.cpu import cpu_class
from pipeline.formats import Stager
from pipeline.poison import crash_loop, unit_and_first_row
from pipeline.served import ServedModel
from pipeline.units import UnitReader


@dataclass(frozen=True)
class ActorSettings:
    """What every answering actor is built with (besides the input filesystem and fan-out questions)."""

    served: ServedModel  # the model resolved on the driver: the actor opens exactly its graph
    threads: int  # runtime threads: the Ray CPUs the actor holds
    columns: Columns
    decode: DecodeSettings
    wide: bool = False


@dataclass(frozen=True)
class ActorReport:
    """One answering actor's cumulative work so far: reports replace each other, so a lost one costs nothing."""

    actor: str
    times: StageTimes
    input_rows: int  # rows read (documents, with fan-out)
    node: str = ""  # the Ray node id the actor process runs on


@dataclass(frozen=True)
class LongRow:
    """A long context an answering actor is working through (pipeline.answer.Answerer.row_progress): its row id,
    its windows answered so far, of all its windows, and the seconds the actor has spent on it."""

    row: str
    done: int
    total: int
    seconds: float = 0.0

    def eta_s(self) -> float:
        """Seconds left at the rate so far (nan before a rate)."""
        return (self.total - self.done) * self.seconds / self.done if self.done and self.seconds else float("nan")


LONG_ROW_REPORT_S = 2.0  # an actor reports a long row's progress at most this often, and only past this long


class LongRowReporter:
    """The actor's ``row_progress``: tells the stats actor (fire and forget) of a long row that has kept it busy
    for LONG_ROW_REPORT_S, then at most every LONG_ROW_REPORT_S, and once more when it is done (clearing it); a
    row done sooner is never reported."""

    def __init__(self, stats: ray.actor.ActorHandle, actor: str, clock: Callable[[], float] = time.monotonic):
        self.stats, self.actor, self.clock = stats, actor, clock
        self.row: str | None = None
        self.began = self.last = 0.0  # when this row began; when it was last reported (or began)
        self.reported = False

    def __call__(self, row: str, done: int, total: int) -> None:
        now = self.clock()
        if row != self.row:
            self.row, self.began, self.last, self.reported = row, now, now, False
        if done >= total:
            if self.reported:
                self.stats.long_row.remote(self.actor, LongRow(row, done, total, now - self.began))
            self.row = None
        elif now - self.last >= LONG_ROW_REPORT_S:
            self.stats.long_row.remote(self.actor, LongRow(row, done, total, now - self.began))
            self.last, self.reported = now, True


@dataclass(frozen=True)
class NodeReport:
    """What one node's answering actors did (the manifest's ``ray.nodes``), from the actors' own reports."""

    node: str  # Ray node id
    cpu_class: str  # pipeline.cpu.cpu_class() on that node
    actors_started: int  # actor processes that loaded the model there (a restarted process counts again)
    rows_answered: int  # input rows its actors answered (a unit in flight when the node died counts here too)
    actors_lost: int  # actor processes that ended early: all of a node dead now, else those that crashed there
    alive: bool
    first_ready_s: float | None = None  # seconds from the start of answering to its first actor ready
    first_answer_s: float | None = None  # ... to the first report of an answered unit from it


class StageBook:
    """Latest report of each answering actor, for the manifest and progress lines; placed on the driver's node
    (see ``stage_stats``) so that losing a worker node cannot take the job's bookkeeping with it.

    Also what the driver learns of a pass besides the staged rows: the actor restarts (crashes) counted
    against the pass's budget, and the exceptions raised in actors, which Ray Data drops
    with their blocks once a pass may lose blocks (jobs/execute.py)."""

    def __init__(self, alive: Callable[[], frozenset[str]] | None = None) -> None:
        self.alive = alive  # the cluster's alive node ids (default: ``alive_nodes``, asked of the GCS)
        self.reports: dict[str, ActorReport] = {}
        self.ready_at: dict[str, float] = {}
        self.first_report_at: dict[str, float] = {}  # wall clock here, on the driver's node
        self.node_of: dict[str, str] = {}  # actor process -> node id
        self.cpu_class_of: dict[str, str] = {}  # node id -> CPU class
        self.last_node_of_actor: dict[str, str] = {}  # Ray actor id -> node of its latest process
        self.node_losses = 0  # actor restarts because the actor's node died: not charged to a pass's budget
        self.crashed_on: dict[str, int] = {}  # node id -> actor processes that crashed there (restarts charged)
        self.restarts = 0  # in this run
        self.pass_restarts, self.pass_budget = 0, 0
        self.failures: list[tuple[str, Exception]] = []
        self.long: dict[str, LongRow] = {}  # actor process -> the long row it is answering

    def begin_pass(self, restart_budget: int) -> None:
        self.pass_restarts, self.pass_budget = 0, restart_budget

    def restarted(self, actor_id: str = "") -> tuple[int, int]:
        """An actor process came back after a crash: (restarts in this pass so far, the pass's budget).

        A restart because the actor's node died (its last process ran on a node that is dead now) is a lost
        node, not a crash of the model: it is not charged, so that losing a node of 64 actors cannot stop a
        job as a crash loop."""
        node = self.last_node_of_actor.get(actor_id)
        if node is not None and node not in (self.alive or alive_nodes)():
            self.node_losses += 1
            return 0, self.pass_budget
        if node is not None:
            self.crashed_on[node] = self.crashed_on.get(node, 0) + 1
        self.restarts += 1
        self.pass_restarts += 1
        return self.pass_restarts, self.pass_budget

    def failed(self, where: str, error: Exception) -> None:
        self.failures.append((where, error))

    def first_failure(self) -> tuple[str, Exception] | None:
        return self.failures[0] if self.failures else None

    def restart_count(self) -> int:
        return self.restarts

    def report(self, report: ActorReport) -> None:
        self.reports[report.actor] = report
        self.first_report_at.setdefault(report.actor, time.time())
        self.long.pop(report.actor, None)  # its units are answered: no long row left in them

    def long_row(self, actor: str, row: LongRow) -> None:
        """An actor's progress through a long row (its last report: the row is done)."""
        if row.done >= row.total:
            self.long.pop(actor, None)
        else:
            self.long[actor] = row

    def long_rows(self) -> list[LongRow]:
        """The long rows actors are answering now, most windows left first."""
        return sorted(self.long.values(), key=lambda r: (r.done - r.total, r.row))

    def ready(self, actor: str, at: float, node: str = "", cpu: str = "", actor_id: str = "") -> None:
        """An actor process on ``node`` (whose CPU class is ``cpu``) finished loading its model at wall-clock
        ``at``."""
        self.ready_at[actor] = at
        self.node_of[actor] = node
        self.cpu_class_of[node] = cpu
        if actor_id:
            self.last_node_of_actor[actor_id] = node

    def totals(self) -> StageTotals:
        times = sum((r.times for r in self.reports.values()), StageTimes())
        return StageTotals(times, sum(r.input_rows for r in self.reports.values()), len(self.ready_at),
                           min(self.ready_at.values(), default=None))

    def node_losses_count(self) -> int:
        return self.node_losses

    def nodes(self, alive: frozenset[str] | set[str], started_at: float = 0.0) -> list[NodeReport]:
        """Per node that ran an answering actor, by node id; ``alive``: the nodes alive now."""
        by_node: dict[str, list[str]] = {}
        for actor in sorted(set(self.ready_at) | set(self.reports)):
            node = self.node_of.get(actor) or self.reports[actor].node
            by_node.setdefault(node, []).append(actor)
        out = []
        for node, actors in sorted(by_node.items()):
            ready = [self.ready_at[a] for a in actors if a in self.ready_at]
            answered = [self.first_report_at[a] for a in actors if a in self.first_report_at]
            out.append(NodeReport(
                node, self.cpu_class_of.get(node, ""), len(actors),
                sum(self.reports[a].input_rows for a in actors if a in self.reports),
                self.crashed_on.get(node, 0) if node in alive else len(actors), node in alive,
                round(min(ready) - started_at, 3) if ready and started_at else None,
                round(min(answered) - started_at, 3) if answered and started_at else None))
        return out


StageStats = ray.remote(num_cpus=0)(StageBook)  # the job's one StageBook, as an actor (``stage_stats``)


def alive_nodes() -> frozenset[str]:
    """Ids of the cluster's nodes that are alive now (one GCS call)."""
    return frozenset(n["NodeID"] for n in ray.nodes() if n["Alive"])


def stage_stats() -> ray.actor.ActorHandle:
    """The job's StageStats, pinned to the driver's node."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return StageStats.options(scheduling_strategy=here).remote()


class AnswerActor:
    """Loads one model session in __init__; in __call__ reads read units (or pieces of them), answers them and
    stages the answers itself (``output.write_block``), returning only what it staged.

    Staging in the actor, not in Ray Data write tasks: on a node whose Ray has few CPUs, a short write task
    every few seconds found its idle worker process killed (Ray's soft limit on workers is the node's CPUs,
    and the actors already exceed it) and started a new one, paying the imports again each time, a large share
    of a small job's CPU (docs/log/ has the measurement). The answers also no longer travel through the
    object store.

    Callable without a cluster (``stats=None``): the Ray-free core of an actor, as tests use it; ``answer``
    answers without staging. An actor process that Ray restarts after a crash counts the restart against its
    pass's budget before loading the model; past the budget it loads nothing and every call raises
    ModelCrashLoopError, so a model that crashes on everything ends the pass in seconds instead of being split
    down to single rows.
    """

    def __init__(self, fs: pafs.FileSystem, settings: ActorSettings, questions: pa.Table | None = None,
                 stats: ray.actor.ActorHandle | None = None, output: Stager | None = None):
        self.reader = UnitReader(fs)
        self.questions, self.wide, self.id_column = questions, settings.wide, settings.columns.id
        self.stats, self.output = stats, output
        self.name = f"{os.getpid()}@{socket.gethostname()}"
        self.node = ray.get_runtime_context().get_node_id() if stats is not None else ""
        self.calls = 0
        self.input_rows = 0
        self.refusal: Exception | None = None
        if stats is not None and ray.get_runtime_context().was_current_actor_reconstructed:
            restarts, budget = ray.get(stats.restarted.remote(ray.get_runtime_context().get_actor_id()))
            if restarts > budget:
                self.refusal = crash_loop(restarts, budget)
                return
        t0 = time.perf_counter()
        served = settings.served
        session = served.open(settings.threads)  # refuses a graph that changed since the job planned it
        self.answerer = Answerer(served.spec, session, settings.columns, settings.decode, served.batch_tokens,
                                 LongRowReporter(stats, self.name) if stats is not None else None)
        self.answerer.times.model_load = time.perf_counter() - t0
        if stats is not None:
            # Not awaited: bookkeeping never holds up answers.
            stats.ready.remote(self.name, time.time(), self.node, cpu_class(),
                               ray.get_runtime_context().get_actor_id())

    def __call__(self, units: pa.Table) -> pa.Table:
        """Units as rows (ReadUnit.as_row, or poison.Piece.as_row) in; out, one row per staged file: its unit,
        first output row inside the unit and rows (STAGED)."""
        self.calls += 1
        try:
            answered = self.answer(units)
            return pa.Table.from_pylist(self.output.write_block(answered), schema=STAGED)
        except Exception as exc:  # re-raised; reported first because Ray Data drops a failed block silently
            report_failure(self.stats, f"answering actor {self.name}", exc)
            raise

    def answer(self, units: pa.Table) -> pa.Table:
        """The units' answered rows, with the hidden unit/row columns (a piece's rows numbered from its first
        row inside its unit)."""
        if self.refusal is not None:
            raise self.refusal
        faults.actor_call(self.calls)
        parts = []
        for u in units.to_pylist():
            unit, first = unit_and_first_row(u)
            documents = self.reader.read(unit)
            faults.actor_rows(documents, self.id_column)
            if self.questions is None:
                answered = self.answerer(documents)
            else:
                answered = self.answerer(fanout.expand(documents, self.questions))
                if self.wide:
                    answered = fanout.to_wide(answered, documents, self.questions)
            self.input_rows += documents.num_rows
            n = answered.num_rows
            answered = answered.append_column(UNIT_COLUMN, pa.array([unit.index] * n, pa.int64()))
            parts.append(answered.append_column(ROW_COLUMN, pa.array(range(first, first + n), pa.int64())))
        if self.stats is not None:
            # Fire and forget: a report lost with its node (or a slow stats actor) must not fail an answer.
            self.stats.report.remote(ActorReport(self.name, copy.deepcopy(self.answerer.times), self.input_rows,
                                                 self.node))
        return pa.concat_tables(parts)


# What an answering actor returns per staged file (the stager's write_block records).
STAGED = pa.schema([("unit", pa.int64()), ("first_row", pa.int64()), ("rows", pa.int64())])


def report_failure(stats: ray.actor.ActorHandle | None, where: str, error: Exception) -> None:
    """Tell the driver of an exception before the actor's task fails with it (awaited: the driver reads the failures
    once the pass is over, and this task's failure may end the pass)."""
    if stats is not None:
        ray.get(stats.failed.remote(where, error))
