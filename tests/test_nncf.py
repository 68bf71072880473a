"""models.convert's OpenVINO int8 IR (NNCF post-training): within tolerance of the fp32 logits, served with
--backend openvino --precision int8, calibrated on the windows the job cuts.

Needs the optional openvino and nncf packages (the convert extra); without them these tests skip.
"""

from __future__ import annotations

import json
from importlib.util import find_spec

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_models import write_model_dir

from models.convert import NNCF_INT8_TOL, ConvertError, ConvertOptions, convert, main, quantize_int8, split_calibration
from pipeline.answer import Answerer
from pipeline.backends import OPENVINO_INT8_GRAPH, load_model, resolve_backend
from pipeline.cpu import has_bf16_matmuls
from pipeline.model_dir import ModelDirError
from pipeline.session import QASession
from pipeline.windows import load_tokenizer, make_windows

ov = pytest.importorskip("openvino", reason="the OpenVINO int8 IR needs openvino: pip install openvino nncf")
pytest.importorskip("nncf", reason="the OpenVINO int8 IR is made with NNCF: pip install nncf")

TABLE = pa.table({
    "question": ["who was born in paris?", "what year?", "where is the cafe?"],
    "context": ["The king of France was born in Paris in 1789. " * 12, "It was the year 1789.",
                "The Café Naïve is by the river in Zürich."],
})
WORDS = ["the", "king", "queen", "of", "france", "was", "born", "in", "paris", "city", "river", "cafe", "naive",
         "first", "last", "year", "one", "two", "three"]


def calibration_rows(n: int = 40, seed: int = 0) -> dict[str, list[str]]:
    """Questions and contexts from the tiny vocabulary, some long enough to need several windows."""
    rng = np.random.default_rng(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS, k)) + "."

    return {"question": [f"who {text(4)}?" for _ in range(n)],
            "context": [text(int(rng.integers(8, 160))) for _ in range(n)]}


def held_out_windows(model_dir, n: int = 8):
    spec, _ = load_model(str(model_dir))
    rows = calibration_rows(n, seed=99)  # not the calibration questions
    w, _ = make_windows(load_tokenizer(spec.tokenizer_file, spec.lowercase), rows["question"], rows["context"],
                        spec.windows)
    return w


def logit_diff(got, want, mask) -> float:
    keep = mask.astype(bool)
    return float(max(np.abs(g[keep] - x[keep]).max() for g, x in zip(got, want)))


def assert_answers_every_row(model_dir):
    spec, session = load_model(str(model_dir), threads=1, backend="openvino", precision="int8")
    assert spec.model_file.name == OPENVINO_INT8_GRAPH and session.precision == "f32"  # int8 ops, f32 around them
    rows = Answerer(spec, session)(TABLE).to_pylist()
    assert all(r["error"] is None and r["answer"] for r in rows), rows
    for r, ctx in zip(rows, TABLE.column("context").to_pylist()):
        assert r["answer"] == ctx[r["answer_start"]:r["answer_end"]]


def test_int8_ir_is_within_tolerance_of_fp32_and_answers(tmp_path):
    src = write_model_dir(tmp_path / "src", spec={"max_seq_len": 64, "doc_stride": 24, "max_query_len": 16})
    pq.write_table(pa.table(calibration_rows()), tmp_path / "calibration.parquet")
    report = convert(src, tmp_path / "dst", ConvertOptions(quantize="int8", openvino_int8=True,
                                                           calibration=str(tmp_path / "calibration.parquet")))
    dst = tmp_path / "dst"
    assert {OPENVINO_INT8_GRAPH, "model-int8.bin", "model.onnx"} <= {p.name for p in dst.iterdir()}
    info = report["openvino_int8"]
    assert info["check_questions"] == 10 and info["calibration_questions"] == 30  # disjoint, a quarter held out
    assert info["calibration_windows"] > info["calibration_questions"]  # long contexts: several windows
    ops = {op.get_type_name() for op in ov.Core().read_model(str(dst / OPENVINO_INT8_GRAPH)).get_ops()}
    assert "FakeQuantize" in ops, ops  # NNCF quantized it; OpenVINO runs these as int8

    # Our own check: on windows of other questions the int8 IR stays within the converter's bound of fp32.
    w = held_out_windows(dst)
    _, int8 = load_model(str(dst), threads=1, precision="int8")  # int8 alone picks OpenVINO
    feeds = (w.input_ids, w.attention_mask, w.token_type_ids)
    got, want = int8.run(*feeds), QASession(src / "model.onnx").run(*feeds)
    diff = logit_diff(got, want, w.attention_mask)
    scale = max(np.abs(x[w.attention_mask.astype(bool)]).max() for x in want)
    assert 1e-5 < diff <= NNCF_INT8_TOL, diff  # quantized (not fp32), and close
    assert diff <= 0.25 * scale, (diff, scale)
    assert report["openvino_int8_max_diff"] <= NNCF_INT8_TOL
    assert_answers_every_row(dst)

    # int8-bf16: the same IR, its float ops in bfloat16 where this CPU has bfloat16 matmuls, else in f32
    spec, mixed = load_model(str(dst), threads=1, precision="int8-bf16")
    assert spec.model_file.name == OPENVINO_INT8_GRAPH
    assert mixed.precision == ("bf16" if has_bf16_matmuls() else "f32")
    got_mixed = mixed.run(*feeds)
    if mixed.precision == "f32":
        assert logit_diff(got_mixed, got, w.attention_mask) == 0.0  # the int8 variant exactly
    else:  # bfloat16 keeps 8 bits of mantissa: within the int8 bound again, not much more
        assert logit_diff(got_mixed, want, w.attention_mask) <= 2 * NNCF_INT8_TOL


@pytest.mark.skipif(find_spec("torch") is None or find_spec("transformers") is None,
                    reason="Hugging Face checkpoints need torch and transformers: pip install torch==2.13.0 "
                           "'transformers>=4.44,<5'")
def test_quantize_int8_on_the_command_line_writes_both_int8_graphs(tmp_path):
    """--quantize int8 on a Hugging Face checkpoint: ONNX Runtime's model.onnx and model-int8-7bit.onnx and
    OpenVINO's model-int8.xml, quantized from the checked fp32 export, which stays beside them as model-fp32.onnx
    (OpenVINO's fp32/bf16)."""
    from tiny_sources import hf_bert_qa

    src = hf_bert_qa(tmp_path / "src")
    pq.write_table(pa.table(calibration_rows(12)), tmp_path / "calibration.parquet")
    main([str(src), str(tmp_path / "dst"), "--quantize", "int8", "--calibration", str(tmp_path / "calibration.parquet")])
    names = {p.name for p in (tmp_path / "dst").iterdir()}
    assert {"model.onnx", OPENVINO_INT8_GRAPH, "model-int8.bin", "model-fp32.onnx"} <= names
    from pipeline.backends import servable_variants

    assert {str(v) for v in servable_variants(tmp_path / "dst")} == {"onnxruntime fp32", "onnxruntime int8-dynamic",
                                                                     "onnxruntime int8-7bit",
                                                                     "openvino fp32", "openvino bf16", "openvino int8",
                                                                     "openvino int8-bf16"}
    assert_answers_every_row(tmp_path / "dst")


def test_openvino_int8_adds_the_ir_to_an_exported_directory(tmp_path, capsys):
    """The default model's layout (ONNX Runtime int8 model.onnx beside model-fp32.onnx): --openvino-int8 DIR
    quantizes model-fp32.onnx, calibrated on SQuAD JSON, and measures the directory's agreement record again;
    ONNX Runtime keeps serving model.onnx."""
    d = write_model_dir(tmp_path / "m")
    (d / "model.onnx").rename(d / "model-fp32.onnx")
    quantize_int8(d / "model-fp32.onnx", d / "model.onnx")
    with pytest.raises(ModelDirError, match="--openvino-int8"):
        load_model(str(d), precision="int8")
    rows = calibration_rows(20)
    squad = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": c, "qas": [{"id": str(i), "question": q, "answers": []}]}
        for i, (q, c) in enumerate(zip(rows["question"], rows["context"]))]}]}
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    main(["--openvino-int8", str(d), "--calibration", str(tmp_path / "squad.json")])
    printed = json.loads(capsys.readouterr().out)  # the report alone: NNCF's progress bars go to stderr
    assert printed["wrote"] == str(d / "model-int8.xml") and "openvino int8" in printed["agreement"]
    # The agreement record is measured for the new IR too (what auto reads), on the calibration questions
    record = json.loads((d / "card.json").read_text())["agreement"]
    assert {(v["backend"], v["precision"]) for v in record["variants"]} >= {("openvino", "int8"),
                                                                           ("onnxruntime", "int8-dynamic")}
    assert record["sample"]["questions"] == 20 and "--openvino-int8" in record["source"]
    spec, session = load_model(str(d))
    assert spec.model_file.name == "model.onnx" and isinstance(session, QASession)
    assert_answers_every_row(d)


def test_int8_precision_and_calibration_errors(tmp_path):
    with pytest.raises(ValueError, match="int8 runs on the OpenVINO backend.*--precision int8-dynamic"):
        resolve_backend("onnxruntime", "int8")
    assert resolve_backend("auto", "int8") == "openvino"
    src = write_model_dir(tmp_path / "src")
    with pytest.raises(ConvertError, match="nothing.parquet: calibration data not found"):
        convert(src, tmp_path / "a", ConvertOptions(quantize="int8", openvino_int8=True,
                                                    calibration=str(tmp_path / "nothing.parquet")))
    pq.write_table(pa.table({"question": ["q"] * 4, "text": ["c"] * 4}), tmp_path / "bad.parquet")
    with pytest.raises(ConvertError, match="no column 'context'"):
        convert(src, tmp_path / "b", ConvertOptions(quantize="int8", openvino_int8=True,
                                                    calibration=str(tmp_path / "bad.parquet")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written is left
    with pytest.raises(ValueError, match="openvino_int8 comes with quantize='int8'"):
        ConvertOptions(openvino_int8=True)
    calibrate, check = split_calibration(1000, 300)
    assert len(calibrate) == 300 and len(check) == 32 and not set(calibrate) & set(check)
