"""The modes (compare, actors, tuning): every system on the same questions, repeated, the median kept."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.flops import flop_model
from benchmarks.processes import in_child, unpaused_child
from benchmarks.systems import (
    hf_model_dir,
    our_windows,
    run_job,
    run_padded_loop,
    run_transformers,
    squad_items,
    transformers_pipeline_available,
    variant_dir,
)
from pipeline import squad

PEER = "transformers pipeline fp32"


@dataclass
class Result:
    """One system's run: what it answered, how fast, how well, and at what memory."""

    name: str
    precision: str  # "int8" | "fp32": which peak its GFLOP/s is compared with
    questions: int
    windows: int
    seconds: float
    f1: float
    exact_match: float
    useful_flops: float
    peak_rss_mb: float
    extra: dict = field(default_factory=dict)

    @property
    def questions_per_s(self) -> float:
        return self.questions / self.seconds

    @property
    def windows_per_s(self) -> float:
        return self.windows / self.seconds

    @property
    def useful_gflops(self) -> float:
        return self.useful_flops / self.seconds / 1e9


@dataclass(frozen=True)
class Setup:
    """What every system in one run shares."""

    data: str
    limit: int | None
    model_dir: Path
    fp32_graph: Path | None
    cpus: int
    batch_tokens: int
    rows_per_unit: int
    repeats: int
    work: Path


def median_result(name: str, precision: str, runs: list[dict], flops: float) -> Result:
    """The run with the median time stands for the system; all times stay in extra."""
    runs = sorted(runs, key=lambda r: r["seconds"])
    mid = runs[(len(runs) - 1) // 2]
    extra = {**mid.get("extra", {}), "seconds_all": [round(r["seconds"], 3) for r in runs]}
    return Result(name, precision, mid["questions"], mid["windows"], mid["seconds"], mid["f1"], mid["exact_match"],
                  flops, mid["peak_rss_mb"], extra)


# The job's --precision for each peak: the int8 graph is ONNX Runtime's dynamic int8 model.onnx.
JOB_PRECISION = {"bf16": "bf16", "int8": "int8-dynamic"}


def job_result(setup: Setup, name: str, precision: str, model_dir: Path, concurrency: int, threads: int,
               flops: float) -> Result:
    """``precision`` names the peak to compare with; "bf16" also runs the job with --precision bf16."""
    runs = []
    for i in range(setup.repeats):
        out = setup.work / f"{name.replace(' ', '-').replace('(', '').replace(')', '')}-{i}"
        runs.append(in_child(run_job, setup.data, setup.limit, str(model_dir), str(out), concurrency, threads,
                             setup.batch_tokens, setup.rows_per_unit, JOB_PRECISION.get(precision, "fp32")))
    return median_result(name, precision, runs, flops)


def graphs(setup: Setup) -> list[tuple[str, Path]]:
    """(precision, model directory) for the int8 graph and, when there is one, the fp32 graph."""
    out = [("int8", setup.model_dir)]
    if setup.fp32_graph is not None:
        out.append(("fp32", variant_dir(setup.model_dir, setup.fp32_graph, setup.work / "fp32-model")))
    return out


def compare(setup: Setup, hf_model: str | None, hf_weights: str | None, hf_batch_size: int,
            max_answer_len: int, bf16: bool) -> list[Result]:
    """Every system on the same questions: our job (its default layout: one single-threaded actor per CPU),
    the peer, the padded loop; int8 and fp32 graphs, and bf16 where the CPU has it."""
    from pipeline.model_dir import load_spec

    items = squad_items(setup.data, setup.limit)
    cost = flop_model(setup.model_dir / "model.onnx")
    ours = cost.flops(our_windows(str(setup.model_dir), items))
    results, variants = [], graphs(setup)
    for precision, model_dir in variants:
        results.append(job_result(setup, f"our job {precision}", precision, model_dir, setup.cpus, 1, ours))
    if len(variants) > 1 and bf16:
        results.append(job_result(setup, "our job bf16 (OpenVINO)", "bf16", variants[1][1], setup.cpus, 1, ours))
    skip = transformers_pipeline_available()
    if skip is None:
        hf_dir = hf_model or unpaused_child(hf_model_dir, str(setup.model_dir), str(setup.work / "hf-model"), hf_weights)
        settings = {**asdict(load_spec(setup.model_dir).windows), "max_answer_len": max_answer_len}
        runs = [in_child(run_transformers, setup.data, setup.limit, hf_dir, setup.cpus, hf_batch_size, settings)
                for _ in range(setup.repeats)]
        results.append(median_result(PEER, "fp32", runs, cost.flops(np.array(runs[0].pop("lengths")))))
    else:
        print(f"skipping the transformers pipeline: {skip}", file=sys.stderr)
    for precision, model_dir in variants:
        runs = [in_child(run_padded_loop, setup.data, setup.limit, str(model_dir), setup.cpus)
                for _ in range(setup.repeats)]
        results.append(median_result(f"ORT loop pad-384 b8 {precision}", precision, runs, ours))
    return results


def actors(setup: Setup) -> list[Result]:
    """1 actor x N CPUs against N actors x 1 CPU, alternating so that drift hits both alike."""
    items = squad_items(setup.data, setup.limit)
    ours = flop_model(setup.model_dir / "model.onnx").flops(our_windows(str(setup.model_dir), items))
    layouts = [(1, setup.cpus), (setup.cpus, 1)]
    runs: dict = {layout: [] for layout in layouts}
    for i in range(setup.repeats):
        for concurrency, threads in layouts:
            out = setup.work / f"actors-{concurrency}x{threads}-{i}"
            runs[(concurrency, threads)].append(in_child(
                run_job, setup.data, setup.limit, str(setup.model_dir), str(out), concurrency, threads,
                setup.batch_tokens, setup.rows_per_unit))
    return [median_result(f"our job int8, {c} actor(s) x {t} CPU", "int8", runs[(c, t)], ours) for c, t in layouts]


def tuning(setup: Setup, budgets: list[int]) -> list[dict]:
    """The answering stage in-process (no Ray) over token budgets x spinning, repeats interleaved;
    median seconds of each. Isolates the two knobs from Ray's overheads."""
    return in_child(run_tuning, setup.data, setup.limit, str(setup.model_dir), setup.cpus, budgets, setup.repeats)


def spinning_session_class():
    """pipeline.session.QASession with ONNX Runtime's idle pool threads allowed to busy-wait for the next op
    (the job's options turn that off): the other side of --mode tuning's spinning comparison."""
    import onnxruntime as ort

    from pipeline.session import ALLOW_SPINNING_KEY, QASession

    class SpinningSession(QASession):
        def _options(self, threads, kernels):
            opts = super()._options(threads, kernels)
            ort.set_default_logger_severity(3)  # no "will be overwritten" warning: that is the point here
            try:
                opts.add_session_config_entry(ALLOW_SPINNING_KEY, "1")
            finally:
                ort.set_default_logger_severity(2)  # ONNX Runtime's default, warnings
            return opts

    return SpinningSession


def run_tuning(data: str, limit: int | None, model_dir: str, threads: int, budgets: list[int],
               repeats: int) -> list[dict]:
    from pipeline.answer import Answerer
    from pipeline.backends import kernels_for, load_model
    from pipeline.session import QASession

    items = squad_items(data, limit)
    table = squad.to_table(items)
    spec, _ = load_model(model_dir, threads)
    sessions = {spin: (spinning_session_class() if spin else QASession)(
                    spec.model_file, threads, spec.input_names, spec.output_names,
                    kernels=kernels_for(spec.model_file))
                for spin in (False, True)}
    times: dict = {}
    for _ in range(repeats):
        for spin, session in sessions.items():
            for budget in budgets:
                answerer = Answerer(spec, session, batch_tokens=budget)
                t0 = time.perf_counter()
                out = answerer(table)
                seconds = time.perf_counter() - t0
                t = answerer.times
                times.setdefault((spin, budget), []).append(
                    (seconds, t.tokenize, t.infer, t.decode, t.padded_tokens / max(t.tokens, 1),
                     squad.score(items, squad.predictions(out))["f1"]))
    rows = []
    for (spin, budget), runs in times.items():
        med = sorted(runs)[(len(runs) - 1) // 2]
        rows.append({"spinning": spin, "batch_tokens": budget, "questions_per_s": table.num_rows / med[0],
                     "seconds_all": [round(r[0], 3) for r in runs], "tokenize_s": med[1], "infer_s": med[2],
                     "decode_s": med[3], "padded_over_real": med[4], "f1": med[5]})
    return rows
