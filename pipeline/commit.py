"""Exactly-once output: stage per-unit files, then commit them with a manifest written last.

Layout under the output root OUT (any pyarrow filesystem: local or s3://)::

    OUT/_staging/_job.json                 what the staged files answer (input, model, settings)
    OUT/_staging/part-UUUUUU-RRRRRR.parquet  rows of read unit U starting at row R of the unit
    OUT/_staging/_commit.json              written when every unit is staged: the files to publish
    OUT/part-UUUUUU-RRRRRR.parquet         published answers
    OUT/_manifest.json                     written last: the commit marker, every file and its rows

File names are a function of the input plan, so a retried write task or a re-run rewrites the same
names with the same rows: nothing is ever duplicated. A staged file appears under its final name
only once complete (written under a temporary name, then renamed; an object-store PUT is atomic).
Readers that skip ``_``-prefixed paths (pyarrow, Spark, Hive, Ray) never see staging; readers that
need the whole committed set at once read ``_manifest.json``. If the driver dies, ``--mode resume``
keeps every complete unit and redoes only the rest; if it dies during publishing, resume finishes
the moves listed in ``_commit.json`` (roll forward).
"""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .lake import read_json, write_json
from .units import ReadUnit

STAGING = "_staging"
MANIFEST = "_manifest.json"
UNIT_COLUMN = "_unit"  # hidden columns carried from the answering stage to the sink
ROW_COLUMN = "_row"
MODES = ("error", "overwrite", "resume")
ERRORS_KEY = b"qa_batch.errors"  # staged files' footers count their rows with an error: the manifest reads it
_PART = re.compile(r"part-(\d{6,})-(\d{6,})\.parquet$")


class OutputExistsError(FileExistsError):
    pass


def part_name(unit: int, first_row: int) -> str:
    return f"part-{unit:06d}-{first_row:06d}.parquet"


@dataclass(frozen=True)
class StagedPart:
    unit: int
    first_row: int
    rows: int
    path: str
    errors: int  # rows with an error


@dataclass(frozen=True)
class OutputState:
    """What ``--mode`` finds at the output before a run."""

    committed: dict | None = None  # resume of a job already committed: its manifest
    commit_list: list[dict] | None = None  # a commit interrupted while publishing: the files it lists
    staged: tuple[StagedPart, ...] = ()  # staged parts of this job (resume)


def pending_units(units: list[ReadUnit], staged: tuple[StagedPart, ...], rows_per_input_row: int = 1
                  ) -> tuple[list[ReadUnit], int, tuple[StagedPart, ...]]:
    """Units still to answer, input rows already staged, and the staged parts to remove first: a unit
    with a gap (a write task died between two of its parts) is redone whole."""
    by_unit = defaultdict(list)
    for p in staged:
        by_unit[p.unit].append(p)
    pending, staged_rows, stale = [], 0, []
    for u in units:
        parts = sorted(by_unit.get(u.index, []), key=lambda p: p.first_row)
        if _contiguous(parts, u.length * rows_per_input_row):
            staged_rows += u.length
        else:
            stale.extend(parts)
            pending.append(u)
    return pending, staged_rows, tuple(stale)


class OutputCommitter:
    """The protocol's state on one filesystem; used by the driver and by write tasks alike."""

    def __init__(self, fs: pafs.FileSystem, root: str, rows_per_input_row: int = 1):
        """``rows_per_input_row``: output rows each input row yields (fan-out asks several questions)."""
        self.fs, self.root = fs, root.rstrip("/")
        self.rows_per_input_row = rows_per_input_row
        self.staging = f"{self.root}/{STAGING}"

    # -- driver, before the run ------------------------------------------------------------------
    def inspect(self, mode: str, job: dict) -> OutputState:
        """What the output already holds for ``mode``, read only; raises where the mode refuses it."""
        if mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
        exists = self._exists(self.root) and bool(self._list(self.root))
        if exists and mode == "error":
            raise OutputExistsError(f"output {self.root} exists and is not empty; use --mode overwrite to replace "
                                    "it or --mode resume to finish an interrupted run")
        if mode != "resume":
            return OutputState()
        manifest_path = f"{self.root}/{MANIFEST}"
        if self._exists(manifest_path) and not self._exists(self.staging):
            manifest = read_json(self.fs, manifest_path)
            if manifest.get("job") != job:
                raise OutputExistsError(f"output {self.root} holds a committed run of a different job "
                                        "(input, model or settings differ); use --mode overwrite")
            return OutputState(committed=manifest)
        if not self._exists(f"{self.staging}/_job.json"):
            return OutputState()
        if read_json(self.fs, f"{self.staging}/_job.json") != job:
            raise OutputExistsError(f"{self.staging} was staged by a different job (input, model or settings "
                                    "differ); use --mode overwrite to start again")
        commit_list = f"{self.staging}/_commit.json"
        return OutputState(commit_list=read_json(self.fs, commit_list)["files"] if self._exists(commit_list) else None,
                           staged=tuple(self.staged_parts()))

    def begin(self, mode: str, job: dict, stale: tuple[StagedPart, ...] = ()) -> None:
        """Make staging ready to take this job's files: cleared for overwrite, ``stale`` parts removed."""
        if mode == "overwrite":
            self._delete_dir(self.staging)
        for p in stale:
            self.fs.delete_file(p.path)
        self.fs.create_dir(self.staging, recursive=True)
        write_json(self.fs, f"{self.staging}/_job.json", job)

    def staged_parts(self) -> list[StagedPart]:
        parts = []
        for info in self._list(self.staging):
            m = _PART.search(info.path)
            if m:
                meta = pq.ParquetFile(self.fs.open_input_file(info.path)).metadata
                parts.append(StagedPart(int(m.group(1)), int(m.group(2)), meta.num_rows, info.path,
                                        _errors_in(self.fs, info.path, meta)))
        return parts

    # -- write tasks ----------------------------------------------------------------------------
    def write_block(self, table: pa.Table) -> list[dict]:
        """Stage a block of answered rows: one file per unit present, hidden columns dropped."""
        written = []
        units = pc.unique(table.column(UNIT_COLUMN)).to_pylist()
        for unit in units:
            rows = table.filter(pc.equal(table.column(UNIT_COLUMN), unit))
            first = pc.min(rows.column(ROW_COLUMN)).as_py()
            rows = rows.drop_columns([UNIT_COLUMN, ROW_COLUMN])
            errors = pc.count(rows.column("error")).as_py() if "error" in rows.column_names else 0  # non-null
            rows = rows.replace_schema_metadata({**(rows.schema.metadata or {}), ERRORS_KEY: str(errors).encode()})
            final = f"{self.staging}/{part_name(unit, first)}"
            tmp = f"{self.staging}/_tmp-{uuid.uuid4().hex}.parquet"
            pq.write_table(rows, tmp, filesystem=self.fs)
            self.fs.move(tmp, final)
            written.append({"unit": unit, "first_row": first, "rows": rows.num_rows})
        return written

    # -- driver, after the run ------------------------------------------------------------------
    def commit(self, units: list[ReadUnit], job: dict, extra: dict) -> dict:
        """Publish staged parts and write the manifest last. Fails, publishing nothing, unless
        every unit's rows are staged exactly once."""
        parts = self.staged_parts()
        by_unit = defaultdict(list)
        for p in parts:
            by_unit[p.unit].append(p)
        problems = [u.index for u in units if not _contiguous(
            sorted(by_unit.get(u.index, []), key=lambda p: p.first_row), u.length * self.rows_per_input_row)]
        strays = sorted(set(by_unit) - {u.index for u in units})
        if problems or strays:
            raise RuntimeError(f"cannot commit {self.root}: units {problems[:10]} incomplete, units {strays[:10]} "
                               "unknown; nothing was published (run again with --mode resume)")
        files = [{"path": f"{self.root}/{part_name(p.unit, p.first_row)}", "rows": p.rows, "unit": p.unit,
                  "errors": p.errors} for p in sorted(parts, key=lambda p: (p.unit, p.first_row))]
        write_json(self.fs, f"{self.staging}/_commit.json", {"files": files})
        return self._publish(files, job, extra)

    def finish_interrupted_commit(self, files: list[dict], job: dict, extra: dict) -> dict:
        """Resume after a death during publishing: redo the moves ``_commit.json`` listed, write the manifest."""
        return self._publish(files, job, extra)

    def _publish(self, files: list[dict], job: dict, extra: dict) -> dict:
        keep = {f["path"] for f in files}
        for info in self._list(self.root):  # earlier output (overwrite mode) that this run does not own
            name = info.path.rsplit("/", 1)[-1]
            if info.type == pafs.FileType.File and info.path not in keep and (
                    _PART.search(name) or name == MANIFEST or name.endswith(".parquet")):
                self.fs.delete_file(info.path)
        for f in files:
            staged = f"{self.staging}/{f['path'].rsplit('/', 1)[-1]}"
            if self._exists(staged):
                self.fs.move(staged, f["path"])
            elif not self._exists(f["path"]):
                raise RuntimeError(f"cannot commit {self.root}: {staged} vanished before publishing")
        manifest = {**extra, "job": job, "output_files": files, "rows_out": sum(f["rows"] for f in files),
                    "errors": sum(f.get("errors", 0) for f in files)}
        write_json(self.fs, f"{self.root}/{MANIFEST}", manifest)
        self._delete_dir(self.staging)
        return manifest

    # -- helpers --------------------------------------------------------------------------------
    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _list(self, path: str) -> list[pafs.FileInfo]:
        if not self._exists(path):
            return []
        return self.fs.get_file_info(pafs.FileSelector(path, recursive=False))

    def _delete_dir(self, path: str) -> None:
        if self._exists(path):
            self.fs.delete_dir(path)


def _errors_in(fs: pafs.FileSystem, path: str, meta: pq.FileMetaData) -> int:
    """Rows with an error in a staged file: from its footer, else (staged by an older version) counted."""
    recorded = (meta.metadata or {}).get(ERRORS_KEY)
    if recorded is not None:
        return int(recorded)
    column = pq.read_table(fs.open_input_file(path), columns=["error"]).column("error")
    return len(column) - column.null_count


def _contiguous(parts: list[StagedPart], length: int) -> bool:
    expected = 0
    for p in parts:
        if p.first_row != expected:
            return False
        expected += p.rows
    return expected == length
