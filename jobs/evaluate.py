"""SQuAD evaluation through the production path: the same job, the same actors, the official metric.

    python -m jobs.evaluate --data dev-v1.1.json [--model DIR] [--limit N] [--report report.json]
    python -m jobs.evaluate --data dev-v1.1.json --predictions predictions.json   # scoring only

The first form converts the SQuAD questions (the first N in file order with --limit) into the job's
Parquet input, runs jobs.answer on them, and scores the answers; it keeps the job's input, output
and the predictions file (``{id: answer}``) under --out-dir. The second scores an existing
predictions file without running a model.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from jobs.cli import ArgumentParser, command_parser
from jobs.config import JobConfig, add_flags, from_args
from pipeline import squad
from pipeline.cpu import cpu_class


def evaluate_model(data: str, model: str, out_dir: Path, limit: int | None = None, **job_options) -> dict:
    """``job_options``: any other JobConfig field (concurrency, precision, ...)."""
    import pyarrow.parquet as pq

    from jobs.answer import run

    items = squad.questions(squad.load_squad(data), limit)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(squad.to_table(items), out_dir / "input.parquet")
    answers_dir = out_dir / "answers"
    if answers_dir.exists():
        raise FileExistsError(f"{answers_dir} exists; choose another --out-dir")
    t0 = time.time()
    manifest = run(JobConfig(input=str(out_dir / "input.parquet"), output=str(answers_dir), model=model,
                             **job_options))
    elapsed = time.time() - t0
    table = pq.read_table(answers_dir, columns=["id", "answer"])
    predictions = squad.predictions(table)
    (out_dir / "predictions.json").write_text(json.dumps(predictions, ensure_ascii=False, indent=0))
    report = squad.score(items, predictions)
    report.update({
        "questions_per_s": round(len(items) / elapsed, 3),
        "questions_per_s_answering": manifest.questions_per_s,
        "wall_s": round(elapsed, 2),
        "model": manifest.model,
        "precision": manifest.precision,  # the variant that answered (pipeline/precision.py)
        "cpu_class": cpu_class(),  # of the machine that ran it (the driver's; a local run's actors share it)
        "data": str(data),
        "limit": limit,
        "errors": manifest.errors,
        "predictions": str(out_dir / "predictions.json"),
        "stages": manifest.stages,
        "durations_s": manifest.durations_s,
        "ray": manifest.ray,
    })
    return report


# The job's flags that make no sense here: evaluate writes the input and output itself.
NOT_JOB_FLAGS = ("input", "output", "input_format", "output_format", "where", "select", "mode", "skip_bad_files",
                 "questions", "wide")


def parser() -> ArgumentParser:
    """``qa-batch evaluate``'s flags: its own, then the job's (less NOT_JOB_FLAGS)."""
    p = command_parser("evaluate", __doc__, "%(prog)s --data DATA [flags]")
    own = p.add_argument_group("evaluation")
    own.add_argument("--data", required=True, help="SQuAD-format JSON (.json or .json.gz)")
    own.add_argument("--predictions", metavar="PATH", help="score this {id: answer} file instead of running a model")
    own.add_argument("--limit", type=int, metavar="N", help="first N questions in file order")
    own.add_argument("--report", metavar="PATH", help="write the report JSON here too")
    own.add_argument("--out-dir", help="where the job's input, output and predictions go "
                                       "(default: out/evaluate/<time>)")
    add_flags(p, JobConfig, skip=NOT_JOB_FLAGS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    try:
        job = from_args(a, JobConfig, skip=NOT_JOB_FLAGS, input="-", output="-")
    except ValueError as exc:
        p.refuse(str(exc))
    if a.predictions:
        items = squad.questions(squad.load_squad(a.data), a.limit)
        predictions = json.loads(Path(a.predictions).read_text(encoding="utf-8"))
        report = {**squad.score(items, predictions), "data": a.data, "predictions": a.predictions}
    else:
        out_dir = Path(a.out_dir or f"out/evaluate/{time.strftime('%Y%m%d-%H%M%S')}")
        options = {f.name: getattr(job, f.name) for f in fields(job) if f.name not in (*NOT_JOB_FLAGS, "model")}
        report = evaluate_model(a.data, job.model, out_dir, a.limit, **options)
        if not a.report:
            (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    if a.report:
        Path(a.report).write_text(json.dumps(report, indent=2))
    print(f"exact_match {report['exact_match']:.2f}  f1 {report['f1']:.2f}  count {report['count']}"
          + (f"  questions/s {report['questions_per_s']:.2f}" if "questions_per_s" in report else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
