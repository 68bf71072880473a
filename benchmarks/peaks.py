"""Matmul peaks of these cores: ONNX Runtime int8 and fp32, numpy fp32, OpenVINO bf16 where the CPU has it."""

from __future__ import annotations

import functools
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


def _paired_seconds(fns: list[Callable[[], object]], min_seconds: float) -> list[float]:
    """``_best_seconds`` for several kernels at once, their runs interleaved: a neighbour's load lands on all
    of them alike, so their ratio holds on a busy machine where separate timings drift apart."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    t_end = time.perf_counter() + min_seconds * len(fns)
    while time.perf_counter() < t_end or len(times[0]) < 3:
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


# The model's own GEMM shapes at a 4096-token batch (FFN in/out, QKV) and one large square.
PEAK_SHAPES = ((4096, 384, 1536), (4096, 1536, 384), (4096, 384, 1152), (2048, 2048, 2048))


def fast_int8_kernel_saturates(weights: tuple[int, int] = (127, -128)) -> bool:
    """Whether ONNX Runtime's fast u8 x s8 kernel gets u8 255 x s8 ``weights`` (the extremes, 8-bit by default)
    products wrong on this CPU: pairs of 8-bit ones overflow vpmaddubsw's 16-bit sums (CPUs without VNNI);
    with VNNI/AMX they are exact, and 7-bit weights (64, -64) fit on every CPU."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.cpu import KernelOptions
    from pipeline.session import session_options

    k, n = 64, 16
    w = np.full((k, n), weights[0], np.int8)
    w[:, 1::2] = weights[1]
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "sat",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", n])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    x = np.full((32, k), 255, np.uint8)
    sess = ort.InferenceSession(model, session_options(1, kernels=KernelOptions(exact_u8u8=False)),
                                providers=["CPUExecutionProvider"])
    return not np.array_equal(sess.run(None, {"x": x})[0], x.astype(np.int32) @ w.astype(np.int32))


def matmul_peak(threads: int, seconds: float = 0.5) -> dict:
    """GFLOP/s of int8 (u8 x s8 -> s32, the path dynamic quantization takes) and fp32 matmuls in ONNX Runtime
    on ``threads`` threads, with the job's session options; the best shape is the peak. int8 is measured
    twice: with the exact u8 x u8 kernels ("int8_exact") and with the fast u8 x s8 one ("int8_fast": VNNI/AMX
    where the CPU has them, else vpmaddubsw, which saturates); "int8" is the one the job's options pick on this
    CPU, "exact_kernel_cost" the fast/exact ratio, what the option would cost or costs here, and
    "fast_kernel_saturates" whether it is needed here (see exact_kernel_check). numpy fp32 (its BLAS on its
    default threads) is a cross-check."""
    import onnxruntime as ort

    from pipeline.cpu import KernelOptions, cpu_class
    from pipeline.session import asks_exact_u8u8, session_options

    out: dict = {"threads": threads, "cpu_class": cpu_class(), "shapes": {}}
    int8_variants = {"int8_exact": KernelOptions(exact_u8u8=True), "int8_fast": KernelOptions(exact_u8u8=False)}
    for int8 in (True, False):
        variants = int8_variants if int8 else {"fp32": None}
        for m, k, n in PEAK_SHAPES:
            model = _matmul_graph(m, k, n, int8)
            a = (np.random.default_rng(1).integers(0, 255, (m, k), dtype=np.uint8) if int8
                 else np.random.default_rng(1).standard_normal((m, k)).astype(np.float32))
            runs = [functools.partial(ort.InferenceSession(model, session_options(threads, kernels=kernels),
                                                           providers=["CPUExecutionProvider"]).run,
                                      None, {"A": a})
                    for kernels in variants.values()]
            for key, secs in zip(variants, _paired_seconds(runs, seconds)):
                gflops = 2 * m * k * n / secs / 1e9
                out["shapes"][f"{key.replace('_', ' ')} {m}x{k}x{n}"] = round(gflops, 1)
                out[key] = max(out.get(key, 0.0), gflops)
    out["exact_kernels_used"] = asks_exact_u8u8(session_options(threads))
    out["int8"] = out["int8_exact"] if out["exact_kernels_used"] else out["int8_fast"]
    out["exact_kernel_cost"] = out["int8_fast"] / out["int8_exact"]
    out["fast_kernel_saturates"] = fast_int8_kernel_saturates()
    a = np.random.default_rng(2).standard_normal((2048, 2048)).astype(np.float32)
    out["numpy_fp32"] = 2 * 2048**3 / _best_seconds(lambda: a @ a, seconds) / 1e9
    if openvino_available():
        out.update(openvino_bf16_peak(threads, seconds, out["shapes"]))
    return out


def exact_kernel_check(peak: dict) -> str:
    """One line on the exact-kernel option here: its cost, whether the job uses it, and a WARNING where the
    CPU table (pipeline/cpu.py) chose wrong for this CPU: the option on where the fast kernel is exact (it
    costs throughput for nothing), or off where the fast kernel saturates (worse int8 answers)."""
    used, needed = peak["exact_kernels_used"], peak["fast_kernel_saturates"]
    line = (f"int8 exact u8 x u8 kernels {peak['int8_exact']:.0f} GFLOP/s, fast u8 x s8 {peak['int8_fast']:.0f} "
            f"(option costs {peak['exact_kernel_cost']:.2f}x here); fast kernel "
            f"{'saturates' if needed else 'exact'} on this CPU, job {'uses' if used else 'does not use'} the option")
    if used and not needed:
        line += ("; WARNING: the option costs throughput where it is not needed: pipeline/cpu.py's table is "
                 f"wrong for class {peak['cpu_class']}")
    elif needed and not used:
        line += ("; WARNING: int8 answers saturate without the option: pipeline/cpu.py's table is wrong for "
                 f"class {peak['cpu_class']}")
    return line


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
