"""``python -m models.card --measure``: a CPU class's auto_precision row in one command, from real jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec

import pytest
from conftest import REPO
from test_cpu_kernels import AVX2_EPYC, SAPPHIRE_RAPIDS, ZEN4_EPYC, cpuinfo

from models import card
from pipeline.backends import servable_variants
from pipeline.cpu import cpu_class
from pipeline.precision import parse_table

DEV = REPO.parent / "shared/data/squad/dev-v1.1.json"
QUESTIONS = 6


@pytest.mark.parametrize(("flags", "bf16"), [(AVX2_EPYC, False), (ZEN4_EPYC, True), (SAPPHIRE_RAPIDS, True)])
def test_measured_variants_leave_out_bf16_where_the_cpu_computes_it_in_f32(tmp_path, flags, bf16):
    """On a CPU without bfloat16 matmuls OpenVINO's bf16 is its f32: measuring it would put fp32 in the row
    twice, under a name auto must never pick there. The CPU is the recorded one, read by a fresh process."""
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo(flags))
    script = ("import json; from models.card import measured_variants, describe_cpu; "
              "print(json.dumps([f'{v.backend} {v.precision}' for v in measured_variants()])); print(describe_cpu())")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "QA_CPUINFO": str(path)}, check=False)
    assert done.returncode == 0, done.stderr
    variants, described = done.stdout.strip().splitlines()
    servable = {f"{v.backend} {v.precision}" for v in servable_variants(card.MODEL_DIR)}
    with_bf16 = {"openvino bf16", "openvino int8-bf16"}
    assert with_bf16 <= servable  # the default model ships both graphs bf16 reads
    assert set(json.loads(variants)) == (servable if bf16 else servable - with_bf16)
    assert "CPU class " + {AVX2_EPYC: "avx2", ZEN4_EPYC: "avx512-vnni", SAPPHIRE_RAPIDS: "amx"}[flags] in described


@pytest.mark.skipif(not DEV.exists(), reason="needs ../shared/data/squad")
def test_measure_runs_each_variant_and_makes_the_row_auto_reads(joined_ray, tmp_path):
    """On the default model's ONNX graphs alone (its int8 and fp32 graph: four variants where the CPU has bf16,
    three elsewhere), so that the test runs fewer jobs; every variant the directory can serve is measured."""
    card_before = (card.MODEL_DIR / "card.json").read_bytes()
    model = tmp_path / "model"
    model.mkdir()
    for name in ("model.onnx", "model-fp32.onnx", "config.json", "qa_spec.json", "tokenizer.json", "vocab.txt"):
        (model / name).symlink_to(card.MODEL_DIR / name)
    wanted = card.measured_variants(model)
    assert {(v.backend, v.precision) for v in wanted} >= {("onnxruntime", "int8-dynamic"), ("openvino", "fp32")}
    # A measurement before this one left its job's output: measuring again replaces it (a job refuses an output
    # that exists; the first variant's would fail here if it were kept).
    earlier = tmp_path / "measure" / f"{wanted[0].backend}-{wanted[0].precision}"
    (earlier / "answers").mkdir(parents=True)
    (earlier / "answers" / "_manifest.json").write_text("{}")
    reports = card.measure(str(DEV), QUESTIONS, tmp_path / "measure", model)
    # One real job per variant, and each served what it was asked for (the report says what the actors ran).
    assert [(r["precision"]["backend"], r["precision"]["precision"]) for r in reports] == \
        [(v.backend, v.precision) for v in wanted]
    assert all(r["count"] == QUESTIONS and r["errors"] == 0 and r["cpu_class"] == cpu_class() for r in reports)
    assert (card.MODEL_DIR / "card.json").read_bytes() == card_before  # measuring writes nothing in the repo

    cls, row = card.auto_precision_row(reports, "this machine", "2026-12-02", wrote="--measure X --limit 6")
    assert cls == cpu_class()
    by_variant = {(r["precision"]["backend"], r["precision"]["precision"]): r for r in reports}
    assert row["fp32_f1"] == round(by_variant[("openvino", "fp32")]["f1"], 2)
    assert {(v["backend"], v["precision"]): v["f1"] for v in row["variants"]} == \
        {k: round(r["f1"], 2) for k, r in by_variant.items()}
    speeds = [v["questions_per_s"] for v in row["variants"]]
    assert speeds == sorted(speeds, reverse=True)
    assert "--limit 6 --backend B --precision P" in row["source"] and "models.card --measure X" in row["source"]
    table = parse_table({"auto_precision": {cls: row}})  # what --precision auto reads
    assert {str(m.variant) for m in table[cls].variants} == {str(v) for v in wanted}
    json.dumps(row)  # the card is JSON


@pytest.mark.skipif(find_spec("torch") is None or find_spec("transformers") is None or find_spec("nncf") is None,
                    reason="a model with every graph is converted from a checkpoint: pip install -e '.[convert]'")
def test_measure_shape_times_each_served_variant_on_the_model(tmp_path):
    """On a converted model with every graph (ONNX Runtime int8 and 7-bit, the fp32 graph, the NNCF IR), each
    variant the job serves is timed in its own process, and the row entry names the model's shape."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_nncf import calibration_rows
    from tiny_sources import hf_bert_qa

    from models.convert import main as convert

    pq.write_table(pa.table(calibration_rows(12)), tmp_path / "calibration.parquet")
    convert([str(hf_bert_qa(tmp_path / "src")), str(tmp_path / "dst"), "--quantize", "int8",
             "--calibration", str(tmp_path / "calibration.parquet")])
    results = card.measure_shape(tmp_path / "dst", seconds=0.2)
    wanted = {str(v) for v in card.measured_variants(tmp_path / "dst")}
    assert {f"{r['job_variant']['backend']} {r['job_variant']['precision']}" for r in results} == wanted
    assert all(r["windows_per_s"] > 0 and (r["batch"], r["seq"], r["threads"]) == (12, 160, 1) for r in results)
    cls, entry = card.other_shape_row(results, "this machine", "2026-12-02", wrote="--measure-shape X")
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert cls == cpu_class()
    assert entry["shape"] == {"layers": config["num_hidden_layers"], "hidden": config["hidden_size"]}
    assert {f"{v['backend']} {v['precision']}" for v in entry["variants"]} == wanted
    assert "models.card --measure-shape X" in entry["source"]
