"""Where a kept benchmark result came from: the commit (and uncommitted changes to the code the jobs run), the
CPU, written beside the figures so that a page rendered from them says what it measured."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def code_note(res: dict) -> str:
    """What else the jobs ran: the commit at the end if it moved, uncommitted changes to the code they run."""
    notes = []
    if res.get("commit_at_end") and res["commit_at_end"] != res["commit"]:
        notes.append(f"{res['commit_at_end']} at the end")
    dirty = sorted({line.split(maxsplit=1)[-1] for key in ("dirty", "dirty_at_end")
                    for line in (res.get(key) or "").splitlines() if line.strip()})
    if dirty:
        notes.append("uncommitted changes to " + ", ".join(f"`{d}`" for d in dirty))
    return f" ({'; '.join(notes)})" if notes else ""


def cpu_info() -> dict:
    from pipeline.cpu import cpu_class, model_name

    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    of_note = [f for f in ("amx_int8", "amx_bf16", "avx512_vnni", "avx512_bf16", "avx_vnni", "avx2") if f in flags]
    return {"model": model_name(), "class": str(cpu_class()),
            "flags_of_note": "flags " + " ".join(of_note)}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.rstrip()


def tree_state() -> str:
    """Uncommitted changes to the code the jobs run (jobs/, pipeline/, models/), as ``git status`` lists them."""
    return git("status", "--porcelain", "--untracked-files=no", "--", "jobs", "pipeline", "models")
