"""benchmarks.refresh builds the nights it says it builds, and renders a page from kept results (no job run)."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from benchmarks import refresh


def test_tiny_rows_are_unique_and_one_edit_changes_one_row(tmp_path):
    files = refresh.write_tiny(tmp_path / "in", 250_001)
    assert len(files) == 3
    table = pq.read_table(tmp_path / "in")
    assert table.num_rows == 250_001
    keys = set(zip(table.column("question").to_pylist(), table.column("context").to_pylist()))
    assert len(keys) == table.num_rows
    before = pq.read_table(files[-1]).to_pylist()
    edited = refresh.edit_one_row(files[-1])
    after = pq.read_table(files[-1]).to_pylist()
    assert [r["id"] for r in after] == [r["id"] for r in before] and edited == before[0]["id"]
    assert sum(a != b for a, b in zip(after, before)) == 1


@pytest.mark.skipif(not (refresh.TRAIN.exists() and refresh.DEV.exists()), reason="SQuAD files not present")
def test_night_two_changes_what_it_reports(tmp_path):
    rows = refresh.squad_rows(refresh.TRAIN, 1000)
    assert len({r["id"] for r in rows}) == 1000
    refresh.write_files(rows, tmp_path, 4)
    changes = refresh.night_two(tmp_path, 0.01, random.Random(refresh.SEED))
    now = {r["id"]: r for r in pq.read_table(tmp_path).to_pylist()}
    was = {r["id"]: r for r in rows}
    assert len(now) == changes["rows_after"] == 1000
    assert len(was.keys() - now.keys()) == changes["deleted"] == 10
    assert len(now.keys() - was.keys()) == changes["new"] == 10
    edited = [i for i in now.keys() & was.keys() if now[i] != was[i]]
    assert len(edited) == changes["edited"] == 10


def test_render_from_kept_results():
    kept = refresh.RESULTS / "refresh.json"
    if not kept.exists():
        pytest.skip("no kept results yet")
    page = refresh.render(json.loads(kept.read_text()))
    assert page.startswith("## Nightly refresh (issue 32)")
    assert page == (refresh.RESULTS / "refresh.md").read_text()
