"""Deterministic fault hooks for tests: named crash points of the commit protocol, and actor faults.

``QA_FAULT_CRASH_AT=<point>[:<k>]`` makes the process that reaches that point exit at once (``os._exit``, no
clean-up, as a kill would), where ``<point>`` is one of ``CRASH_POINTS`` (pipeline/commit.py documents where
each lies in the protocol). ``stage:<k>`` fires in the answering actor that stages the k-th file of the run and
takes the job's driver down with it (a driver lost mid-run); the driver's points fire in the driver.

``QA_FAULT_CRASH_ON_CALL=<k>`` with ``QA_FAULT_MARKER=<file>`` kills an answering actor on its k-th call, once
per marker file (the restarted actor goes on); ``QA_FAULT_SLOW_CALL_S=<t>`` makes every actor call take t
seconds longer. ``QA_FAULT_CRASH_ON_ROW=<id>`` kills an answering actor every time it is about to answer rows
among which is the row whose id column holds ``<id>`` (compared as text): a poison row, as a native fault in
a runtime would be (pipeline/poison.py); ``QA_FAULT_RESTART_BUDGET=<n>`` lowers a pass's budget of actor
restarts to n, so that a test reaches the crash-loop stop in a few crashes.
``QA_FAULT_IDENTITY_VERSION=<v>`` makes the job write its identity in version v's form, as an earlier release
did (pipeline/records.py): a run by that release, for tests of a resume or re-run across an upgrade.

Node faults: ``QA_FAULT_KILL_ON_CALL=<k>:<pgid>`` makes an answering actor SIGKILL the process group pgid on
its k-th call, before answering (a test passes a worker node's ``ray start --block`` group: its raylet, object
store and every worker, as a lost spot node). Fired in an actor, before it answers, so that the kill finds
units in flight on every node, the victim's own included, and most of the job still to do.
``QA_FAULT_HOLD_FILE=<file>`` holds every answering actor's second and later calls while that file exists: a
test lets each actor answer one unit, adds a node, waits for the new node's actor to stage its first unit and
then removes the file.

The driver forwards every ``QA_FAULT_*`` variable it has to its workers (``forwarded_env``, passed as the
job's runtime_env): on a cluster of ``ray start`` nodes, workers inherit their node's environment, not the
driver's.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

CRASH_POINTS = ("stage", "commit-list", "publish", "manifest")
EXIT_CODE = 17


def forwarded_env() -> dict[str, str]:
    """The fault hooks set in this process, for its Ray workers."""
    return {k: v for k, v in os.environ.items() if k.startswith("QA_FAULT_")}


def crash_at() -> tuple[str, int | None] | None:
    """The crash point asked for, checked once per call (tests set it per process)."""
    value = os.environ.get("QA_FAULT_CRASH_AT")
    if not value:
        return None
    point, _, k = value.partition(":")
    if point not in CRASH_POINTS:
        raise ValueError(f"QA_FAULT_CRASH_AT={value!r}: point must be one of {CRASH_POINTS}")
    return point, int(k) if k else None


def crash_point(point: str, count: int | None = None, also_kill: int | None = None) -> None:
    """Exit at once if the process has reached ``point`` (for counted points: at least k times);
    ``also_kill`` is a process to SIGKILL first (the driver, from an actor)."""
    wanted = crash_at()
    # ">=": concurrent actors may each count past k between two listings; the first to see it fires.
    if wanted is None or wanted[0] != point or (wanted[1] is not None and (count or 0) < wanted[1]):
        return
    if also_kill is not None and also_kill != os.getpid():
        try:
            os.kill(also_kill, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(EXIT_CODE)


def actor_call(call: int) -> None:
    """An answering actor's ``call``-th call: slow it, kill a node, hold it, or crash it once per marker file."""
    if os.environ.get("QA_FAULT_SLOW_CALL_S"):
        time.sleep(float(os.environ["QA_FAULT_SLOW_CALL_S"]))
    kill = os.environ.get("QA_FAULT_KILL_ON_CALL")
    if kill and call == int(kill.partition(":")[0]):
        try:
            os.killpg(int(kill.partition(":")[2]), signal.SIGKILL)  # may be this actor's own node: it ends here
        except ProcessLookupError:  # killed already, by another actor
            pass
    hold = os.environ.get("QA_FAULT_HOLD_FILE")
    while hold and call > 1 and os.path.exists(hold):
        time.sleep(0.1)
    k, marker = os.environ.get("QA_FAULT_CRASH_ON_CALL"), os.environ.get("QA_FAULT_MARKER")
    if k and marker and call == int(k) and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(EXIT_CODE)


def actor_rows(documents: pa.Table, id_column: str) -> None:
    """An answering actor is about to answer ``documents``: crash if the poison row is among them."""
    poison = os.environ.get("QA_FAULT_CRASH_ON_ROW")
    if poison is not None and any(str(i) == poison for i in documents.column(id_column).to_pylist()):
        os._exit(EXIT_CODE)


def restart_budget_cap() -> int | None:
    value = os.environ.get("QA_FAULT_RESTART_BUDGET")
    return int(value) if value else None



def written_identity_version(current: int) -> int:
    """The job identity version this process writes: ``current``, or (tests) ``QA_FAULT_IDENTITY_VERSION``, so
    that a run stands for one by an earlier release (pipeline/records.py)."""
    value = os.environ.get("QA_FAULT_IDENTITY_VERSION")
    return int(value) if value else current
