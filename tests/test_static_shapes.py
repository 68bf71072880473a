"""Static shapes: one compiled OpenVINO model per batch shape, batches cut to canonical shapes only.

``cut_batches`` is pure (no model); the sessions are real OpenVINO sessions on the suite's tiny model and on the
default model.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from conftest import REPO

from pipeline import squad
from pipeline.answer import Answerer, cut_batches

DEV = REPO.parent / "shared" / "data" / "squad" / "dev-v1.1.json"
MODEL = REPO / "models" / "minilm-squad"


def sorted_lengths(seed=0, n=500, multiple=16, width=384):
    rng = np.random.default_rng(seed)
    raw = np.concatenate([rng.integers(20, 260, n), np.full(n // 10, width)])
    return np.sort(-(-raw // multiple) * multiple)


@pytest.mark.parametrize("budget", [512, 2048, 4096])
def test_canonical_batches_have_one_shape_per_length(budget):
    cols = sorted_lengths()
    batches = cut_batches(cols, budget, canonical=True)
    assert [b0 for b0, _, _, _ in batches] == [0] + [b1 for _, b1, _, _ in batches[:-1]]  # in order, no gaps
    assert batches[-1][1] == len(cols)
    shapes = {(rows, length) for _, _, length, rows in batches}
    assert all(rows == max(1, budget // length) for rows, length in shapes)  # one row count per length
    assert len(shapes) <= len(set(cols.tolist()))
    for b0, b1, length, rows in batches:
        assert cols[b0:b1].max() <= length and b1 - b0 <= rows
    # the canonical cut computes a few more tokens than the greedy one, not many
    greedy = cut_batches(cols, budget)
    tokens = [sum(rows * length for _, _, length, rows in b) for b in (batches, greedy)]
    assert tokens[1] <= tokens[0] <= 1.1 * tokens[1]


def test_greedy_and_canonical_batches():
    cols = np.array([16] * 7 + [32] * 3 + [64, 384])
    assert cut_batches(cols, 128) == [(0, 7, 16, 7), (7, 10, 32, 3), (10, 11, 64, 1), (11, 12, 384, 1)]
    # canonical: 7 windows at 16 (8 rows, one a copy) answer more than 4 at 32; then 3 at 32 and the 64 as 2 at 64
    assert cut_batches(cols, 128, canonical=True) == [(0, 7, 16, 8), (7, 10, 32, 4), (10, 11, 64, 2), (11, 12, 384, 1)]


def static_session(model_file, spec, threads=1, precision="bf16"):
    from pipeline.openvino_session import OpenVinoQASession

    return OpenVinoQASession(model_file, threads, spec.input_names, spec.output_names, precision, static_shapes=True)


def test_static_session_matches_the_dynamic_one_on_the_tiny_model(tiny_model):
    pytest.importorskip("openvino")
    from pipeline.backends import load_model

    spec, dynamic = load_model(tiny_model, backend="openvino", precision="fp32")
    static = static_session(spec.model_file, spec, precision="fp32")
    assert static.static_shapes and static.seq_multiple >= 16
    table = pa.table({"question": ["who was born in paris?", "what year?"] * 3,
                      "context": ["The king of France was born in Paris in 1789. " * 12, "It was the year 1789."] * 3})
    got = Answerer(spec, static, batch_tokens=256)(table)
    want = Answerer(spec, dynamic, batch_tokens=256)(table)
    assert got.column("answer").to_pylist() == want.column("answer").to_pylist()
    assert np.allclose(got.column("score").to_numpy(), want.column("score").to_numpy(), atol=1e-4)
    # every call had a canonical shape: one compiled model per length met
    assert all(rows == max(1, 256 // length) for rows, length in static._shapes)


@pytest.mark.skipif(not DEV.exists(), reason="needs ../shared/data/squad/dev-v1.1.json")
def test_static_shapes_answers_do_not_depend_on_the_batching():
    """The default model with static shapes: the same answers and scores whatever the budget and the rows a call
    shares, though each budget compiles other shapes and pads other rows."""
    pytest.importorskip("openvino")
    from pipeline.served import serve

    served = serve(str(MODEL), "openvino", "bf16")
    session = static_session(served.graph, served.spec)
    items = squad.questions(squad.load_squad(DEV), 120)
    table = pa.table({"question": [r["question"] for r in items], "context": [r["context"] for r in items]})
    seen = {}
    for budget in (512, 4096):
        answerer = Answerer(served.spec, session, batch_tokens=budget)
        for rows in (16, 1024):
            out = pa.concat_tables([answerer(table.slice(i, rows)) for i in range(0, table.num_rows, rows)])
            seen[budget, rows] = list(zip(out.column("answer").to_pylist(), out.column("score").to_pylist()))
    first = seen[512, 16]
    assert all(v == first for v in seen.values()), {k: sum(a != b for a, b in zip(first, v)) for k, v in seen.items()}
    assert sum(a is not None for a, _ in first) == 120
    lengths = {length for _, length in session._shapes}
    assert len(session._shapes) == len({(max(1, b // n), n) for b in (512, 4096) for n in lengths})


def amx_node(memory_per_cpu=8 * 2**30, cpu_class="amx"):
    from pipeline.precision import NodeCpu

    return NodeCpu("n", cpu_class, True, memory_per_cpu)


BIG = 50_000  # rows per CPU: a job large enough for static shapes


@pytest.mark.parametrize("nodes, precision, requested, rows, want, why", [
    ([amx_node()], "bf16", "auto", BIG, "static", "within 25% of the smallest node's 8.0 GiB per CPU"),
    ([amx_node()], "bf16", "auto", 5_000, "dynamic", "5,000 rows per CPU, fewer than the 10,000"),
    ([amx_node()], "bf16", "auto", None, "dynamic", "rows per CPU unknown"),
    ([amx_node(), amx_node(2 * 2**30)], "bf16", "auto", BIG, "dynamic", "more than 25% of a node's 2.0 GiB per CPU"),
    ([amx_node(), amx_node(cpu_class="avx2")], "bf16", "auto", BIG, "dynamic", "not measured faster in whole jobs on CPU class avx2"),
    ([amx_node(None)], "bf16", "auto", BIG, "dynamic", "the nodes' memory is unknown"),
    ([amx_node()], "int8-bf16", "auto", BIG, "dynamic", "auto serves static shapes at bf16 only"),
    ([amx_node(cpu_class="avx2")], "fp32", "static", None, "static", "--shapes on the command line"),
    ([amx_node()], "bf16", "dynamic", BIG, "dynamic", "--shapes on the command line"),
])
def test_the_shapes_rule(monkeypatch, nodes, precision, requested, rows, want, why):
    """auto, on a class measured faster: static for bf16, for a job with enough rows per CPU to pay for compiling the shapes, when
    an actor's shapes fit a quarter of the memory per CPU (the default model: 24 shapes of about half its 90 MB
    graph, about 1 GiB); the reason says which condition decided."""
    from pipeline.precision import PrecisionChoice, Variant
    from pipeline.shapes import with_shapes

    monkeypatch.setattr("pipeline.shapes.STATIC_CLASSES", ("amx",))  # as if amx had been measured faster
    choice = PrecisionChoice(Variant("openvino", precision), "auto", "measured")
    got = with_shapes(choice, requested, MODEL / "model-fp32.onnx", 384, False, nodes, rows)
    assert got.variant == Variant("openvino", precision, want)
    assert got.reason.startswith("measured; ") and why in got.reason, got.reason


def test_graphs_of_fixed_shape_and_onnx_runtime_stay_dynamic():
    from pipeline.precision import PrecisionChoice, Variant
    from pipeline.shapes import with_shapes

    fixed = with_shapes(PrecisionChoice(Variant("openvino", "bf16"), "auto", "r"), "static", MODEL / "model.onnx", 384,
                        True, [amx_node()])
    assert fixed.variant.shapes == "dynamic" and "fixes its own shape" in fixed.reason
    ort = PrecisionChoice(Variant("onnxruntime", "fp32"), "auto", "r")
    assert with_shapes(ort, "auto", MODEL / "model.onnx", 384, False, [amx_node()]) == ort  # nothing to say
    assert "dynamic shapes only" in with_shapes(ort, "static", MODEL / "model.onnx", 384, False, [amx_node()]).reason


def test_static_shapes_are_part_of_the_identity_and_dynamic_keeps_its_form():
    from pipeline.precision import Variant
    from pipeline.records import recorded_variant

    assert Variant("openvino", "bf16").to_json() == {"backend": "openvino", "precision": "bf16"}
    static = Variant("openvino", "bf16", "static")
    assert str(static) == "openvino bf16 static shapes"
    assert recorded_variant({"version": 2, "variant": static.to_json()}) == static
    assert recorded_variant({"version": 2, "variant": {"backend": "openvino", "precision": "bf16"}}).shapes == "dynamic"


def test_a_job_with_static_shapes_records_them_and_answers_as_in_process(joined_ray, tiny_model, tmp_path):
    """--shapes static: the manifest names the variant with its shapes and why, and the rows' answers are the
    in-process static session's, though the job cuts them into units of 7 rows."""
    import json
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from pipeline.api import QA

    contexts = ["The king of France was born in Paris in 1789. " * 6, "It was the year 1789 by the river."]
    table = pa.table({"id": [f"r{i:02d}" for i in range(30)],
                      "question": [f"who was born in the year {i}?" for i in range(30)],
                      "context": [contexts[i % 2] * (1 + i % 3) for i in range(30)]})
    pq.write_table(table, tmp_path / "in.parquet")
    args = ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--model", str(tiny_model),
            "--backend", "openvino", "--precision", "fp32", "--shapes", "static", "--rows-per-unit", "7",
            "--batch-tokens", "256"]
    done = subprocess.run([sys.executable, "-m", "jobs.answer", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)  # the assert shows stderr
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["precision"]["shapes"] == "static" and "--shapes on the command line" in manifest["precision"]["reason"]
    assert manifest["model"]["variant"] == "openvino fp32 static shapes"
    got = pq.read_table(tmp_path / "out").sort_by("id")
    want = QA(str(tiny_model), backend="openvino", precision="fp32", shapes="static", batch_tokens=256, threads=1)(table)
    assert str(QA(str(tiny_model), backend="openvino", precision="fp32").served.variant) == "openvino fp32"
    assert got.column("answer").to_pylist() == want.column("answer").to_pylist()
    assert got.column("score").to_pylist() == want.column("score").to_pylist()


def test_auto_serves_static_shapes_to_large_jobs_on_amx_only():
    """As released: amx is the class measured faster (a job of many rows); small jobs and other classes dynamic."""
    from pipeline.precision import PrecisionChoice, Variant
    from pipeline.shapes import with_shapes

    choice = PrecisionChoice(Variant("openvino", "bf16"), "auto", "measured")
    graph = MODEL / "model-fp32.onnx"
    assert with_shapes(choice, "auto", graph, 384, False, [amx_node()], BIG).variant.shapes == "static"
    assert with_shapes(choice, "auto", graph, 384, False, [amx_node()], 60).variant.shapes == "dynamic"
    vnni = with_shapes(choice, "auto", graph, 384, False, [amx_node(cpu_class="avx512-vnni")], BIG)
    assert vnni.variant.shapes == "dynamic" and "not measured faster in whole jobs on CPU class avx512-vnni" in vnni.reason


def test_forced_static_shapes_must_fit_an_actors_memory():
    """auto keeps a margin (above); --shapes static is refused only where the shapes cannot fit at all."""
    from pipeline.shapes import static_memory_error

    need = 3 * 2**30
    error = static_memory_error(need, [amx_node(8 * 2**30), amx_node(2 * 2**30)], 1)
    assert error.startswith("--shapes static: an actor's compiled shapes (about 3.0 GiB")
    assert "would not fit its 2.0 GiB (1 CPU(s) of the smallest node's 2.0 GiB per CPU)" in error
    assert static_memory_error(need, [amx_node(2 * 2**30)], 2) is None  # two CPUs' memory: fits
    assert static_memory_error(need, [amx_node(None)], 1) is None  # memory unknown: the user's call


def test_a_job_forcing_static_shapes_is_refused_on_nodes_too_small(tmp_path):
    """The driver's choice step (jobs/choose.py) refuses, naming the sizes, before any actor starts; on nodes with
    room the same job keeps its static shapes."""
    import pyarrow.parquet as pq

    from jobs.choose import PrecisionChoiceError, choose_variant
    from jobs.config import JobConfig
    from jobs.plan import plan

    pq.write_table(pa.table({"id": ["a"], "question": ["Who?"], "context": ["Ann did."]}), tmp_path / "in.parquet")
    cfg = JobConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=str(MODEL),
                    precision="bf16", shapes="static")
    job = plan(cfg)
    assert job.served.variant.shapes == "static"
    with pytest.raises(PrecisionChoiceError, match=r"would not fit its 0\.2 GiB .* use --shapes auto or dynamic"):
        choose_variant(job, [amx_node(2**30 // 4)], 2)  # about 1 GiB of shapes against 0.25 GiB a CPU
    assert choose_variant(job, [amx_node()], 2).served.variant.shapes == "static"


def test_in_process_static_shapes_must_fit_the_machines_memory(monkeypatch):
    """``QA(shapes="static")`` is refused before any model is compiled where the compiled shapes would not fit the
    machine's memory (here made 0.25 GiB), naming the sizes; dynamic shapes are not checked."""
    from pipeline import api

    monkeypatch.setattr(api, "memory_bytes", lambda: 2**30 // 4)
    with pytest.raises(ValueError, match=r"shapes='static': .*minilm-squad: the compiled shapes \(about 1\.\d GiB.* "
                                         r"would not fit this machine's 0\.2 GiB; use shapes='auto' or 'dynamic'"):
        api.QA(MODEL, backend="openvino", precision="bf16", shapes="static")
    assert api._choice(str(MODEL), "openvino", "bf16", "dynamic").variant.shapes == "dynamic"
