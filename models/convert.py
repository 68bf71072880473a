"""Convert a QA model a user brings into a model directory the job serves (see pipeline/model_dir.py).

    python -m models.convert SRC DST [--optimize] [--quantize int8 [--calibration FILE]] [--spec REGISTRY_NAME]
    python -m models.convert --openvino-int8 DIR [--calibration FILE]   # add the OpenVINO int8 IR to DIR
    python -m models.convert --int8-7bit DIR   # add ONNX Runtime's int8 graph with 7-bit weights to DIR

SRC is one of:

- a Hugging Face checkpoint directory (config.json + model.safetensors or pytorch_model.bin), exported to ONNX
  with dynamic batch and sequence axes. Checkpoints with pruned heads (config "pruned_heads") need
  transformers < 5, which still builds per-layer head counts: ``pip install 'transformers>=4.44,<5'``.
- a TF1 BERT checkpoint directory as Google's and NVIDIA's run_squad.py write it (bert_config.json, vocab.txt,
  model.ckpt-N.index/.data-*), read with TensorFlow's checkpoint reader and exported through the same path.
- an OpenVINO IR directory (one .xml with its .bin, vocab.txt): copied, to be run by pipeline.openvino_session.
- an ONNX model directory (e.g. an optimum export): copied.

Every ONNX export is checked against the source framework's start/end logits before it is written.
``--optimize`` fuses the graph with ONNX Runtime's BERT optimizer, ``--quantize int8`` quantizes its weights
dynamically; both are checked against the fp32 graph (with a looser bound for int8).
``--quantize int8`` also writes ``model-int8.xml``/``.bin``, an NNCF post-training int8 IR for OpenVINO
(``--precision int8``), calibrated on windows cut as the job cuts them from ``--calibration FILE`` (SQuAD JSON,
or Parquet/JSON rows with question and context; default SQuAD v1.1 train) and checked against the fp32 graph's
logits on held-out windows; ``--no-openvino-int8`` skips it. ``--openvino-int8 DIR`` adds it to an existing model
directory from its ``model-fp32.onnx`` (how the default model got its IR), or makes it again, and measures the
directory's agreement record again: the record's int8 rows described the IR it replaces.
``--quantize int8`` also writes ``model-int8-7bit.onnx``, the same dynamic int8 with weights in -64..64, which
ONNX Runtime serves at ``--precision int8-7bit``: exact with the fast int8 kernel of CPUs without VNNI, where the
8-bit graph needs the slower exact kernels (pipeline/cpu.py); ``--int8-7bit DIR`` adds it to an existing directory.
``--spec NAME`` fills qa_spec.json from models/registry.py (sequence length, stride, casing, card scores).

Conversion tools are optional (the ``convert`` extra) and imported only when needed: torch + transformers (HF and
TF1 sources), tensorflow-cpu (TF1), onnx (exports, --optimize, --quantize), openvino + nncf (the int8 IR);
onnxruntime always. A missing one is named before anything is written, in one line with the pip command
(pipeline/extras.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.extras import exits_on_missing_extra, require

OPSET = 17
FP32_TOL = 1e-4  # max abs logit difference accepted between the source framework and the fp32 graph
INT8_TOL = 1.0  # int8 weights move logits; this only catches a broken graph, the card's F1 is the real check
FUSED_TOL = 1e-3  # fused attention sums in another order
# NNCF int8 quantizes activations too (static scales from calibration), so logits move more than with dynamic
# int8; like INT8_TOL this catches a broken graph, on real windows; the card's F1 is the real check.
NNCF_INT8_TOL = 2.0
CALIBRATION_QUESTIONS = 300  # NNCF's own default subset is 300 samples
CHECK_QUESTIONS = 32  # held out of calibration: the int8 IR is checked against fp32 on their windows
CALIBRATION_SEED = 0
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
FP32_EXPORT = "model-fp32.onnx"
TRANSFORMERS_4 = "pip install 'transformers>=4.44,<5'"
WHAT = "models.convert"


class ConvertError(ValueError):
    """A source cannot be converted; the message names the file and says how to fix it."""


@dataclass(frozen=True)
class ConvertOptions:
    optimize: bool = False
    quantize: str | None = None  # None or "int8"
    spec: dict | None = None  # written as qa_spec.json (keys of pipeline/model_dir.py)
    # With quantize="int8": also the NNCF int8 IR for OpenVINO (model-int8.xml). The command line turns it on
    # with --quantize int8; callers of convert() ask for it, since it needs nncf and calibration data.
    openvino_int8: bool = False
    calibration: str | None = None  # questions + contexts to calibrate on (read_calibration); None: SQuAD train
    calibration_questions: int = CALIBRATION_QUESTIONS

    def __post_init__(self) -> None:
        if self.quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {self.quantize!r}")
        if self.openvino_int8 and self.quantize != "int8":
            raise ValueError("openvino_int8 comes with quantize='int8' (--quantize int8)")
        if self.calibration_questions < 1:
            raise ValueError(f"calibration_questions must be >= 1, got {self.calibration_questions}")


@dataclass(frozen=True)
class Exported:
    """What an export produced: the torch module it came from and the BERT sizes the optimizer needs."""

    module: object  # torch.nn.Module returning (start_logits, end_logits)
    input_names: tuple[str, ...]
    num_heads: int
    hidden_size: int
    vocab_size: int
    config: dict  # Hugging Face config.json to write beside the graph


# ---------------------------------------------------------------- sources


def detect_source(src: Path) -> str:
    """'hf', 'tf1', 'openvino' or 'onnx', from the files in ``src``."""
    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory; give the directory holding the checkpoint")
    if any((src / f).exists() for f in HF_WEIGHTS) and (src / "config.json").exists():
        return "hf"
    if (src / "bert_config.json").exists() and any(src.glob("*.index")):
        return "tf1"
    if any(src.glob("*.xml")) and any(src.glob("*.bin")):
        return "openvino"
    if any(src.glob("*.onnx")):
        return "onnx"
    raise ConvertError(
        f"{src}: not a known checkpoint; expected config.json + model.safetensors/pytorch_model.bin (Hugging Face), "
        "bert_config.json + model.ckpt-*.index (TF1 BERT), model.xml + model.bin (OpenVINO IR) or model.onnx"
    )


def tf1_checkpoint_prefix(src: Path) -> Path:
    """The checkpoint prefix (model.ckpt-N): the one the `checkpoint` file names, else the highest step."""
    state = src / "checkpoint"
    if state.exists():
        m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', state.read_text(encoding="utf-8"), re.MULTILINE)
        if m and (src / (Path(m.group(1)).name + ".index")).exists():
            return src / Path(m.group(1)).name
    prefixes = [p.with_suffix("") for p in src.glob("*.index")]
    if not prefixes:
        raise ConvertError(f"{src}: no TF checkpoint (*.index) found")

    def step(p: Path) -> int:
        m = re.search(r"-(\d+)$", p.name)
        return int(m.group(1)) if m else -1

    return max(prefixes, key=lambda p: (step(p), p.name))


def read_tf1_checkpoint(prefix: Path) -> dict[str, np.ndarray]:
    """Every variable of a TF1 checkpoint as float32 numpy (AMP checkpoints keep fp32 masters; fp16 is cast)."""
    tf = require("tensorflow", "convert", WHAT)
    reader = tf.train.load_checkpoint(str(prefix))
    out = {}
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        out[name] = value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
    return out


def tf1_layer_names(i: int) -> dict[str, tuple[str, bool]]:
    """Hugging Face BERT parameter -> (Google BERT variable, transpose?) for encoder layer ``i``."""
    tf, hf = f"bert/encoder/layer_{i}/", f"bert.encoder.layer.{i}."
    pairs = {
        "attention.self.query": "attention/self/query", "attention.self.key": "attention/self/key",
        "attention.self.value": "attention/self/value", "attention.output.dense": "attention/output/dense",
        "intermediate.dense": "intermediate/dense", "output.dense": "output/dense",
    }
    names = {}
    for h, t in pairs.items():
        names[f"{hf}{h}.weight"] = (f"{tf}{t}/kernel", True)  # TF dense kernels are [in, out]; torch's [out, in]
        names[f"{hf}{h}.bias"] = (f"{tf}{t}/bias", False)
    for h, t in {"attention.output.LayerNorm": "attention/output/LayerNorm", "output.LayerNorm": "output/LayerNorm"}.items():
        names[f"{hf}{h}.weight"] = (f"{tf}{t}/gamma", False)
        names[f"{hf}{h}.bias"] = (f"{tf}{t}/beta", False)
    return names


def tf1_to_hf_state_dict(variables: dict[str, np.ndarray], num_layers: int, source: Path) -> dict[str, np.ndarray]:
    """Google BERT run_squad variables -> BertForQuestionAnswering's state dict.

    Optimizer slots (adam_m/adam_v), global_step, loss scales, the pooler and pre-training heads are ignored.
    """
    names = {
        "bert.embeddings.word_embeddings.weight": ("bert/embeddings/word_embeddings", False),
        "bert.embeddings.position_embeddings.weight": ("bert/embeddings/position_embeddings", False),
        "bert.embeddings.token_type_embeddings.weight": ("bert/embeddings/token_type_embeddings", False),
        "bert.embeddings.LayerNorm.weight": ("bert/embeddings/LayerNorm/gamma", False),
        "bert.embeddings.LayerNorm.bias": ("bert/embeddings/LayerNorm/beta", False),
        "qa_outputs.weight": ("cls/squad/output_weights", False),  # already [2, hidden]
        "qa_outputs.bias": ("cls/squad/output_bias", False),
    }
    for i in range(num_layers):
        names.update(tf1_layer_names(i))
    missing = sorted(t for t, _ in names.values() if t not in variables)
    if missing:
        raise ConvertError(
            f"{source}: checkpoint lacks {len(missing)} BERT SQuAD variables, e.g. {missing[:3]}; expected a "
            "checkpoint written by BERT's run_squad.py (with cls/squad/output_weights), not a pre-training one"
        )
    return {h: (variables[t].T if transpose else variables[t]).copy() for h, (t, transpose) in names.items()}


def hf_config_from_bert_config(bert_config: dict) -> dict:
    """Google's bert_config.json as a Hugging Face BertConfig dict.

    Google's and NVIDIA's modeling.py implement "gelu" with the tanh approximation, which Hugging Face calls
    "gelu_new"; its "gelu" is the erf form, off by ~1e-3 in the logits.
    """
    act = bert_config.get("hidden_act", "gelu")
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "type_vocab_size", "initializer_range")
    return {
        **{k: bert_config[k] for k in keys if k in bert_config},
        "model_type": "bert", "architectures": ["BertForQuestionAnswering"],
        "hidden_act": "gelu_new" if act == "gelu" else act,
        "layer_norm_eps": 1e-12,  # tf.contrib.layers.layer_norm's epsilon
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    }


# ---------------------------------------------------------------- torch modules


def _wrap(model, input_names: tuple[str, ...]):
    """A module taking the graph inputs positionally and returning (start_logits, end_logits)."""
    import torch

    class QAWrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            out = self.inner(**dict(zip(input_names, args)))
            return out.start_logits, out.end_logits

    return QAWrapper(model).eval()


def _dtype_kwarg(transformers_version: str) -> str:
    """transformers renamed from_pretrained's torch_dtype to dtype in 4.56."""
    major, minor = (int(x) for x in transformers_version.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_hf(src: Path) -> Exported:
    """A Hugging Face QA checkpoint as an eval-mode torch module, refusing one that would load wrongly."""
    import inspect

    import transformers

    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    major = int(transformers.__version__.split(".")[0])
    if config.get("pruned_heads") and major >= 5:
        raise ConvertError(
            f"{src / 'config.json'}: this checkpoint has pruned attention heads (per-layer head counts), which "
            f"transformers {transformers.__version__} no longer builds; convert it with transformers 4: "
            f"{TRANSFORMERS_4}"
        )
    # Eager attention exports as MatMul/Softmax, the pattern ONNX Runtime's BERT fusion recognizes (SDPA's is not).
    model, info = transformers.AutoModelForQuestionAnswering.from_pretrained(
        str(src), output_loading_info=True, attn_implementation="eager",
        **{_dtype_kwarg(transformers.__version__): "float32"})  # 5.x loads "auto" (checkpoint dtype) by default
    # A silently re-initialized weight means wrong answers later: refuse it now.
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing or info.get("mismatched_keys"):
        raise ConvertError(f"{src}: weights do not fit {type(model).__name__}: missing {missing[:5]}, "
                           f"mismatched {list(info.get('mismatched_keys', []))[:5]}")
    model.eval()
    accepted = inspect.signature(model.forward).parameters
    # Models without segment embeddings (DistilBERT) or with a single type (RoBERTa) get no token_type_ids input.
    use_types = "token_type_ids" in accepted and config.get("type_vocab_size", 2) > 1
    names = INPUT_NAMES if use_types else INPUT_NAMES[:2]
    heads = config.get("num_attention_heads") or config.get("n_heads") or 0
    hidden = config.get("hidden_size") or config.get("dim") or 0
    return Exported(_wrap(model, names), names, heads, hidden, config["vocab_size"], config)


def load_tf1(src: Path) -> Exported:
    """A TF1 BERT SQuAD checkpoint as BertForQuestionAnswering (same graph as Google's modeling.py)."""
    bert_config = json.loads((src / "bert_config.json").read_text(encoding="utf-8"))
    config = hf_config_from_bert_config(bert_config)
    prefix = tf1_checkpoint_prefix(src)
    state = tf1_to_hf_state_dict(read_tf1_checkpoint(prefix), config["num_hidden_layers"], prefix)
    return load_bert_qa(config, state, prefix)


def load_bert_qa(config: dict, state: dict, source: Path | str) -> Exported:
    """BertForQuestionAnswering built from a config.json dict with ``state`` (torch tensors or numpy arrays) loaded:
    TF1 checkpoints and models.train_qa's weights. A weight of the wrong shape, missing or left over is refused."""
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    # Eager attention exports as MatMul/Softmax, the pattern ONNX Runtime's BERT fusion recognizes (SDPA's is not:
    # the fused int8 graph is faster and smaller; docs/log/ has the measurement).
    model = BertForQuestionAnswering(BertConfig(**config, attn_implementation="eager"))
    wanted = model.state_dict()
    for k, v in state.items():
        if k in wanted and tuple(wanted[k].shape) != tuple(v.shape):
            raise ConvertError(f"{source}: weight {k} has shape {tuple(v.shape)}, the config implies "
                               f"{tuple(wanted[k].shape)}")
    result = model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ConvertError(f"{source}: no weight for {missing[:5]}, no place for {result.unexpected_keys[:5]}")
    model.eval()
    return Exported(_wrap(model, INPUT_NAMES), INPUT_NAMES, config["num_attention_heads"], config["hidden_size"],
                    config["vocab_size"], config)


# ---------------------------------------------------------------- ONNX


def sample_inputs(vocab_size: int, input_names: tuple[str, ...], batch: int = 2, seq: int = 24,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """int64 inputs with padding in the second row, question/context segments: what the job feeds."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab_size, (batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[1:, seq * 2 // 3:] = 0
    types = np.zeros((batch, seq), dtype=np.int64)
    types[:, seq // 3:] = 1
    return {k: v for k, v in zip(INPUT_NAMES, (ids, mask, types)) if k in input_names}


def export_onnx(exported: Exported, path: Path) -> None:
    """fp32 ONNX, opset 17, dynamic batch and sequence axes, outputs start_logits/end_logits."""
    import torch

    feeds = sample_inputs(exported.vocab_size, exported.input_names)
    axes = {0: "batch", 1: "sequence"}
    names = (*exported.input_names, "start_logits", "end_logits")
    with torch.no_grad():
        torch.onnx.export(
            exported.module, tuple(torch.from_numpy(v) for v in feeds.values()), str(path),
            input_names=list(exported.input_names), output_names=["start_logits", "end_logits"],
            dynamic_axes={n: axes for n in names}, opset_version=OPSET, dynamo=False,
        )


def torch_logits(exported: Exported, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.no_grad():
        s, e = exported.module(*(torch.from_numpy(v) for v in feeds.values()))
    return s.numpy(), e.numpy()


def onnx_logits(path: Path, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    from pipeline.session import session_options

    # The job's own options: on CPUs without VNNI the default int8 kernels saturate (see session_options).
    session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    s, e = session.run(["start_logits", "end_logits"], {k: v for k, v in feeds.items() if k in names})
    return s, e


def max_diff(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], mask: np.ndarray) -> float:
    """Largest start/end logit difference over real (unpadded) tokens."""
    keep = mask.astype(bool)
    return float(max(np.abs(x[keep] - y[keep]).max() for x, y in zip(a, b)))


def check_close(what: str, got, want, mask: np.ndarray, tol: float) -> float:
    diff = max_diff(got, want, mask)
    if not diff <= tol:
        raise ConvertError(f"{what}: start/end logits differ by {diff:.3g} from the reference (allowed {tol}); "
                           "the graph was not written")
    return diff


def optimize_onnx(src: Path, dst: Path, num_heads: int, hidden: int) -> None:
    """ONNX Runtime's BERT fusion (Attention, LayerNorm, Gelu). Heads and width 0 are read from each layer's
    graph, which keeps per-layer head counts of pruned models right."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden).save_model_to_file(str(dst))


def quantize_int8(src: Path, dst: Path, seven_bit: bool = False) -> None:
    """Dynamic int8: weights quantized once, per output channel; activations per batch at run time.

    Per-channel scales, because one scale per weight tensor lets a few large columns set the step for all
    (the default model's card, full SQuAD dev: per-tensor int8 F1 79.80, per-channel 80.76, fp32 80.83; the
    per-tensor graph was quantize_dynamic(per_channel=False) of model-fp32.onnx, served from a copy of the directory).

    ``seven_bit``: weights in -64..64 (onnxruntime's ``reduce_range``), the graph ONNX Runtime serves at
    ``--precision int8-7bit`` (pipeline/backends.py): there a u8 activation times a weight, summed in pairs, stays
    within 16 bits (2 x 255 x 64 = 32640), so the fast u8 x s8 kernel of CPUs without VNNI cannot saturate.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Fused ops (com.microsoft) defeat shape inference; their outputs are float.
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=seven_bit,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def write_int8_7bit(fp32: Path, dst: Path, feeds: dict[str, np.ndarray], reference: np.ndarray) -> float:
    """The 7-bit int8 graph of ``fp32`` at ``dst``, checked against the fp32 logits; its max difference."""
    quantize_int8(fp32, dst, seven_bit=True)
    return check_close(f"{dst} (int8, 7-bit weights)", onnx_logits(dst, feeds), reference, feeds["attention_mask"],
                       INT8_TOL)


def graph_feeds(graph: Path, model_dir: Path) -> dict[str, np.ndarray]:
    """Sample inputs for an ONNX graph, by its own input names, within the vocabulary of the directory's
    config.json (100 tokens without one)."""
    import onnxruntime as ort

    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    names = tuple(i.name for i in ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).get_inputs())
    return sample_inputs(config.get("vocab_size", 100), names)


def add_int8_7bit(model_dir: Path) -> dict:
    """Add the 7-bit int8 graph to an existing model directory, from its fp32 graph (``model-fp32.onnx``)."""
    from pipeline.backends import INT8_7BIT_GRAPH
    from pipeline.model_dir import FP32_GRAPH

    fp32 = model_dir / FP32_GRAPH
    if not fp32.exists():
        raise ConvertError(f"{model_dir}: no {FP32_GRAPH} to quantize; convert the model with --quantize int8")
    feeds = graph_feeds(fp32, model_dir)
    diff = write_int8_7bit(fp32, model_dir / INT8_7BIT_GRAPH, feeds, onnx_logits(fp32, feeds))
    return {"int8_7bit": {"graph": INT8_7BIT_GRAPH, "from": FP32_GRAPH, "max_diff": diff}}


def post_process(fp32: Path, dst: Path, options: ConvertOptions, exported: Exported | None,
                 feeds: dict[str, np.ndarray], keep_fused: Path | None = None) -> dict:
    """fp32 graph -> (optimized) -> (int8) graph at ``dst``, each step checked against the fp32 graph.

    ``keep_fused`` (with ``options.optimize``) also keeps the optimized fp32 graph there: the fair fp32 variant to
    serve and compare with the int8 one.
    """
    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        current = fp32
        reference = onnx_logits(fp32, feeds)
        mask = feeds["attention_mask"]
        if options.optimize:
            fused = Path(tmp) / "fused.onnx"
            heads, hidden = (exported.num_heads, exported.hidden_size) if exported else (0, 0)
            optimize_onnx(current, fused, 0 if _has_pruned_heads(exported) else heads,
                          0 if _has_pruned_heads(exported) else hidden)
            report["optimize_max_diff"] = check_close(f"{dst} (--optimize)", onnx_logits(fused, feeds), reference,
                                                      mask, FUSED_TOL)
            current = fused
            if keep_fused:
                shutil.copy(fused, keep_fused)
        if options.quantize == "int8":
            from pipeline.backends import INT8_7BIT_GRAPH

            q = Path(tmp) / "int8.onnx"
            quantize_int8(current, q)
            report["int8_max_diff"] = check_close(f"{dst} (--quantize int8)", onnx_logits(q, feeds), reference,
                                                  mask, INT8_TOL)
            report["int8_7bit_max_diff"] = write_int8_7bit(current, dst.with_name(INT8_7BIT_GRAPH), feeds, reference)
            current = q
        shutil.copy(current, dst)
    return report


def _has_pruned_heads(exported: Exported | None) -> bool:
    return bool(exported and exported.config.get("pruned_heads"))


# ---------------------------------------------------------------- OpenVINO int8 (NNCF)


def default_calibration() -> Path:
    """SQuAD v1.1 train, where models.train_qa reads it."""
    from models.train_qa import DEFAULT_TRAIN

    return DEFAULT_TRAIN


def calibration_file(calibration: str | Path | None) -> Path:
    """The calibration file to read, checked to exist (before anything is written)."""
    path = Path(calibration).expanduser() if calibration else default_calibration()
    if not path.is_file():
        how = "" if calibration else (" (the default, SQuAD v1.1 train); give --calibration FILE with questions and "
                                      "contexts like those the model will answer, or --no-openvino-int8")
        raise ConvertError(f"{path}: calibration data not found{how}")
    return path


def read_calibration(path: Path) -> tuple[list[str], list[str]]:
    """(questions, contexts) from a SQuAD JSON file (.json/.json.gz with "data"), a JSON list of objects with
    "question" and "context", or a Parquet table with question and context columns."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = [c for c in ("question", "context") if c not in table.column_names]
        if missing:
            raise ConvertError(f"{path}: no column {missing[0]!r} (columns: {table.column_names}); calibration "
                               "tables need question and context columns")
        rows = list(zip(table.column("question").to_pylist(), table.column("context").to_pylist()))
    elif path.name.endswith((".json", ".json.gz")):
        from pipeline import squad

        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict) and "data" in data:
            rows = [(q["question"], q["context"]) for q in squad.questions(data["data"])]
        elif isinstance(data, list) and all(isinstance(r, dict) and {"question", "context"} <= set(r) for r in data):
            rows = [(r["question"], r["context"]) for r in data]
        else:
            raise ConvertError(f"{path}: expected SQuAD JSON ({{\"data\": [...]}}) or a list of objects with "
                               "\"question\" and \"context\"")
    else:
        raise ConvertError(f"{path}: calibration data must be .parquet, .json or .json.gz")
    rows = [(q, c) for q, c in rows if isinstance(q, str) and isinstance(c, str) and q.strip() and c.strip()]
    if len(rows) < 2:
        raise ConvertError(f"{path}: {len(rows)} usable question(s); calibration needs at least 2 "
                           "(some are held out to check the int8 IR)")
    return [q for q, _ in rows], [c for _, c in rows]


def split_calibration(n: int, calibrate: int, check: int = CHECK_QUESTIONS,
                      seed: int = CALIBRATION_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the questions to calibrate on and of those held out to check on: disjoint, drawn at random
    (file order groups questions by article), at most a quarter of a small file held out."""
    order = np.random.default_rng(seed).permutation(n)
    held = min(check, max(1, n // 4))
    return order[held:held + calibrate], order[:held]


def calibration_feeds(session, windows) -> list[dict[str, np.ndarray]]:
    """One feed per window, by the graph's input names and dtypes, each at the window's own length (padding
    would enter the activation statistics) unless the graph fixes its length."""
    def feed(i: int) -> dict[str, np.ndarray]:
        w = windows.take(np.array([i]), None if session.fixed_seq_len else int(windows.lengths[i]))
        arrays = {"input_ids": w.input_ids, "attention_mask": w.attention_mask, "token_type_ids": w.token_type_ids}
        return {name: arrays[role].astype(session.dtypes[role]) for role, name in session.inputs.items()}

    return [feed(i) for i in range(len(windows))]


def write_openvino_int8(model_dir: Path, fp32_graph: Path, calibration: str | Path | None = None,
                        questions: int = CALIBRATION_QUESTIONS, threads: int | None = None) -> dict:
    """NNCF post-training int8 of ``fp32_graph`` (ONNX or IR) for OpenVINO, as ``model_dir/model-int8.xml``.

    Calibrated on the windows of ``questions`` questions of ``calibration`` (see read_calibration; None: SQuAD
    v1.1 train), cut by pipeline.windows with the directory's tokenizer and window settings, exactly as the job
    cuts them; checked against the fp32 graph's logits (OpenVINO, f32) on the windows of held-out questions.
    Nothing is written unless the check passes. ``threads``: OpenVINO threads for the check (None: all cores);
    NNCF's own inference uses every core the process may run on.
    """
    nncf = require("nncf", "convert", WHAT)
    ov = require("openvino", "convert", WHAT)
    from pipeline.backends import OPENVINO_INT8_GRAPH
    from pipeline.model_dir import load_spec
    from pipeline.openvino_session import OpenVinoQASession, split_fused_projections
    from pipeline.windows import load_tokenizer, make_windows

    threads = threads or len(os.sched_getaffinity(0))
    source = calibration_file(calibration)
    probe = load_spec(model_dir)  # input/output name overrides of the directory's qa_spec.json
    reference = OpenVinoQASession(fp32_graph, threads, probe.input_names, probe.output_names, precision="fp32")
    if reference.fixed_batch not in (None, 1):
        raise ConvertError(f"{fp32_graph}: fixes its batch at {reference.fixed_batch}; calibration feeds one "
                           "window at a time (export it with a dynamic batch axis)")
    spec = load_spec(model_dir, fixed_seq_len=reference.fixed_seq_len)
    tok = load_tokenizer(spec.tokenizer_file, spec.lowercase)
    qs, cs = read_calibration(source)
    calibrate, check = split_calibration(len(qs), questions)

    def cut(idx: np.ndarray):
        return make_windows(tok, [qs[i] for i in idx], [cs[i] for i in idx], spec.windows,
                            pad_to=reference.fixed_seq_len)[0]

    calibration_windows, check_windows = cut(calibrate), cut(check)
    items = calibration_feeds(reference, calibration_windows)
    fp32_model = ov.Core().read_model(str(fp32_graph))
    split_fused_projections(fp32_model)  # one projection each for query, key, value: their dequantization fuses
    # NNCF draws its progress bars on stdout, where the command prints its JSON report: on stderr instead
    with contextlib.redirect_stdout(sys.stderr):
        model = nncf.quantize(fp32_model, nncf.Dataset(items),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items))
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
    if not fake_quantize:
        raise ConvertError(f"{fp32_graph}: NNCF found nothing to quantize; the int8 IR was not written")
    dst = model_dir / OPENVINO_INT8_GRAPH
    with tempfile.TemporaryDirectory(dir=model_dir) as tmp:  # same file system: the moves below are renames
        staged = Path(tmp) / dst.name
        # fp32 constants kept as they are (save_model's default halves them to fp16): only NNCF's rounding.
        ov.save_model(model, str(staged), compress_to_fp16=False)
        feeds = (check_windows.input_ids, check_windows.attention_mask, check_windows.token_type_ids)
        int8 = OpenVinoQASession(staged, threads, probe.input_names, probe.output_names, precision="int8")
        diff = check_close(f"{dst} (NNCF int8)", int8.run(*feeds), reference.run(*feeds),
                           check_windows.attention_mask, NNCF_INT8_TOL)
        os.replace(staged.with_suffix(".bin"), dst.with_suffix(".bin"))
        os.replace(staged, dst)  # last: graph_file looks for the .xml
    return {"openvino_int8_max_diff": diff, "openvino_int8": {
        "graph": dst.name, "from": fp32_graph.name, "calibration": str(source),
        "calibration_questions": len(calibrate), "calibration_windows": len(calibration_windows),
        "check_questions": len(check), "check_windows": len(check_windows), "fake_quantize_ops": fake_quantize}}


# ---------------------------------------------------------------- model directory


def write_tokenizer(src: Path, dst: Path) -> str:
    """Copy the tokenizer files; tokenizer.json has its saved padding/truncation cleared (the job sets both)."""
    found = [f for f in TOKENIZER_FILES if (src / f).exists()]
    if "tokenizer.json" not in found and "vocab.txt" not in found:
        raise ConvertError(f"{src}: no tokenizer.json or vocab.txt; put the model's vocabulary beside its weights")
    for f in found:
        if f == "tokenizer.json":
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(src / f))
            tok.no_padding()
            tok.no_truncation()
            tok.save(str(dst / f))
        else:
            shutil.copy(src / f, dst / f)
    return "tokenizer.json" if "tokenizer.json" in found else "vocab.txt"


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export_checked(exported: Exported, dst: Path, options: ConvertOptions, source: str,
                   keep_fused: Path | None = None, keep_fp32: Path | None = None) -> dict:
    """The one export path (users' checkpoints and models.export_qa): the torch module -> fp32 ONNX, checked
    against the module's logits -> post_process (optimize, int8) -> the graph at ``dst``; returns the max diffs.
    ``keep_fp32`` also keeps the checked fp32 export there (what the OpenVINO int8 IR is quantized from)."""
    feeds = sample_inputs(exported.vocab_size, exported.input_names)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx"
        export_onnx(exported, fp32)
        report = {"source_max_diff": check_close(f"{source} -> ONNX", onnx_logits(fp32, feeds),
                                                 torch_logits(exported, feeds), feeds["attention_mask"], FP32_TOL)}
        report.update(post_process(fp32, dst, options, exported, feeds, keep_fused))
        if keep_fp32:
            shutil.copy(fp32, keep_fp32)
    return report


def convert_torch(src: Path, dst: Path, kind: str, options: ConvertOptions, keep_fp32: Path | None = None) -> dict:
    exported = load_hf(src) if kind == "hf" else load_tf1(src)
    report = export_checked(exported, dst / "model.onnx", options, str(src), keep_fp32=keep_fp32)
    write_json(dst / "config.json", exported.config)
    return report


def require_tools(kind: str, options: ConvertOptions) -> None:
    """Import the optional tools converting a ``kind`` source needs, so a missing one is named up front."""
    needed = {"hf": ["torch", "transformers", "onnx"], "tf1": ["torch", "transformers", "onnx", "tensorflow"],
              "onnx": ["onnx"] if options.optimize or options.quantize else []}.get(kind, [])
    for module in needed + (["openvino", "nncf"] if options.openvino_int8 else []):
        require(module, "convert", WHAT)


def convert_onnx(src: Path, dst: Path, options: ConvertOptions) -> dict:
    from pipeline.model_dir import find_model_file

    model = find_model_file(src)
    if not (options.optimize or options.quantize):
        shutil.copy(model, dst / "model.onnx")
        return {}
    return post_process(model, dst / "model.onnx", options, None, graph_feeds(model, src))


def copy_openvino(src: Path, dst: Path, options: ConvertOptions) -> dict:
    """An IR is served as is by pipeline.openvino_session: copy it as model.xml/model.bin."""
    if options.optimize or options.quantize:
        raise ConvertError(f"{src}: --optimize/--quantize apply to ONNX graphs; an OpenVINO IR is served as is")
    xmls = sorted(src.glob("*.xml"))
    if len(xmls) != 1 or not xmls[0].with_suffix(".bin").exists():
        raise ConvertError(f"{src}: expected one IR (NAME.xml with NAME.bin), found {[p.name for p in xmls]}")
    shutil.copy(xmls[0], dst / "model.xml")
    shutil.copy(xmls[0].with_suffix(".bin"), dst / "model.bin")
    return {}


def _convert_into(src: Path, dst: Path, kind: str, options: ConvertOptions, fp32: Path) -> tuple[dict, Path]:
    """The model directory's files; returns the checks' report and the fp32 graph (an hf/tf1 export quantized
    to int8 keeps its checked fp32 graph in the directory as model-fp32.onnx, which OpenVINO serves and the
    int8 IR is made from)."""
    if kind in ("hf", "tf1"):
        if options.quantize == "int8":  # model.onnx is int8: the fp32 export stays beside it, as export_qa's
            fp32 = dst / FP32_EXPORT  # does, for OpenVINO's fp32 and bf16 (what --precision auto serves on AMX)
        report = convert_torch(src, dst, kind, options, keep_fp32=fp32 if options.quantize == "int8" else None)
    elif kind == "onnx":
        from pipeline.backends import graph_file

        fp32 = graph_file(src, "openvino")  # model-fp32.onnx beside an int8 model.onnx, else the graph
        report = convert_onnx(src, dst, options)
    else:
        report = copy_openvino(src, dst, options)
    if kind != "tf1" and (src / "config.json").exists() and not (dst / "config.json").exists():
        shutil.copy(src / "config.json", dst / "config.json")
    write_tokenizer(src, dst)
    spec = {**json.loads((src / "qa_spec.json").read_text()), **(options.spec or {})} \
        if (src / "qa_spec.json").exists() else dict(options.spec or {})
    if spec:
        write_json(dst / "qa_spec.json", spec)
    return report, fp32


def write_agreement(model_dir: Path, data: str | Path | None,
                    command: str = "python -m models.convert ... --quantize int8") -> dict:
    """The model's agreement record (models/agreement.py) on questions of the calibration data (default: SQuAD
    train), into its card.json, its source naming ``command``; a summary for the report. Without the data, no
    record: auto then keeps the default model's measurements and says so."""
    from models import agreement

    path = Path(data).expanduser() if data else agreement.default_data()
    if not path.is_file():
        return {"skipped": f"{path}: no data to measure agreement on (python -m models.agreement {model_dir} "
                           "--data FILE adds the record)"}
    try:
        record = agreement.measure(model_dir, path, source=f"{command} (data {path})")
    except agreement.NoReferenceError as exc:
        return {"skipped": str(exc)}
    agreement.write(model_dir, record)
    return {v["backend"] + " " + v["precision"]: {k: v[k] for k in ("agree_f1", "f1", "batch_changes")}
            for v in record["variants"]}


def convert(src: str | Path, dst: str | Path, options: ConvertOptions = ConvertOptions()) -> dict:
    """Write a complete model directory at ``dst`` from ``src``; returns what was checked (max logit diffs)."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    kind = detect_source(src)
    require_tools(kind, options)
    if options.openvino_int8:
        calibration_file(options.calibration)
    if dst.exists() and any(dst.iterdir()):
        raise ConvertError(f"{dst}: exists and is not empty; choose a new directory or empty it")
    dst.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            report, fp32 = _convert_into(src, dst, kind, options, Path(tmp) / FP32_EXPORT)
            if options.openvino_int8:  # last: it cuts calibration windows with the directory's tokenizer and spec
                report.update(write_openvino_int8(dst, fp32, options.calibration, options.calibration_questions))
            if options.quantize == "int8":  # every variant against this model's fp32: what auto reads
                report["agreement"] = write_agreement(dst, options.calibration)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)  # never leave a half-written model directory to be served
        raise
    return {"source": str(src), "kind": kind, **report}


@exits_on_missing_extra
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", help="checkpoint directory: Hugging Face, TF1 BERT, OpenVINO IR or ONNX")
    p.add_argument("dst", nargs="?", help="model directory to write (must not exist or be empty)")
    p.add_argument("--optimize", action="store_true", help="fuse with onnxruntime.transformers.optimizer")
    p.add_argument("--quantize", choices=["int8"],
                   help="dynamic int8 weights for ONNX Runtime, and the NNCF int8 IR for OpenVINO")
    p.add_argument("--no-openvino-int8", action="store_true", help="with --quantize int8: no OpenVINO int8 IR")
    p.add_argument("--openvino-int8", metavar="DIR",
                   help="instead of SRC DST: add model-int8.xml to model directory DIR, from its fp32 graph")
    p.add_argument("--int8-7bit", metavar="DIR",
                   help="instead of SRC DST: add model-int8-7bit.onnx to model directory DIR, from its fp32 graph")
    p.add_argument("--calibration", metavar="FILE",
                   help="questions and contexts for the int8 IR's calibration: SQuAD JSON (.json/.json.gz), or "
                        ".parquet/.json rows with question and context (default: SQuAD v1.1 train)")
    p.add_argument("--calibration-questions", type=int, default=CALIBRATION_QUESTIONS,
                   help="questions whose windows calibrate the int8 IR")
    p.add_argument("--spec", metavar="NAME", help="fill qa_spec.json from this models/registry.py entry")
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--doc-stride", type=int)
    p.add_argument("--max-query-len", type=int)
    p.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None)
    a = p.parse_args(argv)
    if a.int8_7bit:
        if a.src or a.dst or a.quantize or a.optimize or a.spec or a.openvino_int8:
            p.error("--int8-7bit DIR takes no SRC DST, --quantize, --optimize, --spec or --openvino-int8")
        require("onnx", "convert", WHAT)
        d = Path(a.int8_7bit).expanduser()
        report = add_int8_7bit(d)
        print(json.dumps({"wrote": str(d / report["int8_7bit"]["graph"]), **report}, indent=2))
        return
    if a.openvino_int8:
        if a.src or a.dst or a.quantize or a.optimize or a.spec:
            p.error("--openvino-int8 DIR takes no SRC DST, --quantize, --optimize or --spec")
        from pipeline.backends import graph_file

        d = Path(a.openvino_int8).expanduser()
        for module in ("openvino", "nncf"):
            require(module, "convert", WHAT)
        report = write_openvino_int8(d, graph_file(d, "openvino"), a.calibration, a.calibration_questions)
        # A record the directory has measured the IR this one replaces: measured again, as --quantize int8 does.
        report["agreement"] = write_agreement(d, a.calibration, f"python -m models.convert --openvino-int8 {d}")
        print(json.dumps({"wrote": str(d / report["openvino_int8"]["graph"]), **report}, indent=2))
        return
    if not (a.src and a.dst):
        p.error("give SRC DST, or --openvino-int8 DIR")
    spec: dict = {}
    if a.spec:
        from models.registry import get_entry

        spec = get_entry(a.spec).qa_spec()
    given = {"max_seq_len": a.max_seq_len, "doc_stride": a.doc_stride, "max_query_len": a.max_query_len,
             "lowercase": a.lowercase}
    spec.update({k: v for k, v in given.items() if v is not None})
    options = ConvertOptions(optimize=a.optimize, quantize=a.quantize, spec=spec or None,
                             openvino_int8=a.quantize == "int8" and not a.no_openvino_int8,
                             calibration=a.calibration, calibration_questions=a.calibration_questions)
    report = convert(a.src, a.dst, options)
    print(json.dumps({"wrote": str(a.dst), **report}, indent=2))


if __name__ == "__main__":
    main()
