"""Kernel throughput of one model variant on fixed batches, in this process: windows/s, median of three rounds.

    python -m models.fixed_batches VARIANT MODEL_DIR BATCH SEQ THREADS SECONDS

Sessions are the job's own (pipeline.backends.load_model, pipeline.session.QASession), so each variant runs with
the options the job gives it; ``ort-int8-exact`` and ``ort-int8-fast`` override the int8 kernel choice to show
what the exact kernels cost. ``ort-int8-7bit`` reads ``model-int8-7bit.onnx`` (7-bit weights, ``models.convert
--int8-7bit``) as ``--precision int8-7bit`` serves it, with the fast kernel. ``torch-fp32`` reads a Hugging Face
directory, as the transformers pipeline does. Run each variant in a fresh process (docs/log/: BERT-base on a
quiet machine). Random token ids: a dense encoder's cost does not depend on them. Padding, tokenizing and
decoding are left out on purpose, to separate the kernels from the job around them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.cpu import KernelOptions, cpu_class


class Variant(NamedTuple):
    graph: str  # file in the model directory
    backend: str
    precision: str = "fp32"
    exact_u8u8: bool | None = None  # None: what pipeline.cpu chooses for this CPU


VARIANTS = {
    "ort-fp32": Variant("model-fp32.onnx", "onnxruntime"),
    "ort-int8": Variant("model.onnx", "onnxruntime", "int8-dynamic"),  # as --precision int8-dynamic
    "ort-int8-exact": Variant("model.onnx", "onnxruntime", "int8-dynamic", exact_u8u8=True),
    "ort-int8-fast": Variant("model.onnx", "onnxruntime", "int8-dynamic", exact_u8u8=False),
    "ort-int8-7bit": Variant("model-int8-7bit.onnx", "onnxruntime", "int8-7bit"),  # as --precision int8-7bit
    "ov-fp32": Variant("model-fp32.onnx", "openvino"),
    "ov-bf16": Variant("model-fp32.onnx", "openvino", "bf16"),
    "ov-int8": Variant("model-int8.xml", "openvino", "int8"),
    "ov-int8-bf16": Variant("model-int8.xml", "openvino", "int8-bf16"),
}


def vocab_size(model_dir: Path) -> int:
    """The model's vocabulary (config.json), or BERT's where it has no config."""
    config = model_dir / "config.json"
    return int(json.loads(config.read_text()).get("vocab_size", 30522)) if config.exists() else 30522


def batch(size: int, seq: int, vocab: int = 30522) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random ids inside the vocabulary (1000-29999 on BERT's: words, not special tokens)."""
    ids = np.random.default_rng(0).integers(min(1000, vocab // 2), min(30000, vocab), size=(size, seq)).astype(np.int64)
    ids[:, 0] = 101
    types = np.zeros((size, seq), np.int64)
    types[:, seq // 4:] = 1
    return ids, np.ones((size, seq), np.int64), types


def runner(name: str, model_dir: Path, threads: int, feeds) -> Callable[[], object]:
    """One call of the variant on ``feeds`` (input_ids, attention_mask, token_type_ids)."""
    if name == "torch-fp32":
        import torch
        from transformers import AutoModelForQuestionAnswering

        torch.set_num_threads(threads)
        model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
        ids, mask, types = (torch.from_numpy(a) for a in feeds)

        def run():
            with torch.inference_mode():
                return model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        return run
    v = VARIANTS[name]
    if v.exact_u8u8 is None:
        from pipeline.backends import load_model

        _, session = load_model(model_dir / v.graph, threads, backend=v.backend, precision=v.precision)
    else:
        from pipeline.session import QASession

        session = QASession(model_dir / v.graph, threads, kernels=KernelOptions(v.exact_u8u8, "forced"))
    return lambda: session.run(*feeds)


def job_variant(name: str, model_dir: Path) -> dict | None:
    """The job's (backend, precision) that serves exactly this variant's graph with its kernels, or None
    (the peer, forced kernels, or a graph the job serves under no precision): for models.card --other-shape."""
    from pipeline.backends import graph_file

    v = VARIANTS.get(name)
    if v is None or v.exact_u8u8 is not None or graph_file(model_dir, v.backend, v.precision).name != v.graph:
        return None
    return {"backend": v.backend, "precision": v.precision}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.fixed_batches")
    p.add_argument("variant", choices=[*VARIANTS, "torch-fp32"])
    p.add_argument("model_dir", type=Path)
    p.add_argument("batch", type=int)
    p.add_argument("seq", type=int)
    p.add_argument("threads", type=int)
    p.add_argument("seconds", type=float, help="length of each of the three rounds")
    a = p.parse_args(argv)
    run = runner(a.variant, a.model_dir, a.threads, batch(a.batch, a.seq, vocab_size(a.model_dir)))
    run(), run()  # warm-up
    rates = []
    for _ in range(3):
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < a.seconds:
            run()
            calls += 1
        rates.append(calls * a.batch / (time.perf_counter() - t0))
    from pipeline.model_dir import load_spec

    shape = load_spec(a.model_dir).shape
    print(json.dumps({"variant": a.variant, "job_variant": job_variant(a.variant, a.model_dir),
                      "model": str(a.model_dir), "shape": shape and {"layers": shape.layers, "hidden": shape.hidden},
                      "cpu_class": cpu_class(), "batch": a.batch, "seq": a.seq, "threads": a.threads,
                      "windows_per_s": round(statistics.median(rates), 2), "rates": [round(r, 2) for r in rates]}))


if __name__ == "__main__":
    main()
