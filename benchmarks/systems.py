"""The systems compared, each a function run in a child process that returns its raw numbers as a dict:
our job (jobs.evaluate.evaluate_model on Ray), the padded ONNX Runtime loop and the transformers pipeline; and
whether the pipeline's peers (PyTorch; optimum-intel's OpenVINO model) can run here."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.memory import ActorRss
from pipeline import squad

MODEL_FILES = ("tokenizer.json", "vocab.txt", "config.json", "qa_spec.json", "tokenizer_config.json")


def variant_dir(model_dir: Path, graph: Path, dst: Path) -> Path:
    """A model directory serving ``graph`` as model.onnx with the tokenizer and settings of ``model_dir``."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "model.onnx").symlink_to(graph.resolve())
    for name in MODEL_FILES:
        if (model_dir / name).exists():
            (dst / name).symlink_to((model_dir / name).resolve())
    return dst


def squad_items(data: str, limit: int | None) -> list[dict]:
    return squad.questions(squad.load_squad(data), limit)


def our_windows(model_dir: str, items: list[dict]) -> np.ndarray:
    """Non-padding lengths of the windows our job cuts for these questions (int64 [W])."""
    from pipeline.backends import load_model
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
    from pipeline.answer import Answerer, StageTimes
    from pipeline.backends import load_model

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

    items = squad_items(data, limit)
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


OPTIMUM_INTEL_PIP = ('pip install "optimum-intel[openvino]==2.2.0" torchvision==0.28.0 (or -e ".[bench]"), then '
                     'pip uninstall torchvision unless it is a CPU build (docs/log/, 2026-12-06)')


def optimum_intel_available() -> str | None:
    """None when optimum-intel's OpenVINO question-answering model can run in the transformers pipeline here
    (benchmarks.peer --runtime openvino), else why not, naming the pip command. Looks for the package without
    importing it (optimum.intel imports torch, transformers and OpenVINO: seconds)."""
    import importlib.util

    reason = transformers_pipeline_available()
    if reason is not None:
        return reason
    try:
        found = importlib.util.find_spec("optimum.intel") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"optimum-intel is not installed; {OPTIMUM_INTEL_PIP}"


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


def pipeline_kwargs(windows: dict, batch_size: int) -> dict:
    """The question-answering pipeline's call arguments for our window settings (see run_transformers)."""
    return {"batch_size": batch_size, "max_seq_len": windows["max_seq_len"], "doc_stride": windows["doc_stride"],
            "max_question_len": windows["max_query_len"], "max_answer_len": windows["max_answer_len"]}


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
    items = squad_items(data, limit)
    qa = pipeline("question-answering", model=hf_dir, tokenizer=hf_dir, device=-1)
    kwargs = pipeline_kwargs(windows, batch_size)
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
