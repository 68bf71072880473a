"""benchmarks.protocol counts what the exactly-once protocol writes honestly (local store; no timing asserted)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.protocol import MARKERS, answered_blocks, local_store, measure, request_kind, table
from pipeline.commit import MANIFEST, ROW_COLUMN, STAGING, UNIT_COLUMN

ROWS, PER_UNIT = 300, 64


def test_local_byte_accounting(tmp_path):
    blocks = answered_blocks(ROWS, PER_UNIT)
    assert [b.num_rows for b in blocks] == [64, 64, 64, 64, 44]
    assert {UNIT_COLUMN, ROW_COLUMN, "context", "answer", "error"} <= set(blocks[0].column_names)
    with local_store(str(tmp_path)) as store:
        r = measure(store, blocks, repeats=1, keep=True)
        root = r.root

        # Baseline: one file per unit, the bytes counted are the bytes on disk.
        baseline = {p: n for p, n in r.files["baseline"].items() if p.startswith(f"{root}/baseline/")}
        assert len(baseline) == len(blocks)
        assert r.counts["baseline"].data_bytes == sum(baseline.values())
        assert r.counts["baseline"].markers == 0

        # Stage: data bytes counted == the staged files' sizes (written under temporary names, renamed).
        staged = r.files["stage"]
        parts = {p: n for p, n in staged.items() if f"/{STAGING}/part-" in p}
        assert len(parts) == len(blocks)
        assert r.counts["stage"].data_bytes == sum(parts.values())
        assert r.counts["stage"].copied_bytes == 0  # a local move is a rename
        assert set(r.counts["stage"].marker_bytes) == {"_job.json", "_lease.json"}
        for name, n in r.counts["stage"].marker_bytes.items():
            assert staged[f"{root}/protocol/{STAGING}/{name}"] == n

        # Commit: no data written or copied, the published files are the staged ones renamed, staging gone.
        c = r.counts["commit"]
        assert c.data_bytes == 0 and c.copied_bytes == 0
        assert set(c.marker_bytes) == {"_commit.json", "_manifest.json"} and set(c.marker_bytes) <= set(MARKERS)
        published = {p: n for p, n in r.files["commit"].items() if p.startswith(f"{root}/protocol/")}
        assert not any(f"/{STAGING}/" in p for p in published)
        assert published.pop(f"{root}/protocol/{MANIFEST}") == c.marker_bytes["_manifest.json"]
        assert sorted(published.values()) == sorted(parts.values())
        assert c.calls["rename"] == len(blocks) + 2  # every part, and the two markers' temporary names

        # The manifest lists every row once, and the files hold exactly the input rows without hidden columns.
        manifest = r.manifest
        assert manifest["rows_out"] == ROWS and manifest["errors"] == ROWS // 500
        assert sorted(f"{root}/protocol/{f['path']}" for f in manifest["output_files"]) == sorted(published)
        out = pa.concat_tables([pq.read_table(f"{root}/protocol/{f['path']}") for f in manifest["output_files"]])
        expected = pa.concat_tables(blocks)
        assert sorted(out.column("id").to_pylist()) == sorted(expected.column("id").to_pylist())
        assert len(set(out.column("id").to_pylist())) == ROWS
        assert UNIT_COLUMN not in out.column_names and ROW_COLUMN not in out.column_names

        assert all(len(v) == 1 for v in r.seconds.values())
        assert "protocol: stage + commit" in table([r])


def test_request_kinds():
    assert request_kind("PUT", "/b/k/part.parquet", "", {}) == "PUT"
    assert request_kind("PUT", "/b/k/", "", {}) == "PUT dir marker"
    assert request_kind("PUT", "/b/k", "", {"HTTP_X_AMZ_COPY_SOURCE": "b/j"}) == "COPY"
    assert request_kind("PUT", "/b/k", "partNumber=1&uploadId=x", {}) == "PUT part"
    assert request_kind("POST", "/b", "delete", {}) == "POST delete (bulk)"
    assert request_kind("GET", "/b", "list-type=2&prefix=k", {}) == "LIST"
    assert request_kind("GET", "/b/k", "", {}) == "GET"
