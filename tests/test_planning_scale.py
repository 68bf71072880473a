"""Planning many files: footers read concurrently give exactly the units the serial path gives."""

from __future__ import annotations

import json
import pickle
import threading
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from benchmarks.protocol import moto_available
from pipeline import units as units_mod
from pipeline.lake import ListedFile, expand_input, input_base, stat_files
from pipeline.units import InputFileError, plan_units, read_footers

SCHEMA = pa.schema([("id", pa.string()), ("context", pa.string())])


def write_files(root, n: int, corrupt: tuple[int, ...] = ()) -> dict[str, int]:
    """``n`` files under two Hive partitions, rows 0..36 (every 7th empty), row groups of 5 rows; the files
    at positions ``corrupt`` (in sorted order) are not Parquet. Returns rows written per good file."""
    rows = {}
    for i in range(n):
        folder = root / f"lang={'en' if i % 3 else 'fr'}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"part-{i:04d}.parquet"
        rows[str(path)] = 0 if i % 7 == 0 else (i * 13) % 37
    for k, path in enumerate(sorted(rows)):
        if k in corrupt:
            with open(path, "wb") as f:
                f.write(b"PAR1 this is not parquet at all")
            del rows[path]
            continue
        n_rows = rows[path]
        table = pa.table({"id": [f"{path}-{r}" for r in range(n_rows)], "context": ["c"] * n_rows}, schema=SCHEMA)
        pq.write_table(table, path, row_group_size=5)
    return rows


def test_many_small_files_plan_as_the_serial_path(tmp_path):
    rows = write_files(tmp_path, 300, corrupt=(123,))
    fs, files = expand_input(str(tmp_path))
    assert len(files) == 300 and files == sorted(files)
    bad_file = files[123]
    serial = plan_units(fs, [str(f) for f in files], 4, skip_bad_files=True, base=input_base(str(tmp_path)),
                        threads=1)  # the old path: one file after another, each opened by name alone
    units, schema, bad = serial
    assert bad == [bad_file]
    assert schema.names == ["id", "context", "lang"]
    # the serial plan is right, not only self-consistent: every good file's rows, in units of <= 4 within
    # row groups of 5, in sorted file order, indices 0..n-1
    assert [u.index for u in units] == list(range(len(units)))
    assert [u.path for u in units] == sorted(u.path for u in units)
    per_file: dict[str, int] = {}
    for u in units:
        assert 1 <= u.length <= 4 and u.offset + u.length <= 5 and u.offset in (0, 4)
        assert u.partitions == (("lang", "fr" if "lang=fr" in u.path else "en"),)
        per_file[u.path] = per_file.get(u.path, 0) + u.length
    assert per_file == {p: n for p, n in rows.items() if n}
    assert len(units) == sum(n // 5 * 2 + (n % 5 > 0) for n in rows.values())  # 5 = 4 + 1

    for threads in (2, 8, 32):
        got = plan_units(fs, files, 4, skip_bad_files=True, base=input_base(str(tmp_path)), threads=threads)
        assert got[0] == units and got[1].equals(schema) and got[2] == [bad_file], threads
        assert all(type(u.path) is str for u in got[0])  # not ListedFile: units are pickled and made Arrow rows


def test_the_first_bad_file_in_order_is_named(tmp_path, monkeypatch):
    """Two bad files, the first one slow to fail: whatever finishes first, the error names the first in order."""
    write_files(tmp_path, 40, corrupt=(5, 30))
    fs, files = expand_input(str(tmp_path))
    real = units_mod.read_footer

    def slow_first_bad(fs, path):
        if path == files[5]:
            time.sleep(0.15)
        return real(fs, path)

    monkeypatch.setattr(units_mod, "read_footer", slow_first_bad)
    for threads in (1, 16):
        with pytest.raises(InputFileError) as exc:
            plan_units(fs, files, 4, threads=threads)
        message = str(exc.value)
        assert message.startswith(f"input file {files[5]}: not readable as Parquet") and "--skip-bad-files" in message
        assert files[30] not in message
        _, _, bad = plan_units(fs, files, 4, skip_bad_files=True, threads=threads)
        assert bad == [files[5], files[30]]


def test_schema_mismatch_names_the_first_differing_file(tmp_path):
    write_files(tmp_path, 20)
    fs, files = expand_input(str(tmp_path))
    for k in (8, 15):
        pq.write_table(pa.table({"id": ["x"], "other": [1]}), files[k])
    fs, files = expand_input(str(tmp_path))
    for threads in (1, 8):
        with pytest.raises(InputFileError, match=f"input file {files[8]}: schema differs from {files[0]}"):
            plan_units(fs, files, 4, threads=threads)


def test_reads_ahead_at_most_twice_the_threads(tmp_path, monkeypatch):
    """A consumer that stops after one file (a bad file) leaves at most 2 x threads footers read: the pool never
    runs through the whole listing, and finished footers never pile up waiting for a slow one."""
    rows = write_files(tmp_path, 200)
    fs, files = expand_input(str(tmp_path))
    real, started, lock = units_mod.read_footer, [], threading.Lock()

    def counted(fs, path):
        with lock:
            started.append(path)
        time.sleep(0.01)
        return real(fs, path)

    monkeypatch.setattr(units_mod, "read_footer", counted)
    footers = read_footers(fs, files, threads=4)
    footer = next(footers)
    time.sleep(0.3)  # a slow consumer: an unbounded pool reads on through the listing meanwhile (~100 files)
    footers.close()  # waits for the pool: nothing runs after this
    n = rows[files[0]]
    assert footer.path == files[0] and footer.error is None and footer.row_group_rows == (5,) * (n // 5) + ((n % 5,) if n % 5 else ())
    assert len(started) <= 2 * 4 + 1
    assert set(started) <= set(files[:2 * 4 + 1])


def test_listed_files_carry_their_size_to_the_reader(tmp_path):
    write_files(tmp_path, 3)
    fs, files = expand_input(str(tmp_path))
    for f in files:
        assert isinstance(f, ListedFile) and f.size == (tmp_path / f[len(str(tmp_path)) + 1:]).stat().st_size
        again = pickle.loads(pickle.dumps(f))
        assert again == f and again.size == f.size and type(again) is ListedFile
    assert json.loads(json.dumps(files)) == [str(f) for f in files]
    _, one = expand_input(files[1])
    assert one == [files[1]] and one[0].size == files[1].size
    with pytest.raises(ValueError, match="threads must be >= 1"):
        plan_units(fs, files, 4, threads=0)


def test_stat_files_answers_as_get_file_info(tmp_path):
    write_files(tmp_path, 50)
    fs, files = expand_input(str(tmp_path))
    # not a LocalFileSystem, so that stat_files uses its threads (a local stat is asked serially)
    sub = pafs.SubTreeFileSystem(str(tmp_path), fs)
    paths = [f[len(str(tmp_path)) + 1:] for f in files[::-1]] + ["missing.parquet"]  # any order, one missing
    want = [(f.path, f.type, f.size, f.mtime_ns) for f in sub.get_file_info(paths)]
    assert want[-1][1] == pafs.FileType.NotFound and len(want) == 51
    for threads in (1, 3, 8):
        assert [(f.path, f.type, f.size, f.mtime_ns) for f in stat_files(sub, paths, threads)] == want


@pytest.mark.skipif(not moto_available(), reason="needs moto[server] (the test extra)")
def test_on_s3_a_footer_is_one_get(monkeypatch):
    """On S3 the listed size saves the HEAD request that opening by name makes: planning costs one GET per file,
    counted by the server; the units are the serial path's."""
    from benchmarks.planning import moto_store
    from benchmarks.planning import write_files as write_small_files

    with moto_store() as store:
        write_small_files(store.fs, store.root, 12)
        for key in ("AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            monkeypatch.delenv(key, raising=False)
        for key, value in store.env.items():
            if key.startswith("AWS_"):
                monkeypatch.setenv(key, value)
        fs, files = expand_input(store.uri)
        assert [f.size for f in files] == [store.fs.get_file_info(str(f)).size for f in files]
        store.counts()
        serial = plan_units(fs, [str(f) for f in files], 8, threads=1)
        assert store.counts() == {"HEAD": 12, "GET": 12}
        listed = plan_units(fs, files, 8, threads=4)
        assert store.counts() == {"GET": 12}
        assert listed[0] == serial[0] and listed[1].equals(serial[1]) and len(serial[0]) > 12
