"""The driver's second step: connect to the cluster (or start a local Ray), wait for its workers, read its CPUs.

Ray is started once per job, here, and the workers awaited once: a job that finds fewer CPUs than
``--min-actors`` actors need waits for them (asking an autoscaler for them), printing a line saying so, and fails
with NoWorkersError after ``--wait-for-workers`` seconds. Ray's own log lines go to a file unless ``--verbose``
(``ray_lines_to_file``); our progress and summary lines go to stdout.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from jobs.pool import Capacity
from pipeline import faults
from pipeline.precision import NodeCpu, memory_bytes

WAIT_POLL_S = 1.0


class NoWorkersError(RuntimeError):
    """No worker CPUs for --min-actors actors arrived within --wait-for-workers."""


@dataclass(frozen=True)
class Cluster:
    """What the driver knows of the cluster once connected: its capacity, and every node's CPU."""

    capacity: Capacity
    nodes: tuple[NodeCpu, ...]
    connected: bool = True  # False: no Ray started (nothing to answer; the driver's CPU stands for the nodes)

    @classmethod
    def here(cls) -> Cluster:
        return cls(Capacity(0, 0, 0), (NodeCpu.here(),), connected=False)


def connect(cfg) -> Cluster:
    """Start (or join) Ray, wait for --min-actors actors' CPUs, and read every node's CPU: what --precision auto
    chooses for. A driver-only head (0 CPUs) runs no actor and does not count."""
    start_ray(cfg.address, cfg.verbose)
    # An autoscaling cluster may start with no worker CPUs: choose for the nodes that will answer.
    capacity = wait_for_workers(cfg.min_actors * (cfg.cpus_per_actor or 1), cfg.wait_for_workers_s,
                                cfg.progress_every_s)
    return Cluster(capacity, tuple(node_cpus()))


def node_cpus() -> list[NodeCpu]:
    """The CPU of every alive node with CPUs, read on the node itself."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cpus = {n["NodeID"]: n["Resources"]["CPU"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0}
    nodes = list(cpus)
    if nodes == [ray.get_runtime_context().get_node_id()]:  # one machine, the driver's: read it here
        found = [(_cpu_flags(), memory_bytes())]
    else:
        probe = ray.remote(num_cpus=0)(_node_facts)
        found = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
                         for node in nodes])
    # memory per CPU as actors share it: the node's physical memory over the CPUs Ray schedules on it
    return [NodeCpu.from_flags(node, flags, int(memory // cpus[node]))
            for node, (flags, memory) in zip(nodes, found, strict=True)]


def _node_facts() -> tuple[list[str], int]:
    """A node's CPU flags and physical memory, read on the node."""
    return _cpu_flags(), memory_bytes()


def _cpu_flags() -> list[str]:
    from pipeline.cpu import local_flags

    return sorted(local_flags())


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
    if verbose:
        _MESSAGES.path = None  # Ray prints its messages as it does
    else:
        divert_messages_to_driver()
    hooks = faults.forwarded_env()  # tests only: a cluster's workers do not inherit the driver's environment
    # The job's own local Ray lives as long as the job, without the dashboard: it costs 1.5-2 s of a 6-8 s start
    # on 2 cores and CPU all the while. To watch a job in the dashboard, run it on a `ray start --head` node.
    local = {"include_dashboard": False} if address == "local" else {}
    ray.init(address=address, logging_level=logging.INFO if verbose else logging.ERROR,
             log_to_driver=verbose, configure_logging=True, **local,
             **({"runtime_env": {"env_vars": hooks}} if hooks else {}))
    if not verbose:
        quiet_ray()  # ray.init configures its loggers again


@dataclass
class _RayMessages:
    """Where Ray's messages to the driver go while a job runs (``ray_lines_to_file``), and what they said."""

    path: Path | None = None  # None: printed as Ray prints them
    lines: list[str] = field(default_factory=list)  # this job's, for its own one line


_MESSAGES = _RayMessages()


def divert_messages_to_driver() -> None:
    """Ray's messages to the driver into the job's log file (``ray_lines_to_file``), for the whole process.

    Whatever ``log_to_driver`` says, a driver's Ray runs a thread that prints what the cluster reports to the job
    (a task retried after its worker died, a worker or node lost, an out-of-memory kill) to *stdout*, in colour,
    as "(raylet) Task MapWorker(MapBatches(AnswerActor)).submit failed. There are 2 retries remaining ...": among
    our own lines, and below the stderr redirection. That thread calls ``ray._private.worker.print_to_stdstream``
    by name for each message (Ray 2.60; a private function, as ``autoscaling_bound_cpus`` reads one: without it
    Ray prints as it does). Outside a job's ``ray_lines_to_file`` (a notebook's later Ray work) Ray prints them as
    it does."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "diverted", False):
        return

    def to_log(data: dict, ignore_prefix: bool) -> None:
        path = _MESSAGES.path  # once: the job may end meanwhile
        if path is None:
            printer(data, ignore_prefix)
            return
        source = data.get("pid") or "ray"
        lines = [str(line) for line in data.get("lines") or ()]
        _MESSAGES.lines.extend(lines)
        with open(path, "a", encoding="utf-8") as log:
            log.writelines(f"({source}) {line}\n" for line in lines)

    to_log.diverted = True
    ray_worker.print_to_stdstream = to_log


@contextlib.contextmanager
def ray_lines_to_file():
    """Ray's own lines into a log file while the job runs, unless --verbose: the driver's stderr (file descriptor
    2), and Ray's messages to the driver (``divert_messages_to_driver``), which it prints to stdout.

    Ray's core worker logs from C++ straight to the process's stderr, below any Python logger: for example
    "constructor arguments in the object store" for every Ray Data actor pool (ray#57733, about restarts our
    pool does not depend on). Our own progress and summary lines go to stdout; an exception still reaches
    the terminal, after stderr is restored, with the log file named. A run that Ray sent messages (a worker
    process or a node lost, its tasks retried) keeps the file and says so in one line of ours, on stderr.
    """
    path = Path(tempfile.gettempdir()) / f"qa-batch-{os.getpid()}-ray.log"
    _MESSAGES.path, _MESSAGES.lines = path, []
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    except BaseException:
        _restore_stderr(saved)
        _MESSAGES.path = None
        print(f"Ray's own log lines of this run: {path} (or run with --verbose)", file=sys.stderr)
        raise
    _restore_stderr(saved)
    _MESSAGES.path = None
    if _MESSAGES.lines:
        print(f"note: {reported(_MESSAGES.lines)}, in {path}; the manifest's retries and ray say what the job did",
              file=sys.stderr, flush=True)
    else:
        path.unlink(missing_ok=True)  # nothing went wrong: nothing to read


# What Ray's messages to the driver say, in our words: (words in the message, what happened)
_REPORTS = ((("retries remaining",), "task(s) retried"), (("worker died or was killed",), "worker process(es) died"),
            (("marked dead", "node died", "node was terminated"), "node(s) lost"),
            (("low on memory", "out of memory"), "out-of-memory kill(s)"))


def reported(lines: list[str]) -> str:
    """One clause for Ray's messages to the driver: how many, and what they were about."""
    counts = {what: sum(any(w in line.lower() for w in words) for line in lines) for words, what in _REPORTS}
    kinds = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
    return f"Ray sent the job {len(lines)} message(s) while it ran" + (f" ({kinds})" if kinds else "")


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
