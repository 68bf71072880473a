"""Throughput of the job against the peers a user would pick, on the same CPU, questions and weights.

    python -m jobs.benchmark --data dev-v1.1.json --limit 500 [--model DIR] [--hf-model DIR] [--cpus 2]
    python -m jobs.benchmark --data dev-v1.1.json --limit 500 --mode actors   # 1 actor x N CPUs vs N x 1
    python -m jobs.benchmark --data dev-v1.1.json --limit 500 --mode tuning   # token budget x spinning

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

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from pipeline import squad

MODEL_FILES = ("tokenizer.json", "vocab.txt", "config.json", "qa_spec.json", "tokenizer_config.json")
MATMUL_OPS = {"MatMul", "Gemm", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
              "QLinearMatMul", "Attention", "QAttention", "FusedMatMul"}
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


# ---------------------------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class FlopModel:
    """Useful FLOPs of a BERT-family encoder on a window of n real (non-padding) tokens:

        2 * P * n  +  4 * L * A * n**2

    P is the number of weights that take part in a matrix multiply (every MatMul/Gemm weight of the
    graph: Q, K, V, attention output, both FFN layers, the QA head; embeddings are lookups, not
    matmuls), each costing one multiply and one add per token. The second term is attention:
    per layer Q @ K^T and softmax(QK^T) @ V each cost n * n * A multiply-adds, A being the attention
    width (heads x head size, the hidden size for BERT). Softmax, GELU, LayerNorm and quantization
    are left out: they are a few per cent and not what a matmul peak measures. Padding tokens are
    never counted, so a system that computes padding pays for it in GFLOP/s.
    """

    matmul_params: int
    layers: int
    attention_width: int

    def flops(self, lengths: np.ndarray) -> float:
        n = np.asarray(lengths, dtype=np.float64)
        return float((2.0 * self.matmul_params * n + 4.0 * self.layers * self.attention_width * n * n).sum())


def flop_model(model_file: Path) -> FlopModel:
    """P counted from the graph's matmul weights; L and A from config.json beside it, else from the graph
    (Softmax/Attention nodes, the first matmul weight's input width)."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    params, first_width = 0, None
    for node in graph.node:
        if node.op_type in MATMUL_OPS:
            for name in node.input:
                if len(shapes.get(name, ())) == 2:
                    params += math.prod(shapes[name])
                    first_width = first_width or shapes[name][0]
    config_file = model_file.parent / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    layers = config.get("num_hidden_layers") or sum(n.op_type in ("Softmax", "Attention", "QAttention")
                                                   for n in graph.node)
    return FlopModel(params, int(layers), int(config.get("hidden_size") or first_width or 0))


# ---------------------------------------------------------------------------------------------- peak


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


# ---------------------------------------------------------------------------------------------- memory


def _peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set size so far, from /proc (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        children = parents.get(todo.pop(), [])
        found.extend(children)
        todo.extend(children)
    return found


class ActorRss(threading.Thread):
    """Peak RSS of every answering actor under this process (Ray workers descend from the raylet we
    started), polled until stopped: the actors exit with the dataset, taking their VmHWM with them."""

    def __init__(self, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.interval_s, self.peaks, self._done = interval_s, {}, threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            for pid in _descendants(os.getpid()):
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"AnswerActor" in title:
                    self.peaks[pid] = max(self.peaks.get(pid, 0.0), _peak_rss_mb(pid))

    def stop(self) -> dict[int, float]:
        self._done.set()
        self.join()
        return self.peaks


# ---------------------------------------------------------------------------------------------- systems


def variant_dir(model_dir: Path, graph: Path, dst: Path) -> Path:
    """A model directory serving ``graph`` as model.onnx with the tokenizer and settings of ``model_dir``."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "model.onnx").symlink_to(graph.resolve())
    for name in MODEL_FILES:
        if (model_dir / name).exists():
            (dst / name).symlink_to((model_dir / name).resolve())
    return dst


def _items(data: str, limit: int | None) -> list[dict]:
    return squad.questions(squad.load_squad(data), limit)


def our_windows(model_dir: str, items: list[dict]) -> np.ndarray:
    """Non-padding lengths of the windows our job cuts for these questions (int64 [W])."""
    from pipeline.answer import load_model
    from pipeline.windows import load_tokenizer, make_windows

    spec, _ = load_model(model_dir)
    windows, _ = make_windows(load_tokenizer(spec.tokenizer_file, spec.lowercase), [q["question"] for q in items],
                              [q["context"] for q in items], spec.windows)
    return windows.lengths


def run_job(data: str, limit: int | None, model_dir: str, out_dir: str, concurrency: int, cpus_per_actor: int,
            batch_tokens: int, rows_per_unit: int, precision: str = "fp32") -> dict:
    """Our job end to end on a Ray started here with exactly the CPUs given; the rate is the manifest's
    (actor start and model load included, ray.init not: a cluster is up before a job is submitted)."""
    import ray

    from jobs.evaluate import evaluate_model

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=concurrency * cpus_per_actor, include_dashboard=False,
             logging_level="WARNING")  # a fresh cluster of exactly these CPUs, never one already running
    ray_init_s = time.perf_counter() - t0
    rss = ActorRss()
    rss.start()
    try:
        report = evaluate_model(data, model_dir, Path(out_dir), limit, concurrency=concurrency,
                                cpus_per_actor=cpus_per_actor, batch_tokens=batch_tokens, rows_per_unit=rows_per_unit,
                                precision=precision)
    finally:
        peaks = rss.stop()
        ray.shutdown()
    questions = report["count"]
    return {"questions": questions, "seconds": questions / report["questions_per_s_answering"],
            "f1": report["f1"], "exact_match": report["exact_match"], "windows": report["stages"]["windows"],
            "peak_rss_mb": max(peaks.values(), default=0.0),
            "extra": {"stages": report["stages"], "ray_init_s": round(ray_init_s, 2), "wall_s": report["wall_s"],
                      "until_first_actor_ready_s": report["durations_s"].get("until_first_actor_ready"),
                      "actor_rss_mb": sorted(round(v) for v in peaks.values())}}


def run_padded_loop(data: str, limit: int | None, model_dir: str, threads: int, batch: int = 8) -> dict:
    """The naive ONNX Runtime loop: our tokenizer and decoder, but every window padded to max_seq_len and
    batches of ``batch`` in input order. Timed from tokenizing to answers, model load excluded."""
    from pipeline.answer import Answerer, StageTimes, load_model

    class PaddedAnswerer(Answerer):
        def logits(self, windows):
            width = self.spec.windows.max_seq_len
            start = np.full((len(windows), width), -np.inf, dtype=np.float32)
            end = np.full_like(start, -np.inf)
            for b0 in range(0, len(windows), batch):
                w = windows.take(np.arange(b0, min(b0 + batch, len(windows))))
                pad = ((0, 0), (0, width - w.input_ids.shape[1]))
                start[b0:b0 + batch], end[b0:b0 + batch] = self.session.run(
                    np.pad(w.input_ids, pad), np.pad(w.attention_mask, pad), np.pad(w.token_type_ids, pad))
                self.times.padded_tokens += len(w) * width
            cols = windows.input_ids.shape[1]  # the decoder reads the windows' own width; the rest is padding
            return start[:, :cols], end[:, :cols]

    items = _items(data, limit)
    spec, session = load_model(model_dir, threads)
    answerer = PaddedAnswerer(spec, session)
    answerer(squad.to_table(items[:batch]))  # warm-up
    answerer.times = StageTimes()
    t0 = time.perf_counter()
    out = answerer(squad.to_table(items))
    seconds = time.perf_counter() - t0
    predictions = squad.predictions(out)
    return _in_process_result(items, predictions, seconds, answerer.times.windows,
                              {"stages": {k: getattr(answerer.times, k) for k in
                                          ("tokenize", "infer", "decode", "tokens", "padded_tokens")}})


def _in_process_result(items: list[dict], predictions: dict, seconds: float, windows: int, extra: dict) -> dict:
    import resource

    scores = squad.score(items, predictions)
    return {"questions": len(items), "seconds": seconds, "f1": scores["f1"], "exact_match": scores["exact_match"],
            "windows": windows, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "extra": extra}


def transformers_pipeline_available() -> str | None:
    """None when the transformers question-answering pipeline can run here, else why not."""
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as exc:
        return f"needs torch and transformers<5 ({exc})"
    if int(transformers.__version__.split(".")[0]) >= 5:
        return f"transformers {transformers.__version__} has no question-answering pipeline; install transformers<5"
    return None


def _fp32_weights(path: str) -> dict:
    """A state dict in fp32 from .safetensors (the model directory's bf16 copy) or a train_qa checkpoint.pt."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return {k: v.to(torch.float32) for k, v in load_file(path).items()}
    return {k: v.to(torch.float32) for k, v in torch.load(path, map_location="cpu", weights_only=False)["model"].items()}


def hf_model_dir(model_dir: str, dst: str, weights: str | None = None) -> str:
    """A Hugging Face BertForQuestionAnswering directory (fp32) from a model directory's config.json,
    tokenizer and weights (default: its weights-bf16.safetensors, loaded as fp32)."""
    os.environ.setdefault("USE_TF", "0")  # transformers 4 imports TensorFlow when it is installed
    from transformers import BertConfig, BertForQuestionAnswering

    src, out = Path(model_dir), Path(dst)
    model = BertForQuestionAnswering(BertConfig.from_pretrained(str(src)))
    model.load_state_dict(_fp32_weights(weights or str(src / "weights-bf16.safetensors")))
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "vocab.txt"):
        if (src / name).exists():
            (out / name).write_bytes((src / name).read_bytes())
    spec = json.loads((src / "qa_spec.json").read_text()) if (src / "qa_spec.json").exists() else {}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "do_lower_case": spec.get("lowercase", True), "model_max_length": 512, "tokenizer_class": "BertTokenizer"}))
    return str(out)


def run_transformers(data: str, limit: int | None, hf_dir: str, threads: int, batch_size: int,
                     windows: dict) -> dict:
    """The transformers question-answering pipeline (PyTorch eager, fp32) with our window settings.
    Its ``doc_stride`` is the overlap between windows, ours the step: the same number gives the same
    windows for every context that fits one window (nearly all of SQuAD); more windows otherwise."""
    os.environ.setdefault("USE_TF", "0")  # transformers 4 imports TensorFlow when it is installed
    import torch
    from transformers import pipeline

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    items = _items(data, limit)
    qa = pipeline("question-answering", model=hf_dir, tokenizer=hf_dir, device=-1)
    kwargs = {"batch_size": batch_size, "max_seq_len": windows["max_seq_len"], "doc_stride": windows["doc_stride"],
              "max_question_len": windows["max_query_len"], "max_answer_len": windows["max_answer_len"]}
    enc = qa.tokenizer([q["question"] for q in items], [q["context"] for q in items], truncation="only_second",
                       max_length=windows["max_seq_len"], stride=windows["doc_stride"],
                       return_overflowing_tokens=True)
    lengths = [len(ids) for ids in enc["input_ids"]]
    qa(question=[q["question"] for q in items[:batch_size]], context=[q["context"] for q in items[:batch_size]],
       **kwargs)  # warm-up
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = qa(question=[q["question"] for q in items], context=[q["context"] for q in items], **kwargs)
    seconds = time.perf_counter() - t0
    out = out if isinstance(out, list) else [out]
    predictions = {q["id"]: a["answer"] for q, a in zip(items, out)}
    result = _in_process_result(items, predictions, seconds, len(lengths),
                                {"batch_size": batch_size, "torch": torch.__version__})
    result["lengths"] = lengths
    return result


PAUSE_PIDS: list[int] = []  # --pause-pid: noisy neighbours stopped while a system is measured


def in_child(fn: Callable, *args):
    """Runs ``fn`` in a fresh spawned process: its own peak RSS, threads and imports. Processes named by
    --pause-pid are stopped (SIGSTOP) for exactly that long and always continued (SIGCONT) after."""
    try:
        for pid in PAUSE_PIDS:
            os.kill(pid, signal.SIGSTOP)
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    finally:
        for pid in PAUSE_PIDS:
            os.kill(pid, signal.SIGCONT)


def unpaused_child(fn: Callable, *args):
    """``in_child`` for preparation that is not measured: neighbours keep running."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# ---------------------------------------------------------------------------------------------- runs


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


def job_result(setup: Setup, name: str, precision: str, model_dir: Path, concurrency: int, threads: int,
               flops: float) -> Result:
    """``precision`` names the peak to compare with; "bf16" also runs the job with --precision bf16."""
    runs = []
    for i in range(setup.repeats):
        out = setup.work / f"{name.replace(' ', '-').replace('(', '').replace(')', '')}-{i}"
        runs.append(in_child(run_job, setup.data, setup.limit, str(model_dir), str(out), concurrency, threads,
                             setup.batch_tokens, setup.rows_per_unit, "bf16" if precision == "bf16" else "fp32"))
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

    items = _items(setup.data, setup.limit)
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
    items = _items(setup.data, setup.limit)
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


def run_tuning(data: str, limit: int | None, model_dir: str, threads: int, budgets: list[int],
               repeats: int) -> list[dict]:
    from pipeline.answer import Answerer, load_model
    from pipeline.session import QASession

    items = _items(data, limit)
    table = squad.to_table(items)
    spec, _ = load_model(model_dir, threads)
    sessions = {spin: QASession(spec.model_file, threads, spec.input_names, spec.output_names, spinning=spin)
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


# ---------------------------------------------------------------------------------------------- report


def table(results: list[Result], peak: dict, baseline: str | None) -> str:
    """A Markdown table; ratios are to ``baseline``'s questions/s, GFLOP/s against the peak of each
    result's precision measured in the same run."""
    base = next((r for r in results if r.name == baseline), None)
    lines = ["| system | questions/s | windows/s | F1 | EM | x peer | useful GFLOP/s | % of peak | peak RSS MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        ratio = f"{r.questions_per_s / base.questions_per_s:.2f}" if base else "-"
        share = 100 * r.useful_gflops / peak[r.precision] if peak.get(r.precision) else float("nan")
        lines.append(f"| {r.name} | {r.questions_per_s:.1f} | {r.windows_per_s:.1f} | {r.f1:.2f} | "
                     f"{r.exact_match:.2f} | {ratio} | {r.useful_gflops:.1f} | {share:.0f}% ({r.precision}) | "
                     f"{r.peak_rss_mb:.0f} |")
    return "\n".join(lines)


def stage_shares(results: list[Result]) -> str:
    """Where our job's actors spend their time: tokenize / infer / decode seconds and shares."""
    lines = []
    for r in results:
        stages = r.extra.get("stages")
        if stages:
            total = sum(stages.get(k, 0.0) for k in ("tokenize", "infer", "decode")) or 1.0
            shares = ", ".join(f"{k} {stages[k]:.2f}s ({100 * stages[k] / total:.0f}%)"
                               for k in ("tokenize", "infer", "decode") if k in stages)
            pad = stages.get("padded_tokens", 0) / max(stages.get("tokens", 1), 1)
            ready = r.extra.get("until_first_actor_ready_s")
            startup = (f"; first actor ready {ready:.1f} s after the start (model loads: "
                       f"{stages.get('model_load', 0.0):.1f} actor-s)" if ready is not None else "")
            lines.append(f"- {r.name}: {shares}; computed/real tokens {pad:.3f}; "
                         f"{r.questions / total:.1f} questions per busy actor-second{startup}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    from jobs.answer import default_model

    p = argparse.ArgumentParser(prog="qa-batch benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="SQuAD-format JSON (.json or .json.gz)")
    p.add_argument("--limit", type=int, default=500, help="first N questions in file order (default %(default)s)")
    p.add_argument("--model", default=default_model(), help="model directory (int8 model.onnx)")
    p.add_argument("--fp32-model", help="fp32 graph of the same weights (default: MODEL/model-fp32.onnx if present)")
    p.add_argument("--hf-model", help="Hugging Face model directory for the peer (default: built from MODEL's "
                                      "config.json and --hf-weights, in a temporary directory)")
    p.add_argument("--hf-weights", help="weights for that directory: .safetensors or a train_qa checkpoint.pt "
                                        "(default: MODEL/weights-bf16.safetensors, loaded as fp32)")
    p.add_argument("--hf-batch-size", type=int, default=8)
    p.add_argument("--mode", choices=("compare", "actors", "tuning"), default="compare")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs every system gets (default: all)")
    p.add_argument("--batch-tokens", type=int, default=4096,
                   help="our job's token budget per inference call (default %(default)s: fastest here, see BENCHMARKS.md)")
    p.add_argument("--budgets", default="2048,4096,8192,16384,32768", help="token budgets for --mode tuning")
    p.add_argument("--rows-per-unit", type=int, help="our job's read unit (default: limit / 8, so that actors share)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each system; the median is reported")
    p.add_argument("--max-answer-len", type=int, default=30)
    p.add_argument("--report", help="write every number as JSON here")
    p.add_argument("--pause-pid", type=int, action="append", default=[],
                   help="a noisy neighbour to SIGSTOP while each system is measured (SIGCONT right after); "
                        "repeatable")
    p.add_argument("--work-dir", help="job inputs/outputs (default: a temporary directory, removed)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    PAUSE_PIDS[:] = a.pause_pid
    model_dir = Path(a.model)
    fp32 = Path(a.fp32_model) if a.fp32_model else model_dir / "model-fp32.onnx"
    n = a.limit or len(_items(a.data, None))
    with tempfile.TemporaryDirectory(dir=a.work_dir) as work:
        setup = Setup(a.data, a.limit, model_dir, fp32 if fp32.exists() else None, a.cpus, a.batch_tokens,
                      a.rows_per_unit or max(1, math.ceil(n / 8)), max(1, a.repeats), Path(work))
        report: dict = {"args": vars(a), "cpu": cpu_name()}
        if a.mode == "tuning":
            report["tuning"] = tuning(setup, [int(b) for b in a.budgets.split(",")])
            for row in report["tuning"]:
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
        else:
            report["peak_gflops"] = in_child(matmul_peak, a.cpus)
            results = (compare(setup, a.hf_model, a.hf_weights, a.hf_batch_size, a.max_answer_len,
                               "bf16" in report["peak_gflops"])
                       if a.mode == "compare" else actors(setup))
            report["results"] = [{**asdict(r), "questions_per_s": r.questions_per_s,
                                  "windows_per_s": r.windows_per_s, "useful_gflops": r.useful_gflops}
                                 for r in results]
            peak = report["peak_gflops"]
            bf16 = f", bf16 {peak['bf16']:.0f} (OpenVINO)" if "bf16" in peak else ""
            print(f"N={n} questions, {a.cpus} CPUs ({report['cpu']}); matmul peak int8 {peak['int8']:.0f}, "
                  f"fp32 {peak['fp32']:.0f} GFLOP/s (ONNX Runtime){bf16}, numpy fp32 {peak['numpy_fp32']:.0f}")
            print(table(results, peak, PEER if a.mode == "compare" else results[0].name))
            print(stage_shares(results))
    if a.report:
        Path(a.report).write_text(json.dumps(report, indent=2, default=str))
    return 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
