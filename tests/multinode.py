"""A real multi-node Ray cluster on 127.0.0.1 for tests: a head that only drives (0 CPUs, as deploy/rayjob.yaml
runs it) and worker nodes, each `ray start --block` in its own process group with its own ports, started one
after the other (two nodes starting at the same moment on one host race), each stopped by its process group id.
Never `ray stop`, which ends every Ray process on the machine. A node killed with ``Node.kill`` (SIGKILL to its
process group, as a lost spot node) is declared dead by the head within about 3 s (health checks every 1 s, 3
misses: Ray's defaults, 3 s x 5, would make a test wait 15 s).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
WORKER_PORTS = 400  # per node, for its worker processes: the raylet takes one a worker and a driver, and a
# job killed by a test can leave its ports taken; with none free a new worker dies at start and the raylet waits
# 60 s (its registration timeout) before it starts another: a job stalled for a minute (docs/log/, 2026-12-06)


class NodeExitedError(RuntimeError):
    """A node's `ray start` exited before the cluster had it."""


def free_ports(n: int, avoid: range = range(0)) -> list[int]:
    """n distinct ports free now (held open together so they differ), none of them in ``avoid``."""
    socks: list[socket.socket] = []
    try:
        while sum(s.getsockname()[1] not in avoid for s in socks) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks if s.getsockname()[1] not in avoid]
    finally:
        for s in socks:
            s.close()


def free_range(n: int) -> int:
    """The first port of n consecutive ports that are free now."""
    for _ in range(200):
        (start,) = free_ports(1)
        if start + n < 65535 and all(_free(p) for p in range(start, start + n)):
            return start
    raise RuntimeError("no free port range")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# Detached actors Ray Data starts in the first job that needs them, under that job's id, for the cluster's life.
CLUSTER_WIDE_ACTORS = frozenset({"ray::_StatsActor", "ray::_UsageCollectionActor", "ray::ActorLocationTracker",
                                 "ray::_AutoscalingCoordinatorActor", "ray::AutoscalingRequester"})


def _title(pid: int) -> str:
    """A Ray worker's process title (``ray::IDLE``, ``ray::<actor class>``, ...); "" once it has gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _cluster_wide(title: str) -> bool:
    """Whether a worker's title is one of CLUSTER_WIDE_ACTORS, idle (``ray::<class>``) or in a method call
    (``ray::<class>.<method>``)."""
    return title.split(".", 1)[0] in CLUSTER_WIDE_ACTORS


def _worker_report(pid: int, err_log: Path, lines: int = 15) -> str:
    """What a worker that outlived its job was: its title, state and the end of its logs."""
    tails = []
    for log in (err_log, err_log.with_suffix(".out"), *err_log.parent.glob(f"python-core-worker-*_{pid}.log")):
        if log.exists():
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"  {log.name}:\n" + "\n".join(f"    {line}" for line in text))
    return f"pid {pid} {_title(pid)!r} state {_state(pid)!r}\n" + "\n".join(tails)


def _state(pid: int) -> str:
    """Process ``pid``'s state letter from /proc (``R``, ``S``, ``D``, ``Z`` for a zombie ...); "" once it has gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an exited child its parent has not reaped)."""
    return _state(pid) not in ("", "Z")


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    num_cpus: int
    killed: bool = False

    @property
    def pgid(self) -> int:
        """Its process group (`ray start` leads its own): what to SIGKILL to lose the node."""
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL the node's whole process group: its raylet, object store and every worker it started."""
        self.killed = True
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


class LocalCluster:
    """Head (0 CPUs) plus worker nodes on 127.0.0.1; ``env`` is what a driver needs to join it."""

    def __init__(self, temp: Path):
        self.temp = temp
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # Ray >= 2.59 turns token authentication on for `ray start` clusters: one token for nodes and drivers.
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex + uuid.uuid4().hex)
        self.env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
        # A raylet waits this long for its dashboard agent (which takes 50 s and more on a loaded 2-core host).
        self.env.update(RAY_agent_register_timeout_ms="120000")
        self.nodes: list[Node] = []
        self.head: Node | None = None
        self.address = ""
        self.dashboard = ""

    def _start(self, name: str, args: list[str], num_cpus: int, env: dict | None = None) -> Node:
        workers = free_range(WORKER_PORTS)
        node_manager, object_manager, agent, agent_grpc, runtime_env, metrics = free_ports(
            6, avoid=range(workers, workers + WORKER_PORTS))  # free now, but not yet bound: keep them apart
        cmd = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
               "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
               "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
               "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
               "--min-worker-port", str(workers), "--max-worker-port", str(workers + WORKER_PORTS - 1),
               "--disable-usage-stats", *args]
        log = open(self.temp / f"{name}.log", "wb")  # noqa: SIM115 - the node outlives this call
        process = subprocess.Popen(cmd, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        node = Node(name, process, num_cpus)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: int = 0, dashboard: bool = False, env: dict | None = None) -> Node:
        """The head; with ``dashboard``, ``self.dashboard`` is the address `ray job submit` takes. ``env`` adds
        to its environment, which its worker processes inherit."""
        gcs, client, dash = free_ports(3)
        self.address = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        view = ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash)]
        args = ["--head", "--port", str(gcs), "--ray-client-server-port", str(client),
                *(view if dashboard else ["--include-dashboard", "false"]), "--temp-dir", str(self.temp / "ray")]
        self.head = self._start_and_wait("head", args, num_cpus, env=env)
        return self.head

    def add_worker(self, num_cpus: int = 1, wait: bool = True, env: dict | None = None) -> Node:
        """A worker node; with ``wait``, returns once the cluster counts its CPUs. ``env`` adds to its
        environment, which its worker processes inherit (QA_CPUINFO: a node of another CPU class)."""
        args = ["--address", self.address]
        if not wait:
            return self._start(f"worker-{len(self.nodes)}", args, num_cpus, env)
        return self._start_and_wait(f"worker-{len(self.nodes)}", args, num_cpus, env=env)

    def _start_and_wait(self, name: str, args: list[str], num_cpus: int, attempts: int = 3,
                        env: dict | None = None) -> Node:
        """Start a node and wait for the cluster to count it; again (up to ``attempts`` in all) if it exits
        while starting: on a loaded host a raylet gives up after 30 s without its dashboard agent."""
        for attempt in range(attempts):
            node = self._start(name if attempt == 0 else f"{name}-again{attempt}", args, num_cpus, env)
            try:
                self._wait_for_log(node, "Ray runtime started")  # then one or two probes, not one per 0.5 s
                self.wait_for_cpus(sum(n.num_cpus for n in self.running()), nodes=len(self.running()))
                return node
            except NodeExitedError:
                node.kill()  # what the failed `ray start` left in its group
                self.nodes.remove(node)
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def running(self) -> list[Node]:
        """Nodes whose `ray start` process is running (the head first)."""
        return [n for n in self.nodes if n.process.poll() is None]

    def workers(self) -> list[Node]:
        return [n for n in self.running() if n is not self.head]

    def keep_workers(self, count: int, num_cpus: int = 1) -> list[Node]:
        """Exactly ``count`` running worker nodes (adding, or killing the newest), counted by the cluster too."""
        while len(self.workers()) > count:
            self.workers()[-1].kill()
        while len(self.workers()) < count:
            self.add_worker(num_cpus)  # one after the other: nodes starting together on one host race
        self.wait_for_cpus(sum(n.num_cpus for n in self.running()), nodes=len(self.running()))
        return self.workers()

    def alive(self) -> tuple[int, float]:
        """(alive nodes, their CPUs), asked of the cluster by a short-lived driver."""
        script = (f"import ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
                  "alive = [n for n in ray.nodes() if n['Alive']]; "
                  "print('ALIVE', len(alive), sum(n['Resources'].get('CPU', 0) for n in alive))")
        probe = subprocess.Popen([sys.executable, "-c", script], env=self.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
        deadline = time.time() + 120  # a head still starting on a loaded host: the caller asks again
        # A driver waits minutes for a GCS that never comes up: stop asking once a node's `ray start` has exited.
        while probe.poll() is None and time.time() < deadline and not self._exited():
            time.sleep(0.2)
        if probe.poll() is None:
            probe.kill()
        stdout, _ = probe.communicate()
        lines = [line.split() for line in stdout.splitlines() if line.startswith("ALIVE ")]  # not Ray's lines
        if probe.returncode != 0 or not lines:
            return 0, 0.0
        return int(lines[-1][1]), float(lines[-1][2])

    def _wait_for_log(self, node: Node, line: str, timeout_s: float = 180) -> None:
        """Until the node's `ray start` has printed ``line``: read from its log file, which costs nothing, where
        each ``alive`` probe is a Python driver, seconds of CPU taken from the nodes starting on 2 cores."""
        log = self.temp / f"{node.name}.log"
        deadline = time.time() + timeout_s
        while line.encode() not in log.read_bytes():
            if self._exited():
                raise NodeExitedError(f"a node exited during start-up; see {log}")
            if time.time() > deadline:
                raise TimeoutError(f"{node.name} did not print {line!r} in {timeout_s} s; see {log}")
            time.sleep(0.2)

    def _exited(self) -> bool:
        """Whether a node's `ray start` has exited without being killed."""
        return any(n.process.poll() is not None for n in self.nodes if not n.killed)

    def wait_for_cpus(self, cpus: float, nodes: int, timeout_s: float = 180) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self._exited():
                raise NodeExitedError(f"a node exited during start-up; see {self.temp}/*.log")
            if self.alive() == (nodes, float(cpus)):
                return
            time.sleep(0.5)
        raise TimeoutError(f"cluster did not reach {nodes} nodes / {cpus} CPUs; see {self.temp}/*.log")

    def wait_for_workers_of(self, driver_pid: int, timeout_s: float = 60) -> int:
        """Until every worker process of the job whose driver was ``driver_pid`` has exited (Ray kills a dead
        driver's actors and tasks; until then they may still write). Returns how many there were.

        One that Ray has not ended in ``timeout_s`` the test SIGKILLs itself, with a warning that says what it
        was (title, state, the end of its logs): the tests are about what our protocol does with late writers,
        which holds either way, not about how soon Ray ends them (one CI run on a loaded machine saw a worker
        outlive its job by minutes, what it was unknown).

        The job's id comes from its driver's log file name (``python-core-driver-<job id>_<pid>.log``), its
        workers' process ids from theirs (``worker-<worker id>-<job id, 8 hex>-<pid>.err``)."""
        logs = self.temp / "ray" / "session_latest" / "logs"
        drivers = list(logs.glob(f"python-core-driver-*_{driver_pid}.log"))
        assert len(drivers) == 1, f"no log of driver {driver_pid} in {logs}"
        job = drivers[0].name.removeprefix("python-core-driver-")[:8]
        err_logs = {int(f.stem.rsplit("-", 1)[1]): f for f in logs.glob(f"worker-*-{job}-*.err")}
        def alive() -> list[int]:
            return [pid for pid in err_logs if _running(pid) and not _cluster_wide(_title(pid))]

        deadline = time.time() + timeout_s
        while alive() and time.time() < deadline:
            time.sleep(0.1)
        if left := alive():
            report = "\n".join(_worker_report(pid, err_logs[pid]) for pid in left)
            warnings.warn(f"Ray left workers of job {job} running {timeout_s} s after its driver died; the test "
                          f"kills them:\n{report}", stacklevel=2)
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.time() + 10  # SIGKILL cannot be ignored: gone (or a zombie) at once
            while alive():
                assert time.time() < deadline, f"workers {alive()} of job {job} survived SIGKILL"
                time.sleep(0.1)
        return len(err_logs)

    def stop(self) -> None:
        for node in reversed(self.nodes):  # workers first, the head last
            node.kill()
