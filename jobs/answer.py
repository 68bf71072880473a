"""Answer every question of a Parquet table with an extractive QA model, on Ray.

    python -m jobs.answer --input questions.parquet --output answers/ [--model MODEL_DIR]

Runs on a local Ray when no cluster is running and neither RAY_ADDRESS nor --address is set;
otherwise joins the cluster (as under ``ray job submit``). Writes one output row per input row
(input columns, then answer, answer_start, answer_end, score, probability, error) as Parquet
files under --output, and ``_manifest.json`` at its root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.config import Columns, DecodeSettings

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "minilm-squad"


def default_model() -> str:
    return os.environ.get("QA_MODEL") or str(DEFAULT_MODEL)


@dataclass(frozen=True)
class JobConfig:
    """Everything a run needs; validated here, printed into the manifest."""

    input: str
    output: str
    model: str = field(default_factory=default_model)
    columns: Columns = Columns()
    decode: DecodeSettings = DecodeSettings()
    concurrency: int | None = None  # answering actors; None: one per 4 cluster CPUs, at least 1
    cpus_per_actor: int | None = None  # None: cluster CPUs // concurrency
    rows_per_unit: int = 1024  # rows per read unit: one actor call, one output file
    batch_tokens: int = 16384  # tokens (padding included) per inference call
    address: str | None = None
    model_overrides: dict = field(default_factory=dict)  # e.g. {"max_seq_len": 256}

    def __post_init__(self) -> None:
        for name in ("concurrency", "cpus_per_actor"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.rows_per_unit < 1 or self.batch_tokens < 1:
            raise ValueError("--rows-per-unit and --batch-tokens must be >= 1")
        if len({self.columns.id, self.columns.question, self.columns.context}) != 3:
            raise ValueError(f"id, question and context columns must differ: {self.columns}")


def parse_args(argv: list[str] | None = None) -> JobConfig:
    p = argparse.ArgumentParser(prog="qa-batch answer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="Parquet file, directory, glob, or s3:// URI")
    p.add_argument("--output", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--model", default=default_model(), help="model directory (default: %(default)s)")
    p.add_argument("--id-column", default="id")
    p.add_argument("--question-column", default="question")
    p.add_argument("--context-column", default="context")
    p.add_argument("--top-k", type=int, default=1, help="answers kept per question (top_answers column if > 1)")
    p.add_argument("--max-answer-len", type=int, default=30, help="in tokens")
    p.add_argument("--max-seq-len", type=int, help="override the model's window length")
    p.add_argument("--doc-stride", type=int, help="override the step between windows (run_squad's doc_stride)")
    p.add_argument("--max-query-len", type=int, help="override the question cut-off in tokens")
    p.add_argument("--concurrency", type=int, help="answering actors (default: one per 4 cluster CPUs)")
    p.add_argument("--cpus-per-actor", type=int, help="CPUs (= ONNX Runtime threads) per actor")
    p.add_argument("--rows-per-unit", type=int, default=1024, help="rows per actor call and output file")
    p.add_argument("--batch-tokens", type=int, default=16384, help="tokens per inference call")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in (("max_seq_len", a.max_seq_len), ("doc_stride", a.doc_stride),
                                   ("max_query_len", a.max_query_len)) if v is not None}
    try:
        return JobConfig(
            input=a.input, output=a.output, model=a.model,
            columns=Columns(a.id_column, a.question_column, a.context_column),
            decode=DecodeSettings(max_answer_len=a.max_answer_len, top_k=a.top_k),
            concurrency=a.concurrency, cpus_per_actor=a.cpus_per_actor, rows_per_unit=a.rows_per_unit,
            batch_tokens=a.batch_tokens, address=a.address, model_overrides=overrides,
        )
    except ValueError as exc:
        p.error(str(exc))


def run(cfg: JobConfig) -> dict:
    """Run the job and return its manifest (also written to OUTPUT/_manifest.json)."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs
    import ray

    from jobs.ray_stage import AnswerActor, StageStats
    from pipeline.answer import load_model
    from pipeline.lake import expand_input, filesystem_and_path, write_json
    from pipeline.units import plan_units

    started = time.time()
    # Fail before starting anything: the model loads, the input exists and has the columns.
    spec, _ = load_model(cfg.model, 1, cfg.model_overrides)
    in_fs, in_files = expand_input(cfg.input)
    units, schema = plan_units(in_fs, in_files, cfg.rows_per_unit)
    missing = [c for c in (cfg.columns.id, cfg.columns.question, cfg.columns.context) if c not in schema.names]
    if missing:
        raise KeyError(f"input {cfg.input}: no column {missing[0]!r} (columns: {schema.names}); "
                       f"choose columns with --id-column/--question-column/--context-column")
    rows_in = sum(u.length for u in units)
    out_fs, out_path = filesystem_and_path(cfg.output)
    if out_fs.get_file_info(out_path).type != pafs.FileType.NotFound:
        if out_fs.get_file_info(pafs.FileSelector(out_path, recursive=False)):
            raise FileExistsError(f"output {cfg.output} exists and is not empty; choose another --output")

    if not ray.is_initialized():
        ray.init(address=cfg.address, logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same input -> same output files and order
    ctx.enable_progress_bars = False  # headless nightly logs: no per-batch bars
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    concurrency = cfg.concurrency or max(1, cluster_cpus // 4)
    threads = cfg.cpus_per_actor or max(1, cluster_cpus // concurrency)

    stats = StageStats.remote()
    ds = ray.data.from_items([u.as_row() for u in units], override_num_blocks=len(units))
    ds = ds.map_batches(
        AnswerActor,
        fn_constructor_kwargs=dict(fs=in_fs, model_dir=cfg.model, threads=threads, columns=cfg.columns,
                                   decode=cfg.decode, batch_tokens=cfg.batch_tokens,
                                   model_overrides=cfg.model_overrides, stats=stats),
        batch_format="pyarrow", batch_size=1, num_cpus=threads,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
    )
    t_run = time.time()
    ds.write_parquet(cfg.output, filesystem=out_fs if "://" in cfg.output else None, ray_remote_args={"num_cpus": 0})
    t_done = time.time()

    out_files = sorted(
        f.path for f in out_fs.get_file_info(pafs.FileSelector(out_path, recursive=True))
        if f.path.endswith(".parquet"))
    out_dataset = pads.dataset(out_files, filesystem=out_fs, format="parquet")
    rows_out = out_dataset.count_rows()
    errors = rows_out - out_dataset.count_rows(filter=pads.field("error").is_null())
    totals = ray.get(stats.totals.remote())
    manifest = {
        "config": asdict(cfg),
        "model": spec.identity(),
        "input_files": in_files,
        "read_units": len(units),
        "output_files": [{"path": p, "rows": pads.dataset(p, filesystem=out_fs).count_rows()} for p in out_files],
        "rows_in": rows_in,
        "rows_out": rows_out,
        "errors": errors,
        "errors_by_kind": totals.pop("errors", {}),
        "ray": {"concurrency": concurrency, "cpus_per_actor": threads, "cluster_cpus": cluster_cpus},
        "stages": totals,
        "durations_s": {"total": round(t_done - started, 3), "answer_and_write": round(t_done - t_run, 3)},
        "questions_per_s": round(rows_in / max(t_done - t_run, 1e-9), 3),
    }
    write_json(out_fs, f"{out_path}/_manifest.json", manifest)
    if rows_out != rows_in:
        raise RuntimeError(f"{rows_in} rows in but {rows_out} rows out; see {out_path}/_manifest.json")
    return manifest


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    manifest = run(cfg)
    print(json.dumps({k: manifest[k] for k in ("rows_in", "rows_out", "errors", "durations_s", "questions_per_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
