"""Throughput of the job against the peers a user would pick, on the same CPU, questions and weights.

Lab tooling, not part of the installed package (``pip install .`` leaves this folder out): run it from the
root of a clone of the repository, beside the project installed from it.

    python -m benchmarks --data dev-v1.1.json --limit 500 [--model DIR] [--hf-model DIR] [--cpus 2]
    python -m benchmarks --data dev-v1.1.json --limit 500 --mode actors   # 1 actor x N CPUs vs N x 1
    python -m benchmarks --data dev-v1.1.json --limit 500 --mode tuning   # token budget x spinning
    python -m benchmarks --data dev-v1.1.json --mode marginal [--models default=1000,bert-base=150] \
        [--variants='default; --precision int8'] [--bound]   # whole processes, N/(T(2N)-T(N)), against the pipeline

``marginal`` (benchmarks/marginal.py) times whole processes from outside: ``python -m jobs.answer`` at its
defaults plus each variant's flags, and the transformers pipeline (benchmarks/peer.py), each on N and 2N
questions, on the default model and on random-weight BERT-base and BERT-large made by models.convert; with
``--bound``, also our answering stage in bare processes without Ray (benchmarks/bound.py), the job's ceiling.

``compare`` (the default) measures in one run: our job (jobs.evaluate.evaluate_model, real Ray actors)
on the int8 graph and on the fp32 graph; the transformers question-answering pipeline in PyTorch on
the same weights (transformers 4.x, where that pipeline still exists); our job with --precision bf16
(OpenVINO, when installed, on the fp32 graph); and a plain ONNX Runtime loop
that pads every window to max_seq_len, batch 8, in input order, on each graph. Every system runs in
a fresh process (clean peak RSS, its own threads) with the same thread count, and is scored with
pipeline.squad. The int8 and fp32 matmul peak of these cores is measured in the same run, so that
useful-token GFLOP/s can be read as a share of what the machine can do.

Needs onnx (the matmul microbenchmark and FLOP count read or build graphs) and, for the peer,
torch + transformers<5 (skipped with a note otherwise).
"""

from benchmarks.cli import main

__all__ = ["main"]
