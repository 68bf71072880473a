"""Model directories as users bring them: other input names, static shapes, vocab.txt, no token types."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from tiny_models import write_model_dir

from pipeline.answer import Answerer
from pipeline.backends import load_model
from pipeline.model_dir import ModelDirError
from pipeline.session import ModelLoadError

TABLE = pa.table({
    "question": ["who was born in paris?", "what year?", "where is the cafe?"],
    "context": ["The king of France was born in Paris in 1789. " * 12, "It was the year 1789.",
                "The Café Naïve is by the river in Zürich."],
})


def answers(model_dir, **kw):
    spec, session = load_model(str(model_dir), **kw)
    return Answerer(spec, session)(TABLE).to_pylist(), spec, session


@pytest.fixture(scope="module")
def reference(tiny_model):
    return answers(tiny_model)[0]


def same_answers(got, want):
    assert [(r["answer_start"], r["answer_end"]) for r in got] == [(r["answer_start"], r["answer_end"]) for r in want]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-3)


def test_bert_tf_input_names_and_int32(tmp_path, reference):
    d = write_model_dir(tmp_path / "m", input_names=("input_ids", "input_mask", "segment_ids"), int32_inputs=True)
    got, _, session = answers(d)
    assert session.inputs == {"input_ids": "input_ids", "attention_mask": "input_mask",
                              "token_type_ids": "segment_ids"}
    same_answers(got, reference)


def test_static_1x384_graph_is_fed_one_padded_window_at_a_time(tmp_path, reference):
    d = write_model_dir(tmp_path / "m", fixed_shape=(1, 384))
    got, spec, session = answers(d)
    assert (session.fixed_batch, session.fixed_seq_len, spec.windows.max_seq_len) == (1, 384, 384)
    same_answers(got, reference)


def test_static_128_graph_sets_window_length(tmp_path):
    d = write_model_dir(tmp_path / "m", fixed_shape=(4, 128))
    got, spec, _session = answers(d)
    assert spec.windows.max_seq_len == 128 and spec.windows.max_query_len == 64
    assert all(r["error"] is None for r in got)
    with pytest.raises(ModelDirError, match="fixes sequence length 128"):
        load_model(str(d), overrides={"max_seq_len": 256})


def test_unnamed_outputs_in_order(tmp_path, reference):
    d = write_model_dir(tmp_path / "m", output_names=("output_0", "output_1"))
    got, _, _ = answers(d)
    same_answers(got, reference)


def test_vocab_txt_equals_tokenizer_json(tmp_path, reference):
    d = write_model_dir(tmp_path / "m", tokenizer="vocab")
    got, spec, _ = answers(d)
    assert spec.tokenizer_file.name == "vocab.txt" and spec.lowercase is True  # uncased vocab detected
    same_answers(got, reference)


def test_graph_without_token_types(tmp_path):
    d = write_model_dir(tmp_path / "m", input_names=("input_ids", "attention_mask", None))
    got, _, session = answers(d)
    assert "token_type_ids" not in session.inputs
    assert all(r["answer"] for r in got)


def test_spec_file_names_inputs(tmp_path, reference):
    d = write_model_dir(tmp_path / "m", input_names=("ids", "mask_a", "types_b"),
                        spec={"inputs": {"attention_mask": "mask_a", "token_type_ids": "types_b"}})
    got, _, _ = answers(d)
    same_answers(got, reference)


def test_unknown_input_is_named(tmp_path):
    d = write_model_dir(tmp_path / "m", input_names=("input_ids", "attention_mask", "weird"))
    with pytest.raises(ModelLoadError, match="'weird'"):
        load_model(str(d))


def test_bad_model_files_are_named(tmp_path):
    d = write_model_dir(tmp_path / "m")
    (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:500])
    with pytest.raises(ModelLoadError, match="model.onnx"):
        load_model(str(d))
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelDirError, match="tokenizer.json or vocab.txt"):
        load_model(str(d))
    with pytest.raises(ModelDirError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "bad_spec").mkdir()
    d2 = write_model_dir(tmp_path / "bad_spec", spec={"max_seq_len": 384, "stride": 3})
    with pytest.raises(ModelDirError, match="unknown keys \\['stride'\\]"):
        load_model(str(d2))


def test_max_position_embeddings_caps_windows(tmp_path):
    d = write_model_dir(tmp_path / "m", max_pos=256)
    (d / "config.json").write_text(json.dumps({"max_position_embeddings": 256}))
    _, spec, _ = answers(d)
    assert spec.windows.max_seq_len == 256


def test_non_string_columns_become_row_errors(tiny_model):
    spec, session = load_model(str(tiny_model))
    out = Answerer(spec, session)(pa.table({"question": [1, 2], "context": ["a b", "c d"]})).to_pylist()
    assert [r["error"] for r in out] == ["question column has type int64, expected string"] * 2
    assert all(r["answer"] is None for r in out)


def test_a_graph_file_picks_that_variant_of_its_directory(tmp_path, reference):
    """`--model DIR/model-fp32.onnx` serves that graph with DIR's tokenizer and spec."""
    d = write_model_dir(tmp_path / "m", spec={"max_seq_len": 64})
    other = write_model_dir(tmp_path / "other", seed=7)
    (d / "model-variant.onnx").write_bytes((other / "model.onnx").read_bytes())
    got, spec, _ = answers(d / "model-variant.onnx")
    assert spec.model_file == (d / "model-variant.onnx").resolve() and spec.directory == d.resolve()
    assert spec.windows.max_seq_len == 64  # the directory's spec applies
    want, _, _ = answers(other, overrides={"max_seq_len": 64})
    same_answers(got, want)
    assert [r["score"] for r in got] != [r["score"] for r in answers(d)[0]]


def test_int8_matmul_is_exact_on_cpus_without_vnni():
    """u8 255 x s8 127 pairs overflow a 16-bit sum: without VNNI, ONNX Runtime's fast u8s8 kernel saturates
    (this CPU decides whether the default options would pass; ours must pass on every CPU)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.session import session_options

    k, n = 64, 16
    w = np.full((k, n), 127, np.int8)
    w[:, 1::2] = -128
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", n])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    x = np.full((32, k), 255, np.uint8)
    y = ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, x.astype(np.int32) @ w.astype(np.int32))
