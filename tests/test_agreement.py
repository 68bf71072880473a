"""Eligibility per model: the agreement record (models/agreement.py) measures each variant against the model's own
fp32, and --precision auto serves only what answers as that fp32 does, with answers that do not depend on the
batching; the conversion writes the record."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from test_cpu_kernels import AVX2_EPYC, SAPPHIRE_RAPIDS
from test_precision_auto import CARD, ORT, OV_FP32, OV_INT8, cpuinfo
from tiny_models import write_model_dir

from models import agreement
from pipeline.precision import NodeCpu, Variant, choose, parse_record, parse_table

ov = pytest.importorskip("openvino")

CONTEXTS = ["The king of France was born in Paris in 1789 and ruled for ten years.",
            "The river runs by the city in the year one, past the old mill and the bridge.",
            "Marie studied physics in Warsaw before she moved to Paris to work on radium."]


def sample_file(tmp_path, n: int = 24):
    questions = ["who is the king?", "where does the river run?", "what did Marie study?", "when was he born?"]
    path = tmp_path / "sample.parquet"
    pq.write_table(pa.table({"question": [questions[i % 4] for i in range(n)],
                             "context": [CONTEXTS[i % 3] for i in range(n)]}), path)
    return path


def model_with_int8_ir(tiny_model, tmp_path, agrees: bool):
    """The tiny model with an "int8" IR beside it: its own graph (answers as fp32 does) or another model's, made
    with other weights (answers otherwise). OpenVINO reads it as any IR: what is measured is the agreement."""
    d = tmp_path / "model"
    shutil.copytree(tiny_model, d)
    shutil.copy(d / "model.onnx", d / "model-fp32.onnx")
    graph = d / "model.onnx" if agrees else write_model_dir(tmp_path / "other", seed=11) / "model.onnx"
    ov.save_model(ov.convert_model(str(graph)), str(d / "model-int8.xml"))
    return d


def record_for(model_dir, tmp_path) -> dict:
    record = agreement.measure(model_dir, sample_file(tmp_path), questions=24)
    agreement.write(model_dir, record)
    return record


def test_the_record_measures_each_variant_against_the_model_own_fp32(tiny_model, tmp_path):
    d = model_with_int8_ir(tiny_model, tmp_path / "disagrees", agrees=False)
    record = record_for(d, tmp_path)
    by = {(v["backend"], v["precision"]): v for v in record["variants"]}
    assert record["reference"] == {"backend": "openvino", "precision": "fp32"} and record["sample"]["gold"] is False
    assert by[("openvino", "fp32")]["agree_f1"] == 100.0 and by[("onnxruntime", "fp32")]["agree_f1"] > 99.0
    assert by[("openvino", "int8")]["agree_f1"] < 90.0  # other weights: other answers
    assert all(v["batch_changes"] == 0 for v in record["variants"])  # float graphs: no batch-mates effect
    assert json.loads((d / "card.json").read_text())["agreement"] == record
    verdicts = parse_record({"agreement": record}).verdicts()
    assert verdicts[OV_FP32] is None and "agreement F1" in verdicts[OV_INT8]


def test_auto_serves_only_what_the_record_says_agrees(tiny_model, tmp_path):
    """AVX2 nodes and made-up speeds where int8 is fastest: the class table alone rules int8 out on the default
    model's F1; the record of a model whose int8 agrees lets it in (fastest eligible), the record of one whose
    int8 disagrees keeps it out and says why."""
    table = parse_table(CARD)
    avx2 = [NodeCpu.from_flags("b", AVX2_EPYC.split())]
    served = {ORT, OV_FP32, OV_INT8}
    assert choose(table, avx2, served, ORT).variant == OV_FP32  # int8's F1 on the default model: 0.6 below
    good = parse_record({"agreement": record_for(model_with_int8_ir(tiny_model, tmp_path / "agrees", True), tmp_path)})
    chosen = choose(table, avx2, served, ORT, record=good)
    assert chosen.variant == OV_INT8 and "this model's agreement record" in chosen.reason
    bad = parse_record({"agreement": record_for(model_with_int8_ir(tiny_model, tmp_path / "disagrees", False), tmp_path)})
    chosen = choose(table, avx2, served, ORT, record=bad)
    assert chosen.variant == OV_FP32 and "openvino int8 ruled out: agreement F1" in chosen.reason
    # without a record, answers that depend on batch-mates are never served while anything else can be
    dynamic = Variant("onnxruntime", "int8-dynamic")
    card = {"auto_precision": {"avx2": {"fp32_f1": 80.0, "variants": [
        {"backend": "onnxruntime", "precision": "int8-dynamic", "f1": 80.0, "questions_per_s": 90.0},
        {"backend": "openvino", "precision": "fp32", "f1": 80.0, "questions_per_s": 30.0}]}}}
    chosen = choose(parse_table(card), avx2, {dynamic, OV_FP32}, OV_FP32)
    assert chosen.variant == OV_FP32 and "int8-dynamic ruled out: answers depend on batch-mates" in chosen.reason


def test_a_job_on_a_model_whose_int8_disagrees(joined_ray, tiny_model, tmp_path):
    """The whole job with --precision auto on a node that reads as AMX: not int8, and the manifest says why."""
    d = model_with_int8_ir(tiny_model, tmp_path, agrees=False)
    record_for(d, tmp_path)
    card = json.loads((d / "card.json").read_text())
    (d / "card.json").write_text(json.dumps({**CARD, **card}))  # made-up speeds in which int8 is fast
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(6)], "question": ["who is the king?"] * 6,
                             "context": CONTEXTS * 2}), src)
    env = {k: v for k, v in __import__("os").environ.items()}
    env["QA_CPUINFO"] = cpuinfo(tmp_path, SAPPHIRE_RAPIDS)
    done = subprocess.run([sys.executable, "-m", "jobs.answer", "--input", str(src), "--output", str(tmp_path / "out"),
                           "--model", str(d)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    precision = json.loads((tmp_path / "out" / "_manifest.json").read_text())["precision"]
    assert precision["precision"] != "int8" and "openvino int8 ruled out: agreement F1" in precision["reason"]


def test_the_conversion_writes_the_record(tmp_path):
    """models.convert --quantize int8 (without the OpenVINO IR, so no nncf needed): the directory's card holds the
    agreement of every variant it serves, measured on the calibration data's questions."""
    pytest.importorskip("transformers")
    from tiny_sources import hf_bert_qa

    from models.convert import ConvertOptions, convert

    src = hf_bert_qa(tmp_path / "src")
    report = convert(src, tmp_path / "dst", ConvertOptions(quantize="int8", openvino_int8=False,
                                                           calibration=str(sample_file(tmp_path, 40))))
    record = json.loads((tmp_path / "dst" / "card.json").read_text())["agreement"]
    variants = {(v["backend"], v["precision"]): v for v in record["variants"]}
    assert {("onnxruntime", "int8-dynamic"), ("onnxruntime", "int8-7bit"), ("openvino", "fp32")} <= set(variants)
    assert variants[("openvino", "fp32")]["agree_f1"] == 100.0 and record["sample"]["questions"] == 40
    assert report["agreement"]["onnxruntime int8-dynamic"]["batch_changes"] == \
        variants[("onnxruntime", "int8-dynamic")]["batch_changes"]
