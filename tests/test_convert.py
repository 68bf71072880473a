"""models.convert: checkpoints as users bring them -> model directories that give the source's logits and answer.

Needs the conversion tools (optional): torch + transformers, and tensorflow-cpu for the TF1 tests; the pruned-heads
test needs transformers < 5 (5.x no longer builds per-layer head counts). Without them these tests skip.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pytest
from tiny_models import vocab_tokens, write_model_dir
from tiny_sources import google_bert_variables, hf_bert_qa, hf_logits, tf_bert_squad_logits, write_tf1_checkpoint

from models.convert import ConvertError, ConvertOptions, convert, detect_source, main, quantize_int8, sample_inputs
from models.convert import onnx_logits as convert_onnx_logits
from models.registry import MODELS, REGISTRY, ModelNotFoundError, resolve_model
from pipeline.answer import Answerer
from pipeline.backends import load_model
from pipeline.model_dir import load_spec
from pipeline.session import session_options

EXTRA = ("pip install torch==2.13.0 'transformers>=4.44,<5' tensorflow-cpu openvino "
         "(the torch CPU build; see tests/test_convert.py)")


def _major(package: str) -> int | None:
    try:
        return int(version(package).split(".")[0])
    except PackageNotFoundError:
        return None


TRANSFORMERS_5 = (_major("transformers") or 0) >= 5
needs_torch = pytest.mark.skipif(find_spec("torch") is None or find_spec("transformers") is None,
                                 reason=f"converter tests need torch and transformers: {EXTRA}")
TABLE = pa.table({
    "question": ["who was born in paris?", "what year?", "where is the cafe?"],
    "context": ["The king of France was born in Paris in 1789. " * 12, "It was the year 1789.",
                "The Café Naïve is by the river in Zürich."],
})


def onnx_logits(model_dir, feeds):
    return convert_onnx_logits(model_dir / "model.onnx", feeds)  # the job's session options


def assert_same_logits(got, want, tol=1e-4):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert np.abs(g - w).max() <= tol, np.abs(g - w).max()


def assert_answers(model_dir, **overrides):
    spec, session = load_model(str(model_dir), overrides=overrides or None)
    rows = Answerer(spec, session)(TABLE).to_pylist()
    assert all(r["error"] is None and r["answer"] for r in rows), rows
    for r, ctx in zip(rows, TABLE.column("context").to_pylist()):
        assert r["answer"] == ctx[r["answer_start"]:r["answer_end"]]
    return spec, rows


def feeds_for(n_inputs=3, seq=40):
    return sample_inputs(len(vocab_tokens()), ("input_ids", "attention_mask", "token_type_ids")[:n_inputs],
                         batch=3, seq=seq, seed=1)


@needs_torch
@pytest.mark.skipif(TRANSFORMERS_5, reason=f"pruned heads need transformers < 5: {EXTRA}")
def test_pruned_heads_checkpoint_gives_transformers_logits(tmp_path):
    src = hf_bert_qa(tmp_path / "src", pruned_heads={0: [0, 2], 1: [1, 2, 3]})
    assert json.loads((src / "config.json").read_text())["pruned_heads"]
    report = convert(src, tmp_path / "dst")
    assert report["kind"] == "hf" and report["source_max_diff"] <= 1e-4
    # The graph keeps each layer's own width: 2 heads x 8 in layer 0, 1 head x 8 in layer 1.
    graph = onnx.load(str(tmp_path / "dst" / "model.onnx"))
    widths = sorted({tuple(onnx.numpy_helper.to_array(t).shape) for t in graph.graph.initializer
                     if t.name.endswith("attention.self.query.bias")})
    assert widths == [(8,), (16,)], widths
    feeds = feeds_for()
    assert_same_logits(onnx_logits(tmp_path / "dst", feeds), hf_logits(src, feeds))
    assert_answers(tmp_path / "dst")
    # ONNX Runtime's fusion must not assume one head count for all layers.
    convert(src, tmp_path / "opt", ConvertOptions(optimize=True))
    assert_same_logits(onnx_logits(tmp_path / "opt", feeds), hf_logits(src, feeds), tol=1e-3)


@needs_torch
def test_hf_checkpoint_to_onnx_dynamic_axes(tmp_path):
    src = hf_bert_qa(tmp_path / "src")
    convert(src, tmp_path / "dst")
    graph = onnx.load(str(tmp_path / "dst" / "model.onnx"))
    assert graph.opset_import[0].version >= 17
    dims = [d.dim_param for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    for seq in (7, 40, 130):  # any length, not the one exported with
        feeds = feeds_for(seq=seq)
        assert_same_logits(onnx_logits(tmp_path / "dst", feeds), hf_logits(src, feeds))
    assert {p.name for p in (tmp_path / "dst").iterdir()} >= {"model.onnx", "tokenizer.json", "config.json"}
    assert_answers(tmp_path / "dst")


@needs_torch
@pytest.mark.skipif(not TRANSFORMERS_5, reason="checks the refusal under transformers >= 5")
def test_pruned_checkpoint_is_refused_by_transformers_5(tmp_path):
    src = hf_bert_qa(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "pruned_heads": {"0": [0, 2]}}))
    with pytest.raises(ConvertError, match=r"pruned attention heads.*transformers>=4.44,<5"):
        convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


@needs_torch
def test_optimize_and_quantize(tmp_path):
    src = hf_bert_qa(tmp_path / "src")
    report = convert(src, tmp_path / "opt", ConvertOptions(optimize=True))
    assert report["optimize_max_diff"] <= 1e-3
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt" / "model.onnx")).graph.node}
    assert "Attention" in ops or "MultiHeadAttention" in ops, ops  # the fusion took
    feeds = feeds_for()
    assert_same_logits(onnx_logits(tmp_path / "opt", feeds), hf_logits(src, feeds), tol=1e-3)
    assert_answers(tmp_path / "opt")

    # 40 questions to calibrate on and to measure the agreement record on (its content: tests/test_agreement.py),
    # not SQuAD train's first 1000
    from test_agreement import sample_file

    report = convert(src, tmp_path / "int8", ConvertOptions(optimize=True, quantize="int8",
                                                            calibration=str(sample_file(tmp_path, 40))))
    assert "int8_max_diff" in report and report["int8_7bit_max_diff"] <= 1.0
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8" / "model.onnx")).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear"}, ops
    assert_answers(tmp_path / "int8")
    assert_seven_bit(tmp_path / "int8")


def int8_weights(graph: Path) -> list[np.ndarray]:
    from onnx import numpy_helper

    return [a for a in (numpy_helper.to_array(t) for t in onnx.load(str(graph)).graph.initializer)
            if a.dtype == np.int8]


def assert_seven_bit(model_dir: Path) -> None:
    """The directory's int8-7bit graph: int8 weights in -64..64 (the 8-bit graph uses the full range), the same
    logits from the fast and the exact int8 kernels on this CPU, and served by --precision int8-7bit."""
    from pipeline.backends import INT8_7BIT_GRAPH, load_model
    from pipeline.cpu import KernelOptions
    from pipeline.session import QASession

    seven = model_dir / INT8_7BIT_GRAPH
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in int8_weights(seven)) <= 64
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in int8_weights(model_dir / "model.onnx")) > 64
    f = feeds_for()
    feeds = (f["input_ids"], f["attention_mask"], f["token_type_ids"])
    fast, exact = (QASession(seven, 1, kernels=KernelOptions(e)).run(*feeds) for e in (False, True))
    assert all(np.array_equal(a, b) for a, b in zip(fast, exact, strict=True))
    _, session = load_model(model_dir, precision="int8-7bit")
    assert session.model_file == seven
    assert all(np.array_equal(a, b) for a, b in zip(session.run(*feeds), fast, strict=True))


def test_int8_scales_are_per_output_channel(tmp_path):
    """One column 50x larger than the rest: a per-tensor scale rounds the small columns to a few steps."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 32)) * 0.05).astype(np.float32)
    w[:, 0] *= 50
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [numpy_helper.from_array(w, "w")])
    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    quantize_int8(src, dst)

    scales = [numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer if "scale" in t.name]
    assert any(s.shape == (32,) for s in scales), [s.shape for s in scales]
    x = rng.standard_normal((16, 64)).astype(np.float32)
    y = ort.InferenceSession(str(dst), session_options(1), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    small = slice(1, None)
    rel = np.abs(y[:, small] - (x @ w)[:, small]).max() / np.abs((x @ w)[:, small]).max()
    assert rel < 0.05, rel  # per-tensor int8 gives ~0.3 here


@needs_torch
def test_tf1_checkpoint_128_tokens_gives_tensorflow_logits(tmp_path):
    pytest.importorskip("tensorflow", reason=f"TF1 checkpoints are read with tensorflow-cpu: {EXTRA}")
    variables = google_bert_variables(max_pos=128)
    src = write_tf1_checkpoint(tmp_path / "src", variables, max_pos=128)
    main([str(src), str(tmp_path / "dst"), "--max-seq-len", "128", "--doc-stride", "32", "--max-query-len", "32"])
    feeds = feeds_for(seq=128)
    assert_same_logits(onnx_logits(tmp_path / "dst", feeds), tf_bert_squad_logits(variables, feeds))
    spec, _ = assert_answers(tmp_path / "dst")
    assert (spec.windows.max_seq_len, spec.windows.doc_stride) == (128, 32)
    assert spec.tokenizer_file.name == "vocab.txt" and spec.lowercase is True
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["hidden_act"] == "gelu_new"


@needs_torch
def test_tf1_pretraining_checkpoint_is_refused(tmp_path):
    pytest.importorskip("tensorflow", reason=f"TF1 checkpoints are read with tensorflow-cpu: {EXTRA}")
    variables = {k: v for k, v in google_bert_variables().items() if not k.startswith("cls/squad")}
    src = write_tf1_checkpoint(tmp_path / "src", variables)
    with pytest.raises(ConvertError, match="cls/squad/output_bias"):
        convert(src, tmp_path / "dst")


def test_optimum_export_is_copied_and_served(tmp_path):
    src = write_model_dir(tmp_path / "src", spec={"max_seq_len": 256, "name": "x"})
    convert(src, tmp_path / "dst")
    assert json.loads((tmp_path / "dst" / "qa_spec.json").read_text())["max_seq_len"] == 256
    assert_answers(tmp_path / "dst")


def test_unknown_sources_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="empty: not a known checkpoint"):
        detect_source(tmp_path / "empty")
    src = write_model_dir(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep").write_text("x")
    with pytest.raises(ConvertError, match="not empty"):
        convert(src, tmp_path / "dst")


def test_registry_specs_are_valid_model_dirs(tmp_path):
    for m in MODELS:
        d = write_model_dir(tmp_path / m.slug, tokenizer="vocab", spec=m.qa_spec(), fixed_shape=m.fixed_shape)
        spec = load_spec(d, fixed_seq_len=m.fixed_shape[1] if m.fixed_shape else None)
        assert (spec.windows.max_seq_len, spec.windows.doc_stride, spec.windows.max_query_len) == (
            m.max_seq_len, m.doc_stride, m.max_query_len)
        assert spec.lowercase is m.lowercase and spec.spec["name"] == m.name
    assert REGISTRY["bert-large-uncased-whole-word-masking-squad-fp32-0001"].card_f1 == 93.21
    assert REGISTRY["nvidia/bert_tf_ckpt_base_qa_squad11_amp_128"].max_seq_len == 128


def test_resolve_model_paths_and_names(tmp_path):
    assert resolve_model(str(tmp_path), tmp_path / "zoo") == tmp_path  # a path, as is
    name = "Intel/dynamic_tinybert"
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(name, tmp_path / "zoo")
    message = str(err.value)
    assert str(tmp_path / "zoo" / "Intel--dynamic_tinybert") in message
    assert f"python -m models.convert SRC {tmp_path / 'zoo' / 'Intel--dynamic_tinybert'} --spec {name}" in message
    with pytest.raises(ModelNotFoundError, match="model.xml, model.bin"):
        resolve_model("bert-large-uncased-whole-word-masking-squad-int8-0001", tmp_path / "zoo")
    with pytest.raises(ModelNotFoundError, match="not a registry name; known names"):
        resolve_model("no/such-model", tmp_path / "zoo")
    # Installed by the converter with the registry's spec: resolves, and serves with the card's windows.
    main([str(write_model_dir(tmp_path / "export")), str(tmp_path / "zoo" / "Intel--dynamic_tinybert"),
          "--spec", name])
    d = resolve_model(name, tmp_path / "zoo")
    spec, _ = assert_answers(d)
    assert spec.spec["card"]["squad_v1.1_dev_f1"] == 88.71
