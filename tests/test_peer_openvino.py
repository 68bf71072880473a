"""The optimum-intel pipeline as the benchmark's second peer (benchmarks/peer.py --runtime openvino, its row in
--mode marginal): the table's ratio column per peer, the note when optimum-intel is missing, the peer's own
record of what ran, and (where optimum-intel is installed) one whole peer process on a tiny random model.
Asserts nothing about speed."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from benchmarks.marginal import OV_PEER_NAME, PEER_NAME, PEERS, Row, Run, marginal_table, peer_line, peer_said
from benchmarks.systems import OPTIMUM_INTEL_PIP, optimum_intel_available, transformers_pipeline_available


def _row(system: str, t_n: float, t_2n: float, c_n: float, c_2n: float, stages: dict | None = None) -> Row:
    row = Row(system, 50)
    row.runs_n = [Run(50, t_n, 50, {}, load=1.0, cpu_seconds=c_n)]
    row.runs_2n = [Run(100, t_2n, 100, {}, stages or {}, load=1.0, cpu_seconds=c_2n)]
    return row


def test_each_peer_gets_its_own_ratio_columns():
    ours = _row("our job, default", 12.0, 17.0, 20.0, 30.0)  # N / (T(2N) - T(N)) = 50 / 5; per CPU-s 50 / 10
    torch_peer = _row(PEER_NAME, 8.0, 18.0, 10.0, 35.0)  # 50 / 10; per CPU-s 50 / 25
    ov_peer = _row(OV_PEER_NAME, 9.0, 13.0, 11.0, 21.0)  # 50 / 4; per CPU-s 50 / 10
    lines = marginal_table([ours, torch_peer, ov_peer], [], list(PEERS.values()), with_f1=False).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[5:7] == [f"x {PEER_NAME}", f"x {OV_PEER_NAME}"]
    assert head[9:11] == [f"x {PEER_NAME} (CPU)", f"x {OV_PEER_NAME} (CPU)"]
    assert all(len(line.strip("|").split("|")) == len(head) for line in lines)
    assert lines[2] == ("| our job, default | 12.0 | 17.0 | 10.00 | 10.00 | 2.00 | 0.80 | 20.0, 30.0 | 5.000 | 2.50 "
                        "| 1.00 | - | - | 1.0, 1.0 |")
    assert lines[4].startswith(f"| {OV_PEER_NAME} | 9.0 | 13.0 | 12.50 | 12.50 | 2.50 | 1.00 | 11.0, 21.0 | 5.000 "
                               "| 2.50 | 1.00 |")
    # One peer left out: its columns go, the other's stay.
    lines = marginal_table([ours, ov_peer], [], list(PEERS.values()), with_f1=False).splitlines()
    assert f"x {PEER_NAME}" not in lines[0] and lines[2].startswith("| our job, default | 12.0 | 17.0 | 10.00 | "
                                                                     "10.00 | 0.80 | 20.0, 30.0 |")


def test_a_missing_optimum_intel_names_the_pip_command(monkeypatch):
    from benchmarks import systems

    real = importlib.util.find_spec
    monkeypatch.setattr(systems, "transformers_pipeline_available", lambda: None)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("optimum") else real(name, *a))
    why = optimum_intel_available()
    assert why is not None and OPTIMUM_INTEL_PIP in why and "\n" not in why


def test_the_peer_line_says_what_ran(tmp_path):
    log = tmp_path / "peer.log"
    said = {"runtime": "openvino", "openvino": "2026.4.1", "INFERENCE_PRECISION_HINT": "bf16",
            "INFERENCE_NUM_THREADS": "2", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "threads": 2,
            "batch_size": 8, "load_s": 3.41, "answer_s": 0.72}
    log.write_text("Device set to use cpu\npeer: " + json.dumps(said) + "\n")
    assert peer_said(log) == said
    line = peer_line(_row(OV_PEER_NAME, 1.0, 2.0, 1.0, 2.0, said))
    assert "inference precision bf16" in line and "INFERENCE_NUM_THREADS 2" in line and "model load 3.4 s" in line
    (tmp_path / "bare.log").write_text("nothing said\n")
    assert peer_said(tmp_path / "bare.log") == {}
    assert not math.isnan(_row(PEER_NAME, 1.0, 2.0, 1.0, 2.0).questions_per_s)


@pytest.mark.skipif(optimum_intel_available() is not None or transformers_pipeline_available() is not None,
                    reason="needs optimum-intel (pip install 'optimum-intel[openvino]==2.2.0'), torch, transformers<5")
def test_openvino_peer_answers_every_row(tiny_model, tmp_path):
    """benchmarks.peer --runtime openvino exports a tiny random BertForQuestionAnswering with optimum-intel in its
    own process, answers every row and says which precision OpenVINO compiled for."""
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_benchmark import CONTEXT, tiny_hf_model

    hf = tiny_hf_model(tiny_model, tmp_path / "hf")
    ids = ["a", "b", "c"]
    pq.write_table(pa.table({"id": ids, "question": ["who was born?", "where?", "when?"], "context": [CONTEXT] * 3}),
                   tmp_path / "in.parquet")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.peer", "--input", str(tmp_path / "in.parquet"),
                           "--model", str(hf), "--output", str(tmp_path / "out.json"), "--runtime", "openvino",
                           "--threads", "1", "--batch-size", "2"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "USE_TF": "0"}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = json.loads((tmp_path / "out.json").read_text())
    assert sorted(answers) == ids and all(isinstance(v, str) for v in answers.values())
    said = peer_said_text(proc.stderr)
    assert said["runtime"] == "openvino" and said["INFERENCE_NUM_THREADS"] == "1"
    assert said["INFERENCE_PRECISION_HINT"] in ("f32", "bf16", "f16")


def peer_said_text(stderr: str) -> dict:
    line = next(x for x in reversed(stderr.splitlines()) if x.startswith("peer: "))
    return json.loads(line[len("peer: "):])


def test_runs_record_the_cpu_their_neighbours_used(tmp_path):
    """timed's third number is the machine's busy CPU-s outside the run's tree; the table's notes give it per row."""
    import sys

    from benchmarks.marginal import neighbours_line, timed, wait_for_quiet

    seconds, cpu, other = timed([sys.executable, "-c", "pass"], tmp_path / "run.log")
    assert seconds > 0 and cpu >= 0 and 0 <= other < 10 * seconds + 1
    assert wait_for_quiet(0) == 0.0
    row = _row(OV_PEER_NAME, 1.0, 2.0, 1.0, 2.0)
    row.runs_n[0].other_cpu_seconds, row.runs_2n[0].other_cpu_seconds = 0.5, 4.0
    assert neighbours_line([row]).endswith(f"median / max: {OV_PEER_NAME} 2.2 / 4.0")
