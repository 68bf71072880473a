"""Every measured system runs in a fresh spawned process, with noisy neighbours paused for exactly that long."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

PAUSE_PIDS: list[int] = []  # --pause-pid: noisy neighbours stopped while a system is measured


def in_child(fn: Callable, *args):
    """Runs ``fn`` in a fresh spawned process: its own peak RSS, threads and imports. Processes named by
    --pause-pid are stopped (SIGSTOP) for exactly that long and always continued (SIGCONT) after."""
    try:
        for pid in PAUSE_PIDS:
            os.kill(pid, signal.SIGSTOP)
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    finally:
        for pid in PAUSE_PIDS:
            os.kill(pid, signal.SIGCONT)


def unpaused_child(fn: Callable, *args):
    """``in_child`` for preparation that is not measured: neighbours keep running."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
