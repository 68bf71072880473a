"""The committed default model, through the production path (jobs.evaluate -> jobs.answer on Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from pipeline.poison import first_pass
from pipeline.units import ReadUnit

DEV = REPO.parent / "shared/data/squad/dev-v1.1.json"
MODEL = REPO / "models/minilm-squad"
# F1 measured on this slice with the committed int8 model (models/README.md), minus 3; never below 75,
# which an untrained or mis-decoded model is far from (random weights score F1 < 10).
SLICE = 200
F1_FLOOR = max(75.0, float(json.loads((MODEL / "card.json").read_text())["dev_first_200_f1"]) - 3)


@pytest.mark.skipif(not DEV.exists(), reason="needs ../shared/data/squad")
def test_default_model_on_a_fixed_dev_slice(joined_ray, tmp_path):
    assert (MODEL / "model.onnx").exists(), "the default model is missing from models/minilm-squad"
    env = {k: v for k, v in os.environ.items() if k != "QA_MODEL"}  # RAY_ADDRESS: the suite's Ray node
    subprocess.run([sys.executable, "-m", "jobs.evaluate", "--data", str(DEV), "--limit", str(SLICE),
                    "--out-dir", str(tmp_path / "eval"), "--report", str(tmp_path / "r.json")],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["count"] == SLICE and report["errors"] == 0
    assert report["model"]["directory"] == str(MODEL)
    assert report["f1"] >= F1_FLOOR, report
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert len(predictions) == SLICE and all(isinstance(a, str) for a in predictions.values())
    # One read unit (200 rows, under the default 1024), cut into the first pass's shrinking pieces for the
    # cluster's actors: as many staged files, and as many actors as the cluster has CPUs (up to the pieces).
    manifest = json.loads((tmp_path / "eval" / "answers" / "_manifest.json").read_text())
    cpus = manifest["ray"]["cluster_cpus"]
    pieces = first_pass([ReadUnit(0, "input.parquet", 0, 0, SLICE)], cpus)
    assert manifest["read_units"] == 1 and len(manifest["output_files"]) == len(pieces) > 1
    assert [f["rows"] for f in manifest["output_files"]] == [p.length for p in pieces]
    assert report["stages"]["actors"] == min(cpus, len(pieces))
