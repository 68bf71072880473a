"""pipeline.openvino_session: the OpenVINO backend gives ONNX Runtime's logits and answers, static shapes included.

Needs the optional ``openvino`` package (pip install openvino); without it these tests skip.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest
from tiny_models import write_model_dir, write_vocab

from models.convert import ConvertOptions, convert
from models.registry import REGISTRY, resolve_model
from pipeline import cpu
from pipeline.answer import Answerer
from pipeline.backends import load_model
from pipeline.model_dir import load_spec
from pipeline.session import ModelLoadError, QASession

ov = pytest.importorskip("openvino", reason="the OpenVINO backend is optional: pip install openvino")
from pipeline.openvino_session import OpenVinoQASession, split_fused_projections

OMZ_FP32 = "bert-large-uncased-whole-word-masking-squad-fp32-0001"
TABLE = pa.table({
    "question": ["who was born in paris?", "what year?", "where is the cafe?"],
    "context": ["The king of France was born in Paris in 1789. " * 12, "It was the year 1789.",
                "The Café Naïve is by the river in Zürich."],
})


def to_ir(onnx_file, xml_file):
    """IR as Open Model Zoo ships it: converted from ONNX, weights kept fp32 (save_model compresses by default)."""
    ov.save_model(ov.convert_model(str(onnx_file)), str(xml_file), compress_to_fp16=False)
    return xml_file


def windows(n=3, seq=384, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 100, (n, seq), dtype=np.int64)
    mask = np.ones((n, seq), dtype=np.int64)
    mask[1:, seq // 2:] = 0
    types = np.zeros((n, seq), dtype=np.int64)
    types[:, seq // 4:] = 1
    return ids, mask, types


def same_logits(got, want, tol=1e-4):
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and g.shape == w.shape
        assert np.abs(g - w).max() <= tol, np.abs(g - w).max()


def answer_rows(spec, session):
    rows = Answerer(spec, session)(TABLE).to_pylist()
    assert all(r["error"] is None and r["answer"] for r in rows), rows
    return rows


def test_dynamic_ir_gives_onnxruntime_logits_and_answers(tmp_path):
    d = write_model_dir(tmp_path / "m")
    xml = to_ir(d / "model.onnx", tmp_path / "ir" / "model.xml")
    session = OpenVinoQASession(xml, threads=1)
    reference = QASession(d / "model.onnx")
    assert session.inputs == reference.inputs and session.outputs == reference.outputs
    assert (session.fixed_batch, session.fixed_seq_len) == (None, None)
    assert session.seq_multiple == 1  # f32: nothing padded, on any CPU
    for precision in ("bf16", "int8-bf16", "int8"):  # 16 on AMX (bf16 granted there): batches padded to whole tiles
        assert OpenVinoQASession(xml, precision=precision).seq_multiple == cpu.seq_multiple()
    for seq in (9, 130):
        same_logits(session.run(*windows(seq=seq)), reference.run(*windows(seq=seq)))
    spec, ort_session = load_model(str(d))
    want = answer_rows(spec, ort_session)
    for multiple in {session.seq_multiple, 1, 16}:  # this CPU's, and both ways on any CPU
        session.seq_multiple = multiple
        got = answer_rows(dataclasses.replace(spec, model_file=xml), session)
        assert [(r["answer_start"], r["answer_end"]) for r in got] == [(r["answer_start"], r["answer_end"])
                                                                       for r in want]
        np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-3)


def test_static_1x384_omz_like_ir(tmp_path):
    """Open Model Zoo's BERT-large IR: fixed [1, 384] inputs, outputs output_s/output_e; fed one window a call."""
    d = write_model_dir(tmp_path / "m", tokenizer="vocab", fixed_shape=(1, 384), output_names=("output_s", "output_e"))
    xml = to_ir(d / "model.onnx", tmp_path / "ir" / "model.xml")
    session = OpenVinoQASession(xml, threads=2)
    assert (session.fixed_batch, session.fixed_seq_len, session.seq_multiple) == (1, 384, 1)
    assert session.outputs == ["output_s", "output_e"]
    same_logits(session.run(*windows(n=3)), QASession(d / "model.onnx").run(*windows(n=3)))
    spec = dataclasses.replace(load_spec(d, fixed_seq_len=session.fixed_seq_len), model_file=xml)
    assert spec.windows.max_seq_len == 384 and spec.lowercase is True
    answer_rows(spec, session)


def test_onnx_files_int32_and_named_inputs(tmp_path):
    d = write_model_dir(tmp_path / "m", input_names=("input_ids", "input_mask", "segment_ids"), int32_inputs=True)
    session = OpenVinoQASession(d / "model.onnx")
    assert session.inputs == {"input_ids": "input_ids", "attention_mask": "input_mask",
                              "token_type_ids": "segment_ids"}
    assert set(session.dtypes.values()) == {np.int32}
    same_logits(session.run(*windows(seq=40)), QASession(d / "model.onnx").run(*windows(seq=40)))


def test_errors_name_the_file(tmp_path):
    d = write_model_dir(tmp_path / "m", input_names=("input_ids", "attention_mask", "weird"))
    with pytest.raises(ModelLoadError, match="'weird'"):
        OpenVinoQASession(d / "model.onnx")
    bad = tmp_path / "bad.xml"
    bad.write_text("<net>")
    with pytest.raises(ModelLoadError, match="bad.xml"):
        OpenVinoQASession(bad)


def test_ir_directory_installs_under_its_registry_name(tmp_path):
    """An IR as omz_downloader leaves it (NAME.xml/.bin + vocab.txt) -> models/zoo/<name>/ with the card's spec."""
    d = write_model_dir(tmp_path / "m", fixed_shape=(1, 384), output_names=("output_s", "output_e"))
    src = tmp_path / "omz" / "FP32"
    to_ir(d / "model.onnx", src / f"{OMZ_FP32}.xml")
    write_vocab(src)
    zoo = tmp_path / "zoo"
    convert(src, zoo / OMZ_FP32, ConvertOptions(spec=REGISTRY[OMZ_FP32].qa_spec()))
    installed = resolve_model(OMZ_FP32, zoo)
    assert {p.name for p in installed.iterdir()} == {"model.xml", "model.bin", "vocab.txt", "qa_spec.json"}
    spec = json.loads((installed / "qa_spec.json").read_text())
    assert (spec["max_seq_len"], spec["doc_stride"], spec["lowercase"]) == (384, 128, True)
    session = OpenVinoQASession(installed / "model.xml")
    same_logits(session.run(*windows(n=2)), QASession(d / "model.onnx").run(*windows(n=2)))


def test_job_answers_with_registry_ir_and_openvino_backend(joined_ray, tmp_path):
    """End to end: `--model NAME` resolves to the installed IR, which the job runs on OpenVINO; the same
    ONNX graph with `--backend openvino` gives the same answers."""
    import os
    import subprocess
    import sys

    import pyarrow.parquet as pq
    from conftest import REPO

    d = write_model_dir(tmp_path / "m", fixed_shape=(1, 384), output_names=("output_s", "output_e"))
    src = tmp_path / "omz" / "FP32"
    to_ir(d / "model.onnx", src / f"{OMZ_FP32}.xml")
    write_vocab(src)
    zoo = tmp_path / "zoo"
    convert(src, zoo / OMZ_FP32, ConvertOptions(spec=REGISTRY[OMZ_FP32].qa_spec()))
    spec, session = load_model(str(zoo / OMZ_FP32))
    assert isinstance(session, OpenVinoQASession) and spec.windows.max_seq_len == 384
    pq.write_table(TABLE.append_column("id", pa.array(["a", "b", "c"])), tmp_path / "in.parquet")
    env = {**os.environ, "QA_MODEL_ZOO": str(zoo)}  # RAY_ADDRESS: the suite's Ray node (conftest)
    outputs = {}
    for name, args in (("ir", ["--model", OMZ_FP32]), ("onnx", ["--model", str(d), "--backend", "openvino"])):
        subprocess.run([sys.executable, "-m", "jobs.answer", "--input", str(tmp_path / "in.parquet"),
                        "--output", str(tmp_path / name), *args], cwd=REPO, env=env, check=True,
                       capture_output=True, timeout=300)
        outputs[name] = pq.read_table(tmp_path / name).sort_by("id")
    assert outputs["ir"].num_rows == 3 and outputs["ir"].column("error").null_count == 3
    assert outputs["ir"].column("answer").to_pylist() == outputs["onnx"].column("answer").to_pylist()
    manifest = json.loads((tmp_path / "ir" / "_manifest.json").read_text())
    assert manifest["model"]["model_file"].endswith("model.xml")


def test_bf16_reads_the_fp32_graph_and_stays_close_to_it(tmp_path):
    """--precision bf16: OpenVINO serves the directory's model-fp32.onnx (our int8 model.onnx uses ONNX Runtime
    ops it cannot read) with bfloat16 matmuls where the CPU has them; logits move by bf16 rounding, no more."""
    import shutil

    d = write_model_dir(tmp_path / "m")
    shutil.move(d / "model.onnx", d / "model-fp32.onnx")
    (d / "model.onnx").write_bytes(b"stands in for ONNX Runtime's int8 graph, which OpenVINO cannot read")
    spec, session = load_model(str(d), threads=1, precision="bf16")
    assert isinstance(session, OpenVinoQASession) and spec.model_file.name == "model-fp32.onnx"
    cpu_has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert session.precision == ("bf16" if cpu_has_bf16 else "f32")
    want = QASession(d / "model-fp32.onnx").run(*windows(seq=64))
    got = session.run(*windows(seq=64))
    diff = max(np.abs(g - w).max() for g, w in zip(got, want))
    assert diff <= 0.05 * max(np.abs(w).max() for w in want), diff
    if cpu_has_bf16:
        assert diff > 1e-6  # bf16 really ran: f32 would match to ~1e-6
    _, fp32_session = load_model(str(d), threads=1, backend="openvino")
    assert fp32_session.precision == "f32"
    same_logits(fp32_session.run(*windows(seq=64)), want)
    answer_rows(spec, session)



def projection_graph(transpose_b=False, axis=-1):
    """x [?, ?, 8] -> MatMul(W [8, 24]) -> Add(b) -> Split(axis, 3) -> concat of the parts in reverse order, so
    that a rewrite which mixed the parts up would change the output."""
    from openvino import opset13 as ops

    rng = np.random.default_rng(1)
    x = ops.parameter([-1, -1, 8], np.float32, name="x")
    w = rng.standard_normal((24, 8) if transpose_b else (8, 24)).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    fused = ops.add(ops.matmul(x, ops.constant(w), False, transpose_b), ops.constant(b))
    parts = ops.split(fused, ops.constant(np.int64(axis)), 3)
    return ov.Model([ops.concat([parts.output(2), parts.output(0), parts.output(1)], -1)], [x])


def test_fused_projection_split_into_one_matmul_each():
    x = np.random.default_rng(2).standard_normal((2, 5, 8)).astype(np.float32)
    core = ov.Core()

    def run(model):
        return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]

    want = run(projection_graph())
    model = projection_graph()
    assert split_fused_projections(model) == 1
    types = [op.get_type_name() for op in model.get_ordered_ops()]
    assert "Split" not in types and types.count("MatMul") == 3
    np.testing.assert_allclose(run(model), want, rtol=0, atol=1e-6)
    # Left alone: a transposed weight, a split across tokens rather than features.
    for other in (projection_graph(transpose_b=True), projection_graph(axis=1)):
        assert split_fused_projections(other) == 0
        assert "Split" in {op.get_type_name() for op in other.get_ordered_ops()}


def test_default_models_attention_projections_are_split_and_compute_the_same():
    """Our exports' fused Attention reaches OpenVINO as one QKV projection split three ways, once per layer; the
    session serves three projections instead, with the graph's own logits."""
    from jobs.config import DEFAULT_MODEL

    graph = DEFAULT_MODEL / "model-fp32.onnx"
    session = OpenVinoQASession(graph, threads=1)
    assert session.split_projections == 6  # its 6 layers
    ids, mask, types = windows(n=2, seq=40)
    raw = ov.Core().compile_model(str(graph), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    want = raw({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    same_logits(session.run(ids, mask, types), (want[raw.outputs[0]], want[raw.outputs[1]]), tol=1e-5)
