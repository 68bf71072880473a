"""Our job's ceiling on this machine: its answering stage in bare processes, no Ray, for --mode marginal --bound.

    python -m benchmarks.bound --input questions.parquet --model DIR --output predictions.json \\
        --backend openvino --precision bf16 [--shapes static] [--processes 2] [--batch-tokens 2048] \\
        [--rows-per-unit 1024]

K spawned processes (default: one per CPU) each load one session of the variant the job served
(pipeline.backends.load_model, 1 thread, as the job's default actors) and the job's Answerer, and answer the
pieces the job's first pass would cut (pipeline.units.plan_units, pipeline.poison.first_pass: read units, the
last ones shrinking so that the processes finish together), each taking the next piece when it is done: the
job's actors, batches and tail without Ray, its tasks, staging or commit. Its marginal rate is the most the job
could reach with these kernels on this CPU: ours against it is what distributing the work costs, and it
against the transformers pipeline is the best ratio any scheduling could show. Writes ``{id: answer}``; the
caller times the process.
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pyarrow.fs as pafs

from jobs.config import JobConfig
from pipeline.poison import first_pass
from pipeline.units import ReadUnit, plan_units

_answerer = None  # in each worker process: the job's Answerer on one session ...
_reader = None  # ... and a UnitReader, which keeps the last row group it decoded


def _load(model: str, backend: str, precision: str, shapes: str, batch_tokens: int) -> None:
    global _answerer, _reader
    from pipeline.answer import Answerer
    from pipeline.backends import load_model
    from pipeline.units import UnitReader

    spec, session = load_model(model, 1, backend=backend, precision=precision, shapes=shapes)
    _answerer, _reader = Answerer(spec, session, batch_tokens=batch_tokens), UnitReader(pafs.LocalFileSystem())


def _answer(piece: ReadUnit) -> list[tuple[str, str]]:
    out = _answerer(_reader.read(piece).select(["id", "question", "context"]))
    return [(i, a or "") for i, a in zip(out.column("id").to_pylist(), out.column("answer").to_pylist())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bound", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="Parquet with id, question and context columns")
    p.add_argument("--model", required=True, help="model directory, as the job's --model")
    p.add_argument("--output", required=True, help="predictions JSON to write ({id: answer})")
    p.add_argument("--backend", required=True, help="as the job served it (its manifest's precision record)")
    p.add_argument("--precision", required=True, help="as the job served it")
    p.add_argument("--shapes", choices=("dynamic", "static"), default="dynamic", help="as the job served it")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="default: one per CPU")
    p.add_argument("--batch-tokens", type=int, required=True, help="tokens per inference call, as the job's")
    p.add_argument("--rows-per-unit", type=int, default=JobConfig.rows_per_unit,
                   help="as the job's (default %(default)s)")
    a = p.parse_args(argv)
    units, _, _ = plan_units(pafs.LocalFileSystem(), [str(Path(a.input).resolve())], a.rows_per_unit)
    total = sum(u.length for u in units)
    answers: dict[str, str] = {}
    with ProcessPoolExecutor(a.processes, mp_context=get_context("spawn"), initializer=_load,
                             initargs=(a.model, a.backend, a.precision, a.shapes, a.batch_tokens)) as pool:
        for part in pool.map(_answer, [p.read_unit for p in first_pass(units, a.processes)]):
            answers.update(part)
    if len(answers) != total:
        raise AssertionError(f"{a.input}: {total} rows in, {len(answers)} answered")
    Path(a.output).write_text(json.dumps(answers, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
