"""A real multi-node Ray cluster on 127.0.0.1 for tests: a head that only drives (0 CPUs, as deploy/rayjob.yaml
runs it) and worker nodes, each `ray start --block` in its own process group with its own ports, started one
after the other (two nodes starting at the same moment on one host race), each stopped by its process group id.
Never `ray stop`, which ends every Ray process on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
WORKER_PORTS = 40  # per node, for its worker processes
START_ATTEMPTS = 3


class NodeExitedError(RuntimeError):
    """A node's `ray start` exited before the cluster had it."""


def free_ports(n: int) -> list[int]:
    """n distinct ports free now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
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


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    num_cpus: int

    def kill(self) -> None:
        """SIGKILL the node's whole process group: its raylet, object store and every worker it started."""
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
        self.nodes: list[Node] = []
        self.address = ""
        self.dashboard = ""

    def _start(self, name: str, args: list[str], num_cpus: int, env: dict | None = None) -> Node:
        node_manager, object_manager, agent, agent_grpc, runtime_env, metrics = free_ports(6)
        workers = free_range(WORKER_PORTS)
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

    def start_head(self, num_cpus: int = 0, dashboard: bool = False) -> Node:
        """The head; with ``dashboard``, ``self.dashboard`` is the address `ray job submit` takes."""

        def start() -> Node:
            gcs, client, dash = free_ports(3)
            self.address = f"127.0.0.1:{gcs}"
            self.dashboard = f"http://127.0.0.1:{dash}"
            view = ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash)]
            return self._start("head", ["--head", "--port", str(gcs), "--ray-client-server-port", str(client),
                                        *(view if dashboard else ["--include-dashboard", "false"]),
                                        "--temp-dir", str(self.temp / "ray")], num_cpus)

        return self._started(start, num_cpus, nodes=1)

    def add_worker(self, num_cpus: int = 1, env: dict | None = None) -> Node:
        """A worker node; ``env`` adds to its environment, which its worker processes inherit."""
        expected = sum(n.num_cpus for n in self.nodes) + num_cpus
        return self._started(lambda: self._start(f"worker-{len(self.nodes)}", ["--address", self.address], num_cpus,
                                                 env), expected, nodes=len(self.nodes) + 1)

    def _started(self, start, cpus: float, nodes: int, attempts: int = START_ATTEMPTS) -> Node:
        """``start()`` a node and wait until the cluster has it. Ray gives a raylet 30 s (hard-coded) to register
        with the GCS; on a loaded 2-core machine that can pass, and the node exits: start it again, up to
        ``attempts`` times."""
        for attempt in range(1, attempts + 1):
            node = start()
            try:
                self.wait_for_cpus(cpus, nodes)
                return node
            except NodeExitedError:
                node.kill()
                self.nodes.remove(node)
                if attempt == attempts:
                    raise

    def alive(self) -> tuple[int, float]:
        """(alive nodes, their CPUs), asked of the cluster by a short-lived driver."""
        script = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
                  "alive = [n for n in ray.nodes() if n['Alive']]; "
                  "print(len(alive), sum(n['Resources'].get('CPU', 0) for n in alive))" % self.address)
        try:
            out = subprocess.run([sys.executable, "-c", script], env=self.env, capture_output=True, text=True,
                                 timeout=120)
        except subprocess.TimeoutExpired:  # a GCS still starting on a loaded machine: ask again
            return 0, 0.0
        if out.returncode != 0:
            return 0, 0.0
        nodes, cpus = out.stdout.split()[-2:]
        return int(nodes), float(cpus)

    def wait_for_cpus(self, cpus: float, nodes: int, timeout_s: float = 180) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if any(n.process.poll() is not None for n in self.nodes):
                raise NodeExitedError(f"a node exited during start-up; see {self.temp}/*.log")
            if self.alive() == (nodes, float(cpus)):
                return
            time.sleep(0.5)
        raise TimeoutError(f"cluster did not reach {nodes} nodes / {cpus} CPUs; see {self.temp}/*.log")

    def stop(self) -> None:
        for node in reversed(self.nodes):  # workers first, the head last
            node.kill()
