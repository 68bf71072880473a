"""What one huge row costs a job (issue 34): its answering actor's peak memory and the job's wall time.

    python -m benchmarks.huge_rows [--chars 5000000] [--question-words 50000] [--normal 99] [--json FILE]

Two Parquet inputs are built from SQuAD dev (``--data``) in a temporary folder:

- ``huge``: the first ``--normal`` dev questions with their paragraphs; the first of those questions again over a
  context of ``--chars`` characters (every dev paragraph, joined by spaces, as many times over as it takes), id
  ``huge``; and a question of ``--question-words`` words (dev questions' words, joined) over the second question's
  paragraph, id ``long-question``;
- ``normal``: the same rows without ``huge``.

Each runs as a job with the default model and settings, on a Ray of its own (``python -m jobs.answer --input IN
--output OUT``; RAY_ADDRESS is cleared), one after the other. From this process, every 0.5 s, the resident memory of
the job's answering actors is read from /proc: Ray worker processes whose title names MapWorker or AnswerActor;
their peak is the larger of the sampled VmRSS and the kernel's own high-water mark, VmHWM. Reported per input: the
job's wall time, the actors' peak resident memory, the progress lines that name a long row (jobs.progress), and
the huge row's answer and error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "data" / "squad" / "dev-v1.1.json"
ACTOR_TITLES = ("MapWorker", "AnswerActor")  # Ray Data's pool actor, and our class inside its title


def build_inputs(data: Path, folder: Path, normal: int, chars: int, question_words: int) -> dict[str, Path]:
    """The ``huge`` and ``normal`` inputs (see the module's docstring), as Parquet files in ``folder``."""
    from pipeline.squad import load_squad, questions

    items = questions(load_squad(data))
    rows = [{"id": q["id"], "question": q["question"], "context": q["context"]} for q in items[:normal]]
    paragraphs = " ".join(dict.fromkeys(q["context"] for q in items))
    context = " ".join([paragraphs] * (chars // len(paragraphs) + 1))[:chars]
    words = " ".join(q["question"] for q in items).split()
    long_question = " ".join(words[i % len(words)] for i in range(question_words))
    special = [{"id": "long-question", "question": long_question, "context": items[1]["context"]}]
    out = {}
    for name, extra in (("huge", [{"id": "huge", "question": items[0]["question"], "context": context}]),
                        ("normal", [])):
        out[name] = folder / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows + extra + special), out[name])
    return out


class ActorMemory:
    """Samples the answering actors' resident memory every ``every_s`` seconds on a daemon thread."""

    def __init__(self, every_s: float = 0.5):
        self.every = every_s
        self.peak_kb: dict[int, int] = {}  # pid -> max(VmRSS sampled, VmHWM)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            for pid, kb in actor_rss_kb().items():
                self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), kb)

    def peak_mb(self) -> float:
        return max(self.peak_kb.values(), default=0) / 1024


def actor_rss_kb() -> dict[int, int]:
    """{pid: max(VmRSS, VmHWM) in kB} of the answering actors alive now."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if not any(t in title for t in ACTOR_TITLES):
                continue
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{entry}/status").read_text().splitlines()
                          if ":" in line)
        except OSError:  # the process ended between the listing and the read
            continue
        out[int(entry)] = max(int(fields.get(k, "0 kB").split()[0]) for k in ("VmRSS", "VmHWM"))
    return out


def run_job(source: Path, output: Path) -> dict:
    """One job on its own local Ray: wall seconds, the actors' peak RSS, progress lines naming a long row, the
    huge row's output."""
    command = [sys.executable, "-m", "jobs.answer", "--input", str(source), "--output", str(output)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    with ActorMemory() as memory:
        t0 = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"job failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    answers = {r["id"]: r for r in pq.read_table(output, columns=["id", "answer", "score", "error"]).to_pylist()}
    manifest = json.loads((output / "_manifest.json").read_text())
    return {"command": "python -m jobs.answer --input IN --output OUT", "wall_s": round(wall, 1),
            "peak_actor_rss_mb": round(memory.peak_mb()), "actors_seen": len(memory.peak_kb),
            "rows": len(answers), "errors": sum(r["error"] is not None for r in answers.values()),
            "stages": manifest.get("stages"),
            "long_row_lines": [line for line in (done.stdout + done.stderr).splitlines() if "; row " in line],
            "huge": answers.get("huge"), "long_question": answers.get("long-question")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEV, help="SQuAD dev JSON (default: %(default)s)")
    p.add_argument("--chars", type=int, default=5_000_000, help="the huge context's characters (default: %(default)s)")
    p.add_argument("--question-words", type=int, default=50_000, help="words of the long question (default: %(default)s)")
    p.add_argument("--normal", type=int, default=99, help="normal dev questions (default: %(default)s)")
    p.add_argument("--dir", default=None, help="where inputs and outputs go (default: $TMPDIR)")
    p.add_argument("--json", default=None, help="also write the raw numbers here")
    args = p.parse_args(argv)
    from pipeline.cpu import cpu_class, model_name

    folder = Path(tempfile.mkdtemp(prefix="huge-rows-", dir=args.dir))
    try:
        inputs = build_inputs(args.data, folder, args.normal, args.chars, args.question_words)
        results = {name: run_job(path, folder / f"out-{name}") for name, path in inputs.items()}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"CPU: {model_name()} (class {cpu_class()}), {os.cpu_count()} CPUs; command: python -m benchmarks.huge_rows "
          + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"each job: {results['huge']['command']} (default model and settings, a local Ray of its own)")
    print("| input | rows | job wall s | peak actor RSS MB | actors | infer s (all actors) | windows |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        stages = r["stages"] or {}
        print(f"| {name} | {r['rows']} | {r['wall_s']} | {r['peak_actor_rss_mb']} | {r['actors_seen']} | "
              f"{stages.get('infer', float('nan')):.1f} | {stages.get('windows', '')} |")
    huge = results["huge"]
    print(f"huge row: {huge['huge']}")
    print(f"long question: {huge['long_question']}")
    print(f"tail: the huge row adds {huge['wall_s'] - results['normal']['wall_s']:.1f} s to the job")
    for line in huge["long_row_lines"]:
        print(f"  {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
