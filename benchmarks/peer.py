"""The transformers question-answering pipeline as a whole process, for --mode marginal to time from outside.

    python -m benchmarks.peer --input questions.parquet --model HF_DIR --output predictions.json \\
        [--threads 2] [--batch-size 8] [--windows '{"max_seq_len": 384, ...}']

Reads the id, question and context columns of the job's input file, answers every row with
``pipeline("question-answering", model=HF_DIR, device=-1)`` (PyTorch eager, fp32) in batches, and writes
``{id: answer}``: what a user who picked the pipeline would run. No warm-up and no timing here: the caller
times the process, start to exit, and takes differences between question counts.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="Parquet with id, question and context columns")
    p.add_argument("--model", required=True, help="Hugging Face model directory (weights and tokenizer)")
    p.add_argument("--output", required=True, help="predictions JSON to write ({id: answer})")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
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
    qa = pipeline("question-answering", model=a.model, tokenizer=a.model, device=-1)
    with torch.inference_mode():
        out = qa(question=rows["question"], context=rows["context"], **pipeline_kwargs(windows, a.batch_size))
    out = out if isinstance(out, list) else [out]
    Path(a.output).write_text(json.dumps({i: r["answer"] for i, r in zip(rows["id"], out)}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
