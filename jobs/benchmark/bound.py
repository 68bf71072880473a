"""Our job's ceiling on this machine: its answering stage in bare processes, no Ray, for --mode marginal --bound.

    python -m jobs.benchmark.bound --input questions.parquet --model DIR --output predictions.json \\
        --backend openvino --precision bf16 [--processes 2] [--batch-tokens 2048] [--rows 256]

K spawned processes (default: one per CPU) each load one session of the variant the job served
(pipeline.backends.load_model, 1 thread, as the job's default actors) and the job's Answerer, then take ranges of
--rows rows until none is left: the job's actors without Ray, read units, staging or commit. Its marginal rate is
the most the job could reach with these kernels on this CPU: ours against it is what distributing the work costs
(Ray's processes, the gaps between an actor's tasks, reading and staging), and it against the transformers
pipeline is the best ratio any scheduling could show. Writes ``{id: answer}``; the caller times the process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

_worker: dict = {}  # in each process: its Answerer and the input table (read once)


def _load(model: str, backend: str, precision: str, batch_tokens: int, input_path: str) -> None:
    import pyarrow.parquet as pq

    from pipeline.answer import Answerer
    from pipeline.backends import load_model

    spec, session = load_model(model, 1, backend=backend, precision=precision)
    _worker["answerer"] = Answerer(spec, session, batch_tokens=batch_tokens)
    _worker["table"] = pq.read_table(input_path, columns=["id", "question", "context"])


def _answer(start: int, rows: int) -> list[tuple[str, str]]:
    out = _worker["answerer"](_worker["table"].slice(start, rows))
    return [(i, a or "") for i, a in zip(out.column("id").to_pylist(), out.column("answer").to_pylist())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.benchmark.bound", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="Parquet with id, question and context columns")
    p.add_argument("--model", required=True, help="model directory, as the job's --model")
    p.add_argument("--output", required=True, help="predictions JSON to write ({id: answer})")
    p.add_argument("--backend", required=True, help="as the job served it (its manifest's precision record)")
    p.add_argument("--precision", required=True, help="as the job served it")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="default: one per CPU")
    p.add_argument("--batch-tokens", type=int, required=True, help="tokens per inference call, as the job's")
    p.add_argument("--rows", type=int, help="rows a process takes at a time (default: 256, or fewer so that every "
                                            "process gets at least 4 ranges)")
    a = p.parse_args(argv)
    import pyarrow.parquet as pq

    total = pq.read_metadata(a.input).num_rows
    step = a.rows or max(1, min(256, math.ceil(total / (4 * a.processes))))
    starts = range(0, total, step)
    answers: dict[str, str] = {}
    with ProcessPoolExecutor(a.processes, mp_context=get_context("spawn"), initializer=_load,
                             initargs=(a.model, a.backend, a.precision, a.batch_tokens, a.input)) as pool:
        for part in pool.map(_answer, starts, [step] * len(starts)):
            answers.update(part)
    if len(answers) != total:
        raise AssertionError(f"{a.input}: {total} rows in, {len(answers)} answered")
    Path(a.output).write_text(json.dumps(answers, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
