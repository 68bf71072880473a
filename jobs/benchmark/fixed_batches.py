"""Kernel throughput of one model variant on fixed batches, in this process: windows/s, median of three rounds.

    python -m jobs.benchmark.fixed_batches VARIANT MODEL_DIR BATCH SEQ THREADS SECONDS

VARIANT: ort-fp32 (MODEL_DIR/model-fp32.onnx), ort-int8-exact / ort-int8-fast (model.onnx with and without
session.x64quantprecision), ort-int8-rr / ort-int8-rr-exact (model-int8-rr.onnx, a quantize_dynamic(...,
reduce_range=True) graph: 7-bit weights), ov-fp32 / ov-bf16 (model-fp32.onnx), ov-int8 (model-int8.xml),
torch-fp32 (MODEL_DIR a Hugging Face directory). Run each variant in a fresh process (BENCHMARKS.md: BERT-base on
a quiet machine). Random token ids: the cost of a dense encoder does not depend on them. Padding, tokenizing and
decoding are left out on purpose, to separate the kernels from the job around them.
"""
import json
import statistics
import sys
import time

import numpy as np


def main() -> None:
    variant, d, B, S, T, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(B, S)).astype(np.int64); ids[:, 0] = 101
    mask = np.ones((B, S), np.int64); tt = np.zeros((B, S), np.int64); tt[:, S // 4:] = 1
    if variant.startswith("ort"):
        import onnxruntime as ort
        f = {"ort-fp32": "model-fp32.onnx", "ort-int8-exact": "model.onnx", "ort-int8-fast": "model.onnx",
             "ort-int8-rr": "model-int8-rr.onnx", "ort-int8-rr-exact": "model-int8-rr.onnx"}[variant]
        o = ort.SessionOptions(); o.intra_op_num_threads = T; o.inter_op_num_threads = 1
        o.add_session_config_entry("session.intra_op.allow_spinning", sys.argv[7] if len(sys.argv) > 7 else "0")
        if variant.endswith("exact"): o.add_session_config_entry("session.x64quantprecision", "1")
        s = ort.InferenceSession(f"{d}/{f}", o, providers=["CPUExecutionProvider"])
        names = [i.name for i in s.get_inputs()]
        feed = {n: (ids if "ids" in n and "type" not in n else tt if "type" in n else mask).astype(np.int64 if "int64" in i.type else np.int32) for n, i in zip(names, s.get_inputs())}
        run = lambda: s.run(None, feed)
    elif variant.startswith("ov"):
        import openvino as ov
        core = ov.Core()
        f = {"ov-fp32": "model-fp32.onnx", "ov-int8": "model-int8.xml", "ov-bf16": "model-fp32.onnx"}[variant]
        cfg = {"INFERENCE_NUM_THREADS": T, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if variant == "ov-bf16": cfg["INFERENCE_PRECISION_HINT"] = "bf16"
        else: cfg["INFERENCE_PRECISION_HINT"] = "f32"
        m = core.read_model(f"{d}/{f}")
        c = core.compile_model(m, "CPU", cfg)
        req = c.create_infer_request()
        feed = {}
        for i in c.inputs:
            n = i.get_any_name()
            feed[n] = ids if "ids" in n and "type" not in n else tt if "type" in n else mask
        run = lambda: req.infer(feed)
    elif variant == "torch-fp32":
        import torch
        torch.set_num_threads(T)
        from transformers import AutoModelForQuestionAnswering
        m = AutoModelForQuestionAnswering.from_pretrained(d).eval()
        ti, tm, tt_ = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(tt)
        def run():
            with torch.inference_mode():
                m(input_ids=ti, attention_mask=tm, token_type_ids=tt_)
    run(); run()
    rates = []
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < secs:
            run(); n += 1
        rates.append(n * B / (time.perf_counter() - t0))
    print(json.dumps({"variant": variant, "B": B, "S": S, "T": T, "windows_per_s": round(statistics.median(rates), 2), "rates": [round(r, 2) for r in rates]}))


if __name__ == "__main__":
    main()
