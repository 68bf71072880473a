"""The command line: flags (parse_args, the one place they are declared) and the driver that runs a mode."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from benchmarks import marginal
from benchmarks.peaks import exact_kernel_check, matmul_peak
from benchmarks.processes import PAUSE_PIDS, in_child
from benchmarks.report import cpu_name, stage_shares, table
from benchmarks.runs import PEER, Setup, actors, compare, tuning
from benchmarks.systems import squad_items
from jobs.config import JobConfig, add_flags, from_args

JOB_FLAGS = ("model", "batch_tokens", "decode__max_answer_len")  # our job's own flags, as jobs.answer has them


def parse_args(argv: list[str] | None):
    import benchmarks

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=benchmarks.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="SQuAD-format JSON (.json or .json.gz)")
    p.add_argument("--limit", type=int, default=500, help="first N questions in file order (default %(default)s)")
    add_flags(p, JobConfig, only=JOB_FLAGS)
    p.add_argument("--fp32-model", help="fp32 graph of the same weights (default: MODEL/model-fp32.onnx if present)")
    p.add_argument("--hf-model", help="Hugging Face model directory for the peer (default: built from MODEL's "
                                      "config.json and --hf-weights, in a temporary directory)")
    p.add_argument("--hf-weights", help="weights for that directory: .safetensors or a train_qa checkpoint.pt "
                                        "(default: MODEL/weights-bf16.safetensors, loaded as fp32)")
    p.add_argument("--hf-batch-size", type=int, default=8)
    p.add_argument("--mode", choices=("compare", "actors", "tuning", "marginal"), default="compare")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs every system gets (default: all; --mode marginal: "
                                                                      "the pipeline's threads, our job takes all)")
    p.add_argument("--budgets", default="256,512,1024,4096", help="token budgets for --mode tuning")
    p.add_argument("--rows-per-unit", type=int, help="our job's read unit (default: limit / 8, so that actors share; "
                                                          "--mode marginal: the job's own default)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each system; the median is reported")
    p.add_argument("--report", help="write every number as JSON here")
    p.add_argument("--pause-pid", type=int, action="append", default=[],
                   help="a noisy neighbour to SIGSTOP while each system is measured (SIGCONT right after); "
                        "repeatable")
    p.add_argument("--work-dir", help="job inputs/outputs (default: a temporary directory, removed; --mode marginal: "
                                      "out/benchmark-marginal, kept: the random models built there are reused)")
    m = p.add_argument_group("--mode marginal (benchmarks/marginal.py)")
    m.add_argument("--models", default=marginal.DEFAULT_MODELS,
                   help="NAME=N,...: models (default: --model; bert-base, bert-large: random weights) and their N "
                        "(default %(default)s)")
    m.add_argument("--variants", default=marginal.DEFAULT_VARIANTS,
                   help="';'-separated job flag sets, 'default' for none; pass as --variants='...' "
                        "(default %(default)r)")
    m.add_argument("--calibration", help="calibration data for the random models' NNCF IR (default: models.convert's)")
    m.add_argument("--skip-peer", action="append", choices=("torch", "openvino"), default=[],
                   help="leave out a peer: torch (the transformers pipeline on PyTorch) or openvino (the same "
                        "pipeline on optimum-intel's OpenVINO model); repeatable")
    m.add_argument("--quiet-wait", type=float, default=0, metavar="SECONDS",
                   help="before each system's N and 2N runs, wait up to SECONDS until the rest of the machine uses "
                        "under 0.25 cores (a machine shared with other work); default 0: no wait")
    m.add_argument("--bound", action="store_true",
                   help="also time the job's answering stage in bare processes, one per CPU, no Ray "
                        "(benchmarks/bound.py), as the first variant served it: the job's ceiling on this machine")
    m.add_argument("--data-copies", type=int, default=1, metavar="K",
                   help="--data's questions K times over (ids suffixed -0, -1, ...), for N beyond the file: "
                        "--data dev-v1.1.json --data-copies 4 --models default=21140 (default %(default)s)")
    m.add_argument("--results", metavar="DIR",
                   help="keep the run as DIR/peers-<CPU class>.json and render DIR/peers-<CPU class>.md from it "
                        "(benchmarks/peers.py; the current results are benchmarks/results)")
    a = p.parse_args(argv)
    return a, from_args(a, JobConfig, only=JOB_FLAGS, input="-", output="-")


def main(argv: list[str] | None = None) -> int:
    a, job = parse_args(argv)
    PAUSE_PIDS[:] = a.pause_pid
    if a.mode == "marginal":
        started = datetime.datetime.now()
        report = marginal.main(a, job.model, job.decode.max_answer_len)
        if a.report:
            Path(a.report).write_text(json.dumps(report, indent=2, default=str))
        if a.results:
            from benchmarks import peers  # not at the top: ``python -m benchmarks.peers`` imports this package

            page = peers.keep(report, sys.argv[1:] if argv is None else argv, Path(a.results), started)
            print(f"kept: {page} (and its json)", flush=True)
        return 0
    model_dir = Path(job.model)
    fp32 = Path(a.fp32_model) if a.fp32_model else model_dir / "model-fp32.onnx"
    n = a.limit or len(squad_items(a.data, None))
    with tempfile.TemporaryDirectory(dir=a.work_dir) as work:
        setup = Setup(a.data, a.limit, model_dir, fp32 if fp32.exists() else None, a.cpus, job.batch_tokens,
                      a.rows_per_unit or max(1, math.ceil(n / 8)), max(1, a.repeats), Path(work))
        report: dict = {"args": vars(a), "cpu": cpu_name()}
        if a.mode == "tuning":
            report["tuning"] = tuning(setup, [int(b) for b in a.budgets.split(",")])
            for row in report["tuning"]:
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
        else:
            report["peak_gflops"] = in_child(matmul_peak, a.cpus)
            results = (compare(setup, a.hf_model, a.hf_weights, a.hf_batch_size, job.decode.max_answer_len,
                               "bf16" in report["peak_gflops"])
                       if a.mode == "compare" else actors(setup))
            report["results"] = [{**asdict(r), "questions_per_s": r.questions_per_s,
                                  "windows_per_s": r.windows_per_s, "useful_gflops": r.useful_gflops}
                                 for r in results]
            peak = report["peak_gflops"]
            bf16 = f", bf16 {peak['bf16']:.0f} (OpenVINO)" if "bf16" in peak else ""
            print(f"N={n} questions, {a.cpus} CPUs ({report['cpu']}, class {peak['cpu_class']}); matmul peak "
                  f"int8 {peak['int8']:.0f}, fp32 {peak['fp32']:.0f} GFLOP/s (ONNX Runtime){bf16}, "
                  f"numpy fp32 {peak['numpy_fp32']:.0f}")
            print(exact_kernel_check(peak))
            print(table(results, peak, PEER if a.mode == "compare" else results[0].name))
            print(stage_shares(results))
    if a.report:
        Path(a.report).write_text(json.dumps(report, indent=2, default=str))
    return 0
