"""The benchmark's plumbing (benchmarks/, run from the repository) on the tiny model: every system runs, is
scored and lands in the report.

Asserts nothing about speed: timings on a shared test machine mean nothing. The transformers pipeline
is exercised only where transformers<5 (the last versions with that pipeline) and torch are installed.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("onnx")

from tiny_models import bert_qa_graph, vocab_tokens

import benchmarks
from benchmarks.flops import flop_model
from benchmarks.peaks import openvino_available
from benchmarks.report import table
from benchmarks.runs import PEER, Result
from benchmarks.systems import transformers_pipeline_available

CONTEXT = "The king of France was born in Paris in 1789, the first year of the war."


def squad_file(path, n: int = 6):
    qas = [{"id": f"q{i}", "question": q, "answers": [{"text": a, "answer_start": CONTEXT.index(a)}]}
           for i, (q, a) in enumerate([("who was born in paris?", "The king of France"),
                                       ("where was the king born?", "Paris"),
                                       ("when was the king born?", "1789")] * (n // 3))]
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": CONTEXT, "qas": qas}]}]}))
    return path


def tiny_hf_model(model_dir, dst):
    """A random-weight BertForQuestionAnswering with the tiny vocabulary, saved as transformers 4 does."""
    from transformers import BertConfig, BertForQuestionAnswering

    config = BertConfig(vocab_size=len(vocab_tokens()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512)
    BertForQuestionAnswering(config).save_pretrained(str(dst))
    (dst / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    (dst / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    return dst


def test_flop_model_counts_every_matmul_weight(tmp_path):
    import onnx

    model, weights = bert_qa_graph(len(vocab_tokens()))
    onnx.save(model, str(tmp_path / "model.onnx"))
    cost = flop_model(tmp_path / "model.onnx")
    matmul_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    assert cost.matmul_params == sum(weights[w].size for w in matmul_weights if w in weights)
    assert cost.layers == 2 and cost.attention_width == 32
    # Padding is never counted: the cost grows with real tokens only, quadratically through attention.
    one, two = cost.flops(np.array([10])), cost.flops(np.array([20]))
    assert two == pytest.approx(2 * 2 * cost.matmul_params * 10 + 4 * 2 * 32 * 400)
    assert one < two < 4 * one


END_TO_END = pytest.mark.skipif(not os.environ.get("QA_BENCHMARK_E2E"), reason=(
    "whole benchmark runs (fresh processes, each job on its own local Ray): a minute or more on 2 cores, kept out "
    "of the default suite (CONTRIBUTING.md: tests); set QA_BENCHMARK_E2E=1"))


@END_TO_END
def test_compare_runs_every_system(tiny_model, tmp_path):
    """Every system of --mode compare in its own process (six on this CPU), in one report."""
    args = ["--data", str(squad_file(tmp_path / "squad.json")), "--limit", "6", "--model", str(tiny_model),
            "--cpus", "1", "--report", str(tmp_path / "report.json"), "--work-dir", str(tmp_path),
            "--fp32-model", str(tiny_model / "model.onnx")]  # the tiny graph is fp32: it stands in for both
    peer = transformers_pipeline_available() is None
    if peer:
        args += ["--hf-model", str(tiny_hf_model(tiny_model, tmp_path / "hf"))]
    assert benchmarks.main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    names = [r["name"] for r in report["results"]]
    assert names[0] == "our job int8" and "ORT loop pad-384 b8 int8" in names
    assert (PEER in names) == peer
    assert "our job fp32" in names and "ORT loop pad-384 b8 fp32" in names
    bf16 = "bf16" in report["peak_gflops"]  # OpenVINO installed and the CPU computes bf16 (AMX, AVX512-BF16)
    assert bf16 <= openvino_available()
    assert ("our job bf16 (OpenVINO)" in names) == bf16
    for r in report["results"]:
        assert r["questions"] == 6 and r["windows"] >= 6
        assert 0 <= r["f1"] <= 100 and r["useful_flops"] > 0 and r["peak_rss_mb"] > 0
    assert report["peak_gflops"]["int8"] > 0 and report["peak_gflops"]["fp32"] > 0
    peak = report["peak_gflops"]  # int8 with and without the exact kernels, their ratio, the CPU class
    assert peak["int8_exact"] > 0 and peak["int8_fast"] > 0 and peak["exact_kernel_cost"] > 0
    assert peak["int8"] == (peak["int8_exact"] if peak["exact_kernels_used"] else peak["int8_fast"])
    assert isinstance(peak["fast_kernel_saturates"], bool) and peak["cpu_class"]
    job = report["results"][0]["extra"]
    assert job["stages"]["windows"] == report["results"][0]["windows"]
    assert len(job["actor_rss_mb"]) == 1  # one actor, found among the job's processes


def test_table_reports_ratios_to_the_peer():
    results = [Result("ours", "int8", 100, 110, 2.0, 80.0, 70.0, 4e11, 300.0),
               Result(PEER, "fp32", 100, 105, 10.0, 80.5, 71.0, 4e11, 500.0)]
    text = table(results, {"int8": 400.0, "fp32": 100.0}, PEER)
    ours = text.splitlines()[2]
    assert "| 50.0 |" in ours and "| 5.00 |" in ours and "| 200.0 | 50% (int8) |" in ours


def test_tuning_scores_every_budget(tiny_model, tmp_path):
    args = ["--data", str(squad_file(tmp_path / "squad.json")), "--limit", "6", "--model", str(tiny_model),
            "--cpus", "1", "--mode", "tuning", "--budgets", "64,4096", "--report", str(tmp_path / "report.json")]
    assert benchmarks.main(args) == 0
    rows = json.loads((tmp_path / "report.json").read_text())["tuning"]
    assert sorted((r["spinning"], r["batch_tokens"]) for r in rows) == [(False, 64), (False, 4096),
                                                                          (True, 64), (True, 4096)]
    # The tiny graph is fp32: batching changes no answer, so every budget scores the same.
    assert len({r["f1"] for r in rows}) == 1 and all(r["questions_per_s"] > 0 for r in rows)


def test_tuning_spins_where_the_job_does_not(tiny_model):
    """Spinning is the benchmark's own session option: the job's sessions keep it off."""
    from benchmarks.runs import spinning_session_class
    from pipeline.session import ALLOW_SPINNING_KEY, QASession

    def spins(session) -> str:
        return session._session.get_session_options().get_session_config_entry(ALLOW_SPINNING_KEY)

    assert spins(QASession(tiny_model / "model.onnx")) == "0"
    assert spins(spinning_session_class()(tiny_model / "model.onnx")) == "1"


def test_marginal_rate_is_n_over_the_extra_seconds():
    from benchmarks.marginal import marginal_rate

    # 100 more questions took 15 - 10 = 5 s more: 20 q/s, whatever the fixed start-up cost.
    assert marginal_rate(100, 10.0, 15.0) == pytest.approx(20.0)
    assert marginal_rate(100, 40.0, 45.0) == pytest.approx(20.0)
    assert np.isnan(marginal_rate(100, 15.0, 15.0)) and np.isnan(marginal_rate(100, 16.0, 15.0))


def test_marginal_table_names_the_cpu_class_and_ratios():
    from benchmarks.marginal import PEER_NAME, Row, Run, header, marginal_table, parse_variants
    from benchmarks.report import cpu_name
    from pipeline.cpu import cpu_class

    line = header("default", 50, 2)
    assert f"(CPU class {cpu_class()})" in line and cpu_name() in line and "N=50 and 2N=100" in line
    ours, peer = Row("our job, default", 50), Row(PEER_NAME, 50)
    ours.runs_n = [Run(50, 12.0, 55, {}, load=1.5, cpu_seconds=20.0)]
    ours.runs_2n = [Run(100, 17.0, 110, {}, load=2.0, cpu_seconds=30.0)]
    peer.runs_n, peer.runs_2n = [Run(50, 8.0, 50, {}, cpu_seconds=10.0)], [Run(100, 18.0, 100, {}, cpu_seconds=35.0)]
    rows = marginal_table([ours, peer], [], PEER_NAME, with_f1=False).splitlines()
    # 50 more questions in 5 s more: 10 q/s; 55 more windows: 11 windows/s; twice the peer's 50 / 10 s. CPU: 50
    # questions in 10 more CPU-s, the peer's in 25: 2.5x.
    assert rows[2] == ("| our job, default | 12.0 | 17.0 | 10.00 | 11.00 | 2.00 | 20.0, 30.0 | 5.000 | 2.50 | - | - "
                       "| 1.5, 2.0 |")
    assert rows[3].startswith(f"| {PEER_NAME} | 8.0 | 18.0 | 5.00 | 5.00 | 1.00 | 10.0, 35.0 | 2.000 | 1.00 |")
    assert [v.flags for v in parse_variants("default; --precision int8")] == [(), ("--precision", "int8")]
    with pytest.raises(ValueError, match="benchmark's to set"):
        parse_variants("--model x")


def test_tree_cpu_counts_grandchildren(tmp_path):
    """CPU seconds of a process tree: a child that burns ~0.6 s under a shell that burns none."""
    import subprocess
    import sys

    from benchmarks.marginal import TreeCpu

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    proc = subprocess.Popen(["sh", "-c", f"{sys.executable} -c '{burn}'; sleep 0.3"])
    with TreeCpu(proc.pid, interval_s=0.05) as cpu:
        proc.wait()
    assert 0.5 <= cpu.seconds < 3.0


@END_TO_END
def test_marginal_mode_runs_whole_processes(tiny_model, tmp_path):
    """Both systems as fresh processes on N and 2N questions, scored, in a table headed by the CPU class."""
    if transformers_pipeline_available() is not None:
        pytest.skip("needs torch and transformers<5 for the pipeline")
    args = ["--data", str(squad_file(tmp_path / "squad.json")), "--mode", "marginal", "--models", "default=3",
            "--model", str(tiny_model), "--hf-model", str(tiny_hf_model(tiny_model, tmp_path / "hf")),
            "--variants", "default", "--skip-peer", "openvino", "--work-dir", str(tmp_path / "work"), "--report", str(tmp_path / "r.json"),
            "--bound"]
    assert benchmarks.main(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())["models"]["default"]
    assert "CPU class" in result["text"].splitlines()[0]
    served = result["rows"][0]["stages_2n"]["served"]
    assert [r["system"] for r in result["rows"]] == [
        "our job, default", f"bound: answering stage in bare processes ({served['backend']} {served['precision']})",
        "transformers pipeline"]
    for r in result["rows"]:
        assert len(r["seconds_n"]) == len(r["seconds_2n"]) == 1 and r["windows"][1] >= 6
    assert result["rows"][0]["stages_2n"]["windows"] == result["rows"][0]["windows"][1]
    assert "of the bare processes' marginal rate" in result["text"]


@pytest.mark.parametrize("backend, precision, shapes", [("onnxruntime", "fp32", "dynamic"),
                                                      ("openvino", "fp32", "static")])
def test_bound_answers_every_row_as_the_answering_stage_does(tiny_model, tmp_path, backend, precision, shapes):
    """Two bare processes answering 2-row units give each id the answer the job's Answerer gives it in its unit,
    with the session the job served (static shapes included)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks import bound
    from pipeline.answer import Answerer
    from pipeline.backends import load_model

    questions = ["who was born in paris?", "where was the king born?", "when was the king born?",
                 "what year was it?", "who?"]
    table = pa.table({"id": [f"r{i}" for i in range(5)], "question": questions, "context": [CONTEXT] * 5})
    pq.write_table(table, tmp_path / "in.parquet")
    assert bound.main(["--input", str(tmp_path / "in.parquet"), "--model", str(tiny_model), "--output",
                       str(tmp_path / "out.json"), "--backend", backend, "--precision", precision, "--shapes",
                       shapes, "--processes", "2", "--batch-tokens", "512", "--rows-per-unit", "2"]) == 0
    answers = json.loads((tmp_path / "out.json").read_text())
    spec, session = load_model(tiny_model, 1, backend=backend, precision=precision, shapes=shapes)
    assert session.static_shapes == (shapes == "static")
    answerer = Answerer(spec, session, batch_tokens=512)
    expected = {}
    for start in (0, 2, 4):
        out = answerer(table.slice(start, 2))
        expected.update(zip(out.column("id").to_pylist(), (a or "" for a in out.column("answer").to_pylist())))
    assert answers == expected and len(answers) == 5 and any(answers.values())
