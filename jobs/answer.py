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
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.config import Columns, DecodeSettings

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "minilm-squad"
MODEL_ZOO = Path(os.environ.get("QA_MODEL_ZOO", REPO / "models" / "zoo"))  # where registry names resolve


def default_model() -> str:
    return os.environ.get("QA_MODEL") or str(DEFAULT_MODEL)


@dataclass(frozen=True)
class JobConfig:
    """Everything a run needs; validated here, printed into the manifest."""

    input: str
    output: str
    model: str = field(default_factory=default_model)
    columns: Columns = field(default_factory=Columns)
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    concurrency: int | None = None  # answering actors; None: see actor_layout
    cpus_per_actor: int | None = None  # Ray CPUs and ONNX Runtime threads per actor; None: see actor_layout
    rows_per_unit: int = 1024  # rows per read unit: one actor call, one output file
    batch_tokens: int = 4096  # tokens (padding included) per inference call (BENCHMARKS.md: token budget)
    address: str | None = None
    model_overrides: dict = field(default_factory=dict)  # e.g. {"max_seq_len": 256}
    backend: str = "auto"  # auto | onnxruntime | openvino
    precision: str = "fp32"  # fp32 | bf16 (OpenVINO, bfloat16 matmuls where the CPU has them)
    mode: str = "error"  # error | overwrite | resume, when the output exists
    skip_bad_files: bool = False
    questions: str | None = None  # fan-out: ask these questions (question_id, question) of every input row
    wide: bool = False  # fan-out output: one row per document, answer_<question_id> columns
    progress_every_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("concurrency", "cpus_per_actor"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.rows_per_unit < 1 or self.batch_tokens < 1:
            raise ValueError("--rows-per-unit and --batch-tokens must be >= 1")
        if self.wide and not self.questions:
            raise ValueError("--wide needs --questions")
        if self.progress_every_s <= 0:
            raise ValueError("--progress-every must be > 0 seconds")
        from pipeline.answer import resolve_backend

        resolve_backend(self.backend, self.precision)  # raises on a bad pair, e.g. bf16 with onnxruntime
        if self.mode not in ("error", "overwrite", "resume"):
            raise ValueError(f"--mode must be error, overwrite or resume, got {self.mode!r}")
        if len({self.columns.id, self.columns.question, self.columns.context}) != 3:
            raise ValueError(f"id, question and context columns must differ: {self.columns}")


def parse_args(argv: list[str] | None = None) -> JobConfig:
    p = argparse.ArgumentParser(prog="qa-batch answer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="Parquet file, directory, glob, or s3:// URI")
    p.add_argument("--output", required=True, help="output directory or s3:// URI")
    p.add_argument("--mode", choices=("error", "overwrite", "resume"), default="error",
                   help="when the output exists: fail (default), replace it, or finish an interrupted run")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="skip unreadable input files (listed in the manifest) instead of failing")
    p.add_argument("--model", default=default_model(),
                   help="model directory or registry name (models/registry.py; default: %(default)s)")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "openvino"), default="auto",
                   help="auto: OpenVINO for model.xml, ONNX Runtime for model.onnx")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: OpenVINO runs the model's fp32 graph with bfloat16 matmuls on CPUs that have them "
                        "(AMX, AVX512-BF16), f32 elsewhere; needs the openvino extra")
    p.add_argument("--questions", help="fan-out: Parquet of (question_id, question) asked of every input row, "
                                       "whose id and context columns are then read as documents")
    p.add_argument("--wide", action="store_true",
                   help="with --questions: one output row per document, answer_<question_id>/score_<question_id>")
    p.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--id-column", default="id")
    p.add_argument("--question-column", default="question")
    p.add_argument("--context-column", default="context")
    p.add_argument("--top-k", type=int, default=1, help="answers kept per question (top_answers column if > 1)")
    p.add_argument("--max-answer-len", type=int, default=30, help="in tokens")
    p.add_argument("--max-seq-len", type=int, help="override the model's window length")
    p.add_argument("--doc-stride", type=int, help="override the step between windows (run_squad's doc_stride)")
    p.add_argument("--max-query-len", type=int, help="override the question cut-off in tokens")
    p.add_argument("--concurrency", type=int, help="answering actors (default: cluster CPUs / CPUs per actor)")
    p.add_argument("--cpus-per-actor", type=int, help="CPUs (= ONNX Runtime threads) per actor (default: 1; "
                   "4 for graphs of 256 MB and more)")
    p.add_argument("--rows-per-unit", type=int, default=1024, help="rows per actor call and output file")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens (padding included) per inference call")
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
            mode=a.mode, skip_bad_files=a.skip_bad_files, backend=a.backend, precision=a.precision,
            questions=a.questions, wide=a.wide,
            progress_every_s=a.progress_every,
        )
    except ValueError as exc:
        p.error(str(exc))


LARGE_MODEL_BYTES = 256 * 2**20


def actor_layout(cluster_cpus: int, concurrency: int | None, cpus_per_actor: int | None,
                 model_bytes: int) -> tuple[int, int]:
    """(actors, CPUs per actor) for what the user left unset.

    One single-threaded actor per CPU by default: ONNX Runtime's threads meet at every op, and an op
    waits for the slowest, so two threads on two cores lose to two actors whenever anything else runs
    (BENCHMARKS.md: 2 x 1 CPU was 10% faster than 1 x 2 on 2000 SQuAD questions, the same answers).
    Graphs of 256 MB and more (BERT-large fp32) get 4 CPUs per actor instead: every actor holds its own
    copy, and their big matmuls keep four threads busy.
    """
    if cpus_per_actor is None:
        if concurrency is not None:
            cpus_per_actor = max(1, cluster_cpus // concurrency)
        else:
            cpus_per_actor = min(cluster_cpus, 4) if model_bytes >= LARGE_MODEL_BYTES else 1
    if concurrency is None:
        concurrency = max(1, cluster_cpus // cpus_per_actor)
    return concurrency, cpus_per_actor


def job_identity(cfg: JobConfig, spec, in_fs, in_files: list[str], questions) -> dict:
    """What staged answers depend on: resume refuses to mix runs that differ in any of it."""
    sizes = [f.size for f in in_fs.get_file_info(in_files)]
    return {
        "questions": None if questions is None else questions.to_pydict(),
        "wide": cfg.wide,
        "input_files": [{"path": p, "size": n} for p, n in zip(in_files, sizes)],
        "columns": asdict(cfg.columns),
        "decode": asdict(cfg.decode),
        "windows": asdict(spec.windows),
        "model_sha256": spec.identity()["sha256"],
        "backend": cfg.backend,
        "precision": cfg.precision,
        "rows_per_unit": cfg.rows_per_unit,
    }


def run(cfg: JobConfig) -> dict:
    """Run the job and return its manifest (also written, last, to OUTPUT/_manifest.json)."""
    import pyarrow.dataset as pads
    import ray

    from jobs.ray_stage import AnswerActor, StagedParquetDatasink, StageStats
    from models.registry import resolve_model
    from pipeline.answer import load_model
    from pipeline.commit import OutputCommitter
    from pipeline.fanout import QUESTION, QUESTION_ID
    from pipeline.lake import expand_input, filesystem_and_path, input_base
    from pipeline.units import plan_units

    started = time.time()
    # Fail before starting anything: the model loads, the input exists and has the columns.
    model_dir = str(resolve_model(cfg.model, MODEL_ZOO))
    spec, _ = load_model(model_dir, 1, cfg.model_overrides, cfg.backend, cfg.precision)
    in_fs, in_files = expand_input(cfg.input)
    units, schema, bad_files = plan_units(in_fs, in_files, cfg.rows_per_unit, skip_bad_files=cfg.skip_bad_files,
                                          base=input_base(cfg.input))
    questions, columns = None, cfg.columns
    if cfg.questions:
        questions = load_questions(cfg.questions)
        columns = Columns(cfg.columns.id, QUESTION, cfg.columns.context)
        clash = [c for c in (QUESTION, QUESTION_ID) if c in schema.names]
        if clash:
            raise KeyError(f"input {cfg.input}: has a column {clash[0]!r}, which fan-out adds; rename it")
    needed = (columns.id, columns.context) if questions is not None else (columns.id, columns.question, columns.context)
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise KeyError(f"input {cfg.input}: no column {missing[0]!r} (columns: {schema.names}); "
                       f"choose columns with --id-column/--question-column/--context-column")
    rows_in = sum(u.length for u in units)
    rows_per_input_row = questions.num_rows if questions is not None and not cfg.wide else 1
    out_fs, out_path = filesystem_and_path(cfg.output)
    committer = OutputCommitter(out_fs, out_path, rows_per_input_row)
    job = job_identity(cfg, spec, in_fs, [f for f in in_files if f not in bad_files], questions)
    done = committer.prepare(cfg.mode, job)
    if done is not None:
        print(f"output {cfg.output} already holds this job's committed answers; nothing to do")
        return done

    extra = {
        "config": asdict(cfg),
        "model": spec.identity(),
        "input_files": in_files,
        "skipped_bad_files": bad_files,
        "read_units": len(units),
        "rows_in": rows_in,
        "rows_per_input_row": rows_per_input_row,
    }
    finished = committer.finish_interrupted_commit(job, extra)
    if finished is not None:
        return finished
    pending, staged_rows = committer.pending_units(units)

    ray_info, totals = {}, {}
    t_run = time.time()
    if pending:
        if not ray.is_initialized():
            ray.init(address=cfg.address, logging_level="WARNING")
        ctx = ray.data.DataContext.get_current()
        # No preserve_order: output files are named by read unit, so completion order changes nothing.
        ctx.enable_progress_bars = False  # headless nightly logs: no per-batch bars
        cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
        weights = [spec.model_file, spec.model_file.with_suffix(".bin")]  # an OpenVINO IR keeps them in .bin
        concurrency, threads = actor_layout(cluster_cpus, cfg.concurrency, cfg.cpus_per_actor,
                                            sum(f.stat().st_size for f in weights if f.exists()))
        ray_info = {"concurrency": concurrency, "cpus_per_actor": threads, "cluster_cpus": cluster_cpus}

        stats = StageStats.remote()
        ds = ray.data.from_items([u.as_row() for u in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(
            AnswerActor,
            fn_constructor_kwargs=dict(fs=in_fs, model_dir=model_dir, threads=threads, columns=columns,
                                       decode=cfg.decode, batch_tokens=cfg.batch_tokens,
                                       model_overrides=cfg.model_overrides, backend=cfg.backend,
                                       precision=cfg.precision, stats=stats,
                                       questions=questions, wide=cfg.wide),
            batch_format="pyarrow", batch_size=1, num_cpus=threads,
            compute=ray.data.ActorPoolStrategy(size=concurrency),
        )
        with ProgressReporter(stats, rows_in - staged_rows, cfg.progress_every_s):
            ds.write_datasink(StagedParquetDatasink(committer), ray_remote_args={"num_cpus": 0})
        totals = ray.get(stats.totals.remote())
    t_done = time.time()

    errors_by_kind = totals.pop("errors", {})
    first_ready = totals.pop("first_actor_ready_at", None)
    durations = {"total": round(t_done - started, 3), "answer_and_write": round(t_done - t_run, 3)}
    if first_ready is not None:
        # Ray start-up, actor processes, imports and model load: what a short job pays before its first answer.
        durations["until_first_actor_ready"] = round(first_ready - t_run, 3)
    extra.update({
        "units_answered_now": len(pending),
        "rows_staged_before": staged_rows,
        "errors_by_kind_this_run": errors_by_kind,
        "ray": ray_info,
        "stages": totals,
        "durations_s": durations,
        "questions_per_s": round((rows_in - staged_rows) / max(t_done - t_run, 1e-9), 3),
    })
    manifest = committer.commit(units, job, extra)
    out_dataset = pads.dataset([f["path"] for f in manifest["output_files"]], filesystem=out_fs, format="parquet")
    manifest["errors"] = manifest["rows_out"] - out_dataset.count_rows(filter=pads.field("error").is_null())
    committer.rewrite_manifest(manifest)
    if manifest["rows_out"] != rows_in * rows_per_input_row:
        raise RuntimeError(f"{rows_in} rows in but {manifest['rows_out']} rows out; see {out_path}/_manifest.json")
    elapsed = t_done - started
    print(f"done: {rows_in} rows in, {manifest['rows_out']} rows out, {manifest['errors']} with errors, "
          f"{elapsed:.1f} s ({(rows_in - staged_rows) / max(t_done - t_run, 1e-9):.1f} rows/s); "
          f"manifest {out_path}/_manifest.json", flush=True)
    return manifest


def load_questions(uri: str):
    """The fan-out questions table, validated (unique non-null question_id, a question column)."""
    import pyarrow.parquet as pq

    from pipeline.fanout import validate_questions
    from pipeline.lake import expand_input

    fs, files = expand_input(uri)
    return validate_questions(pq.ParquetDataset(files, filesystem=fs).read(), uri)


class ProgressReporter:
    """A line every few seconds for headless logs (`ray job logs`): rows done/total, rate, ETA."""

    def __init__(self, stats, total_rows: int, every_s: float):
        import threading

        self.stats, self.total, self.every = stats, total_rows, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="qa-progress")
        self._t0 = time.time()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        import ray

        while not self._stop.wait(self.every):
            try:
                done = ray.get(self.stats.totals.remote(), timeout=10).get("input_rows", 0)
            except Exception:  # noqa: BLE001, S112 - progress must never fail the job; the next tick retries
                continue
            elapsed = time.time() - self._t0
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - done) / rate if rate > 0 else float("nan")
            print(f"progress: {done}/{self.total} rows ({100 * done / max(self.total, 1):.1f}%), "
                  f"{rate:.1f} rows/s, ETA {_clock(eta)}", flush=True)


def _clock(seconds: float) -> str:
    if math.isnan(seconds):  # no rate yet
        return "unknown"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    manifest = run(cfg)
    print(json.dumps({k: manifest[k] for k in ("rows_in", "rows_out", "errors", "durations_s", "questions_per_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
