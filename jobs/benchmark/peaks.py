"""Matmul peaks of these cores: ONNX Runtime int8 and fp32, numpy fp32, OpenVINO bf16 where the CPU has it."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _matmul_graph(m: int, k: int, n: int, int8: bool):
    """A one-node ONNX graph A[m,k] @ B[k,n] with B a constant weight, as in the model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        weight = numpy_helper.from_array(rng.integers(-127, 127, (k, n), dtype=np.int8), "B")
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "B")
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        a_type = y_type = TensorProto.FLOAT
    graph = helper.make_graph([node], "mm", [helper.make_tensor_value_info("A", a_type, [m, k])],
                              [helper.make_tensor_value_info("Y", y_type, [m, n])], initializer=[weight])
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _best_seconds(fn: Callable[[], object], min_seconds: float) -> float:
    """Median over repeats (after one warm-up) until ``min_seconds`` have passed: a kernel's steady speed."""
    fn()
    times, t_end = [], time.perf_counter() + min_seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# The model's own GEMM shapes at a 4096-token batch (FFN in/out, QKV) and one large square.
PEAK_SHAPES = ((4096, 384, 1536), (4096, 1536, 384), (4096, 384, 1152), (2048, 2048, 2048))


def matmul_peak(threads: int, seconds: float = 0.5) -> dict:
    """GFLOP/s of int8 (u8 x s8 -> s32, the path dynamic quantization takes: VNNI/AMX where the CPU has
    them, else the exact u8 x u8 kernels that the job's session options ask for) and fp32 matmuls in
    ONNX Runtime on ``threads`` threads, with the job's session options; the best shape is the peak.
    numpy fp32 (its BLAS on its default threads) is a cross-check."""
    import onnxruntime as ort

    from pipeline.session import session_options

    out: dict = {"threads": threads, "shapes": {}}
    for int8 in (True, False):
        key = "int8" if int8 else "fp32"
        for m, k, n in PEAK_SHAPES:
            sess = ort.InferenceSession(_matmul_graph(m, k, n, int8), session_options(threads),
                                        providers=["CPUExecutionProvider"])
            a = (np.random.default_rng(1).integers(0, 255, (m, k), dtype=np.uint8) if int8
                 else np.random.default_rng(1).standard_normal((m, k)).astype(np.float32))
            gflops = 2 * m * k * n / _best_seconds(lambda s=sess, x=a: s.run(None, {"A": x}), seconds) / 1e9
            out["shapes"][f"{key} {m}x{k}x{n}"] = round(gflops, 1)
            out[key] = max(out.get(key, 0.0), gflops)
    a = np.random.default_rng(2).standard_normal((2048, 2048)).astype(np.float32)
    out["numpy_fp32"] = 2 * 2048**3 / _best_seconds(lambda: a @ a, seconds) / 1e9
    if openvino_available():
        out.update(openvino_bf16_peak(threads, seconds, out["shapes"]))
    return out


def openvino_available() -> bool:
    from importlib.util import find_spec

    return find_spec("openvino") is not None


def openvino_bf16_peak(threads: int, seconds: float, shapes: dict) -> dict:
    """The same fp32 matmul graphs compiled by OpenVINO with the job's bf16 settings (AMX where present);
    empty where the CPU computes them in f32 (no AMX/AVX512-BF16): then there is no bf16 to compare."""
    import openvino as ov

    from pipeline.openvino_session import compile_config

    core, best = ov.Core(), 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for m, k, n in PEAK_SHAPES:
            path = Path(tmp) / f"mm{m}x{k}x{n}.onnx"
            path.write_bytes(_matmul_graph(m, k, n, int8=False))
            compiled = core.compile_model(str(path), "CPU", compile_config(threads, "bf16"))
            if compiled.get_property("INFERENCE_PRECISION_HINT").to_string() != "bf16":
                return {}
            request = compiled.create_infer_request()
            a = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
            gflops = 2 * m * k * n / _best_seconds(lambda r=request, x=a: r.infer({0: x}), seconds) / 1e9
            shapes[f"bf16 {m}x{k}x{n}"] = round(gflops, 1)
            best = max(best, gflops)
    return {"bf16": best}
