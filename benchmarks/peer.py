"""The transformers question-answering pipeline as a whole process, for --mode marginal to time from outside.

    python -m benchmarks.peer --input questions.parquet --model HF_DIR --output predictions.json \\
        [--runtime torch|openvino] [--threads 2] [--batch-size 8] [--windows '{"max_seq_len": 384, ...}']

Reads the id, question and context columns of the job's input file, answers every row with
``pipeline("question-answering", ...)`` in batches, and writes ``{id: answer}``: what a user who picked the
pipeline would run. The model behind it (--runtime):

- ``torch`` (default): ``pipeline("question-answering", model=HF_DIR, device=-1)``, PyTorch eager, fp32.
- ``openvino``: optimum-intel's ``OVModelForQuestionAnswering.from_pretrained(HF_DIR, export=True)`` (the
  export runs here, in the timed process, as it does for a user who starts from a transformers checkpoint),
  compiled with OpenVINO's defaults (its inference precision is bf16 on CPUs with AMX or AVX512-BF16) and
  ``INFERENCE_NUM_THREADS`` = --threads, used through the same pipeline with the directory's tokenizer.
  Needs optimum-intel (``pip install "optimum-intel[openvino]==2.2.0"``; the install steps: docs/log/, 2026-12-06).

No warm-up and no timing for the caller here: the caller times the process, start to exit, and takes
differences between question counts. One line on stderr, ``peer: {...}`` (JSON), says what ran: the runtime,
its version, the inference precision OpenVINO compiled for, the threads, and the seconds the model load
(export and compile) and the answering took inside the process, for the record only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RUNTIMES = ("torch", "openvino")


def load_openvino(hf_dir: str, threads: int):
    """(pipeline, what ran) for optimum-intel's OpenVINO model of ``hf_dir``, exported here."""
    import openvino
    from optimum.intel import OVModelForQuestionAnswering
    from transformers import AutoTokenizer, pipeline

    model = OVModelForQuestionAnswering.from_pretrained(hf_dir, export=True,
                                                        ov_config={"INFERENCE_NUM_THREADS": str(threads)})
    model.compile()
    compiled = model.request
    info = {"openvino": openvino.__version__.split("-")[0]}
    for key in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "PERFORMANCE_HINT", "NUM_STREAMS"):
        try:
            value = compiled.get_property(key)
            info[key] = value.to_string() if hasattr(value, "to_string") else str(value)  # Type.bf16: "bf16"
        except RuntimeError as exc:  # a property this OpenVINO release does not report
            info[key] = f"? ({type(exc).__name__})"
    qa = pipeline("question-answering", model=model, tokenizer=AutoTokenizer.from_pretrained(hf_dir))
    return qa, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="Parquet with id, question and context columns")
    p.add_argument("--model", required=True, help="Hugging Face model directory (weights and tokenizer)")
    p.add_argument("--output", required=True, help="predictions JSON to write ({id: answer})")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch",
                   help="torch: PyTorch eager fp32 (default); openvino: optimum-intel's OpenVINO model, exported here")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads, and OpenVINO's INFERENCE_NUM_THREADS (default: all CPUs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--windows", default="{}", help="JSON: max_seq_len, doc_stride, max_query_len, max_answer_len "
                                                   "(default: 384, 128, 64, 30)")
    a = p.parse_args(argv)
    os.environ.setdefault("USE_TF", "0")  # transformers 4 imports TensorFlow when it is installed
    import pyarrow.parquet as pq
    import torch
    from transformers import pipeline

    from benchmarks.systems import pipeline_kwargs

    windows = {"max_seq_len": 384, "doc_stride": 128, "max_query_len": 64, "max_answer_len": 30,
               **json.loads(a.windows)}
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    rows = pq.read_table(a.input, columns=["id", "question", "context"]).to_pydict()
    t0 = time.perf_counter()
    if a.runtime == "openvino":
        qa, info = load_openvino(a.model, a.threads)
    else:
        qa, info = pipeline("question-answering", model=a.model, tokenizer=a.model, device=-1), {}
    t1 = time.perf_counter()
    with torch.inference_mode():
        out = qa(question=rows["question"], context=rows["context"], **pipeline_kwargs(windows, a.batch_size))
    t2 = time.perf_counter()
    out = out if isinstance(out, list) else [out]
    Path(a.output).write_text(json.dumps({i: r["answer"] for i, r in zip(rows["id"], out)}, ensure_ascii=False))
    print("peer: " + json.dumps({"runtime": a.runtime, "torch": torch.__version__, **info, "threads": a.threads,
                                 "batch_size": a.batch_size, "load_s": round(t1 - t0, 2),
                                 "answer_s": round(t2 - t1, 2)}), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
