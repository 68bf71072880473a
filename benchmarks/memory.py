"""Peak resident memory from /proc (Linux): of a process, and of every answering actor under this one."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def _peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set size so far, from /proc (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        children = parents.get(todo.pop(), [])
        found.extend(children)
        todo.extend(children)
    return found


class ActorRss(threading.Thread):
    """Peak RSS of every answering actor under this process (Ray workers descend from the raylet we
    started), polled until stopped: the actors exit with the dataset, taking their VmHWM with them."""

    def __init__(self, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.interval_s, self.peaks, self._done = interval_s, {}, threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            for pid in _descendants(os.getpid()):
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"AnswerActor" in title:
                    self.peaks[pid] = max(self.peaks.get(pid, 0.0), _peak_rss_mb(pid))

    def stop(self) -> dict[int, float]:
        self._done.set()
        self.join()
        return self.peaks
