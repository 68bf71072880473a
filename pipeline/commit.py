"""Exactly-once output: stage per-unit files, then commit them with a manifest swapped in last.

Layout under the output root OUT (any pyarrow filesystem: local or s3://)::

    OUT/_staging/_job.json                     what the staged files answer (input, model, settings)
    OUT/_staging/_lease.json                   the live run: id, host, pid, start, heartbeat
    OUT/_staging/part-<run>-UUUUUU-RRRRRR.parquet  rows of read unit U from row R, staged by run <run>
    OUT/_staging/_commit.json                  written when every unit is staged: the files to publish
    OUT/part-<run>-UUUUUU-RRRRRR.parquet       published answers
    OUT/_manifest.json                         the commit marker: every file of the committed set (its name,
                                               relative to OUT: ``published_path``), its rows

Staged names are a function of the plan and the run, so a retried actor task rewrites the same name with
the same rows. A file or marker appears under its name only once complete: written under a temporary name
and renamed on local disks, one upload on object stores (an object appears only when its upload completes;
no copy). Readers that skip
``_``-prefixed paths (pyarrow, Spark, Hive, Ray) never see staging; readers that need the committed set read
``_manifest.json``.

Publishing never touches a committed file before the new manifest is in place: new files get names that
cannot collide with committed ones (the run id is in them), the manifest is swapped (atomically) last, and
only then are files of the previous commit removed. So a reader that follows ``_manifest.json`` sees, at any
moment, either the previous committed set or the new one, never a mix.

Crash points (``pipeline.faults``; docs/concepts/exactly-once.md has the table of what a reader sees and what resume does):

- ``stage:<k>``   after the run's k-th staged file (driver and staging actor die): resume keeps every complete
                  unit and answers only the rest.
- ``commit-list`` after ``_commit.json`` is durable: resume publishes exactly the files it lists.
- ``publish:<k>`` after the k-th listed file is moved to the root: resume moves the rest (roll forward).
- ``manifest``    after the new manifest is in place, before old files and staging are removed: resume only
                  cleans up.

Fencing: a commit takes, per unit, the parts staged by the current run, or those an earlier dead run of the
same job staged completely (adopted at plan time); a late write of another run is never taken. A second run
started while the first is alive refuses (the lease): the lease is live while its pid runs (same host) or its
heartbeat is younger than LEASE_TTL_S (other hosts).
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .faults import crash_at, crash_point
from .lake import read_json, write_json
from .records import JobIdentity, Manifest
from .units import ReadUnit

STAGING = "_staging"
MANIFEST = "_manifest.json"
JOB_FILE = "_job.json"
LEASE_FILE = "_lease.json"
COMMIT_LIST = "_commit.json"
UNIT_COLUMN = "_unit"  # hidden columns carried from the answering stage to the sink
ROW_COLUMN = "_row"
MODES = ("error", "overwrite", "resume", "refresh")
ERRORS_KEY = b"qa_batch.errors"  # staged files' footers count their rows with an error: the manifest reads it
RUN_KEY = b"qa_batch.run"
LEASE_TTL_S = 120.0  # a lease on another host whose heartbeat is older than this is stale
LEASE_RENEW_S = 15.0
_PART = re.compile(r"part-(?:([0-9a-f]{12})-)?(\d{6,})-(\d{6,})\.parquet$")


class OutputExistsError(FileExistsError):
    pass


class OutputBusyError(OutputExistsError):
    """Another live run holds the output's lease."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def part_name(run: str, unit: int, first_row: int) -> str:
    return f"part-{run}-{unit:06d}-{first_row:06d}.parquet"


@dataclass(frozen=True)
class StagedPart:
    unit: int
    first_row: int
    rows: int
    path: str
    errors: int  # rows with an error
    run: str = ""  # the run that staged it ("": staged before runs had ids)


@dataclass(frozen=True)
class Lease:
    run: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float

    def alive(self, now: float) -> bool:
        if self.host == socket.gethostname():
            return _pid_alive(self.pid)
        return now - self.heartbeat_at < LEASE_TTL_S


@dataclass(frozen=True)
class OutputState:
    """What ``--mode`` finds at the output before a run."""

    committed: Manifest | None = None  # resume of a job already committed: its manifest
    commit_list: list[dict] | None = None  # a commit interrupted while publishing: the files it lists
    staged: tuple[StagedPart, ...] = ()  # staged parts of this job (resume)


def pending_units(units: list[ReadUnit], staged: tuple[StagedPart, ...], rows_per_input_row: int = 1
                  ) -> tuple[list[ReadUnit], int, tuple[StagedPart, ...], tuple[StagedPart, ...]]:
    """Units still to answer, input rows already staged, the staged parts kept (adopted) and those to remove
    first. A unit is kept when one run staged all its rows; otherwise (a run died after staging some of its
    pieces) it is redone whole."""
    by_unit_run: dict[int, dict[str, list[StagedPart]]] = defaultdict(lambda: defaultdict(list))
    for p in staged:
        by_unit_run[p.unit][p.run].append(p)
    pending, staged_rows, kept, stale = [], 0, [], []
    for u in units:
        runs = by_unit_run.get(u.index, {})
        complete = next((ps for ps in runs.values() if _contiguous(ps, u.length * rows_per_input_row)), None)
        if complete is not None:
            staged_rows += u.length
            kept.extend(complete)
        else:
            pending.append(u)
        stale.extend(p for ps in runs.values() if ps is not complete for p in ps)
    return pending, staged_rows, tuple(kept), tuple(stale)


class OutputCommitter:
    """The protocol's state on one filesystem; used by the driver and by the answering actors, which stage."""

    def __init__(self, fs: pafs.FileSystem, root: str, rows_per_input_row: int = 1, run: str | None = None):
        """``rows_per_input_row``: output rows each input row yields (fan-out asks several questions);
        ``run``: this run's id (a new one if not given)."""
        self.fs, self.root = fs, root.rstrip("/")
        self.rows_per_input_row = rows_per_input_row
        self.run = run or new_run_id()
        self.staging = f"{self.root}/{STAGING}"
        self.driver_pid = os.getpid()  # made by the driver; actors get a pickled copy

    # -- driver, before the run ------------------------------------------------------------------
    def inspect(self, mode: str, identity: JobIdentity) -> OutputState:
        """What the output already holds for ``mode``, read only; raises where the mode refuses it."""
        if mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
        self._refuse_if_leased()
        exists = self._exists(self.root) and bool(self._list(self.root))
        if exists and mode == "error":
            raise OutputExistsError(f"output {self.root} exists and is not empty; use --mode overwrite to replace "
                                    "it or --mode resume to finish an interrupted run")
        if mode != "resume":
            return OutputState()
        staged_job = f"{self.staging}/{JOB_FILE}"
        if not self._exists(staged_job):  # nothing staged (or only strays written after a commit)
            manifest_path = f"{self.root}/{MANIFEST}"
            if not self._exists(manifest_path):
                return OutputState()
            manifest = Manifest.from_json(read_json(self.fs, manifest_path))
            check_same_job(identity, manifest.job, f"output {self.root}", "holds a committed run of a different "
                           "job (input, model or settings differ); use --mode overwrite")
            return OutputState(committed=manifest)
        check_same_job(identity, read_json(self.fs, staged_job), self.staging, "was staged by a different job "
                       "(input, model or settings differ); use --mode overwrite to start again")
        commit_list = f"{self.staging}/{COMMIT_LIST}"
        return OutputState(commit_list=read_json(self.fs, commit_list)["files"] if self._exists(commit_list) else None,
                           staged=tuple(self.staged_parts()))

    def staged_job(self) -> dict | None:
        """The identity of the job whose answers are staged (``_job.json``), if any."""
        path = f"{self.staging}/{JOB_FILE}"
        return read_json(self.fs, path) if self._exists(path) else None

    def recorded_job(self) -> dict | None:
        """The identity of the job staged here, else of the committed one (its manifest's), if any: what a
        resume of ``--precision auto`` reads its variant from."""
        manifest_path = f"{self.root}/{MANIFEST}"
        return self.staged_job() or (read_json(self.fs, manifest_path).get("job")
                                     if self._exists(manifest_path) else None)

    def begin(self, mode: str, identity: JobIdentity, stale: tuple[StagedPart, ...] = ()) -> OutputCommitter:
        """Take the output for this run: the lease, staging cleared for overwrite, ``stale`` parts removed; returns
        the stager the answering actors write through (this object: it pickles without connections)."""
        self._refuse_if_leased()  # again: another run may have started since the plan
        if mode == "overwrite":
            self._delete_dir(self.staging)
        self.fs.create_dir(self.staging, recursive=True)
        self.renew_lease(started_at=time.time())
        for p in stale:
            self.fs.delete_file(p.path)
        write_json_atomic(self.fs, f"{self.staging}/{JOB_FILE}", identity.written())
        return self

    def renew_lease(self, started_at: float | None = None) -> None:
        """Write (or refresh) this run's lease; the driver calls it every LEASE_RENEW_S while it runs."""
        path = f"{self.staging}/{LEASE_FILE}"
        if started_at is None:
            started_at = read_json(self.fs, path)["started_at"] if self._exists(path) else time.time()
        lease = Lease(self.run, socket.gethostname(), os.getpid(), started_at, time.time())
        write_json_atomic(self.fs, path, asdict(lease))

    def release_lease(self) -> None:
        """Give the output up after a failed run (a committed run's lease goes with its staging)."""
        path = f"{self.staging}/{LEASE_FILE}"
        if self._exists(path) and read_json(self.fs, path).get("run") == self.run:
            self.fs.delete_file(path)

    def _refuse_if_leased(self) -> None:
        path = f"{self.staging}/{LEASE_FILE}"
        if not self._exists(path):
            return
        lease = Lease(**read_json(self.fs, path))
        now = time.time()
        if lease.run != self.run and lease.alive(now):
            raise OutputBusyError(
                f"output {self.root} is being written by run {lease.run}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(lease.started_at))} on {lease.host} "
                f"(pid {lease.pid}, heartbeat {now - lease.heartbeat_at:.0f} s ago); wait for it to finish, or if "
                f"it died on another host, run again after {LEASE_TTL_S:.0f} s without a heartbeat")

    def staged_parts(self) -> list[StagedPart]:
        parts = []
        for info in self._list(self.staging):
            m = _PART.search(info.path)
            if m:
                meta = pq.ParquetFile(self.fs.open_input_file(info.path)).metadata
                parts.append(StagedPart(int(m.group(2)), int(m.group(3)), meta.num_rows, info.path,
                                        _errors_in(self.fs, info.path, meta), m.group(1) or ""))
        return parts

    # -- answering actors ----------------------------------------------------------------------------
    def write_block(self, table: pa.Table) -> list[dict]:
        """Stage a block of answered rows: one file per unit present, hidden columns dropped."""
        written = []
        units = pc.unique(table.column(UNIT_COLUMN)).to_pylist()
        for unit in units:
            rows = table.filter(pc.equal(table.column(UNIT_COLUMN), unit))
            first = pc.min(rows.column(ROW_COLUMN)).as_py()
            rows = rows.drop_columns([UNIT_COLUMN, ROW_COLUMN])
            errors = pc.count(rows.column("error")).as_py() if "error" in rows.column_names else 0  # non-null
            footer = {**(rows.schema.metadata or {}), ERRORS_KEY: str(errors).encode(), RUN_KEY: self.run.encode()}
            self._stage(rows.replace_schema_metadata(footer), unit, first)
            written.append({"unit": unit, "first_row": first, "rows": rows.num_rows})
            if crash_at() is not None:
                mine = sum(1 for p in self.staged_parts() if p.run == self.run)
                crash_point("stage", mine, also_kill=self.driver_pid)
        return written

    def write_empty(self, schema: pa.Schema) -> None:
        """Stage the one file of a job with no rows (unit 0, no rows, the output's columns), so that a reader of
        the committed output finds its schema: a query over an empty night returns no rows, not an error."""
        footer = {**(schema.metadata or {}), ERRORS_KEY: b"0", RUN_KEY: self.run.encode()}
        self._stage(schema.with_metadata(footer).empty_table(), 0, 0)

    def _stage(self, rows: pa.Table, unit: int, first: int) -> None:
        final = f"{self.staging}/{part_name(self.run, unit, first)}"
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = f"{self.staging}/_tmp-{uuid.uuid4().hex}.parquet"
            pq.write_table(rows, tmp, filesystem=self.fs)
            self.fs.move(tmp, final)
        else:  # one upload: an object appears whole or not at all
            pq.write_table(rows, final, filesystem=self.fs)

    def discard(self, unit: int, first_row: int) -> None:
        """Remove a file this run staged (the rest of a piece that a crash left half staged)."""
        self.fs.delete_file(f"{self.staging}/{part_name(self.run, unit, first_row)}")

    # -- driver, after the run ------------------------------------------------------------------
    def commit(self, units: list[ReadUnit], identity: JobIdentity, report: dict,
               adopted: tuple[StagedPart, ...] = (), interrupted: list[dict] | None = None) -> Manifest:
        """Publish this job's staged parts and swap the manifest in last. Fails, publishing nothing, unless
        every unit's rows are staged exactly once, by this run or (``adopted``) by an earlier one.
        ``interrupted``: the files a commit that died while publishing listed; their moves are finished."""
        if interrupted is not None:
            return self._publish(interrupted, identity, report)
        files = self.write_commit_list(units, adopted)
        crash_point("commit-list")
        return self._publish(files, identity, report)

    def write_commit_list(self, units: list[ReadUnit], adopted: tuple[StagedPart, ...] = (),
                          dest: str | None = None) -> list[dict]:
        """Choose each unit's staged parts (this run's, else an adopted complete set) and make the list of files
        to publish durable (``_commit.json``); each file's ``path`` is where it goes: its name, relative to the
        output root, or (``dest``, a table sink's data folder) its full path there. Raises, writing nothing, if a
        unit is incomplete or unknown. A job with no units commits its empty file (``write_empty``) if staged."""
        units = units or [ReadUnit(0, "", 0, 0, 0)]
        adopted_paths = {p.path for p in adopted}
        by_unit: dict[int, dict[str, list[StagedPart]]] = defaultdict(lambda: defaultdict(list))
        for p in self.staged_parts():
            if p.run == self.run or p.path in adopted_paths:  # a late write of another run is never taken
                by_unit[p.unit][p.run].append(p)
        chosen, problems = [], []
        for u in units:
            runs = by_unit.get(u.index, {})
            mine = runs.get(self.run, [])
            parts = mine if _contiguous(mine, u.length * self.rows_per_input_row) else next(
                (ps for run, ps in runs.items() if run != self.run
                 and _contiguous(ps, u.length * self.rows_per_input_row)), None)
            if parts is None:
                problems.append(u.index)
            else:
                chosen.extend(parts)
        strays = sorted(set(by_unit) - {u.index for u in units})
        if problems or strays:
            raise RuntimeError(f"cannot commit {self.root}: units {problems[:10]} incomplete, units {strays[:10]} "
                               "unknown; nothing was published (run again with --mode resume)")
        prefix = "" if dest is None else dest.rstrip("/") + "/"
        files = [{"path": prefix + p.path.rsplit("/", 1)[-1], "rows": p.rows, "unit": p.unit,
                  "errors": p.errors} for p in sorted(chosen, key=lambda p: (p.unit, p.first_row))]
        write_json_atomic(self.fs, f"{self.staging}/{COMMIT_LIST}", {"run": self.run, "files": files})
        return files

    def _publish(self, files: list[dict], identity: JobIdentity, report: dict) -> Manifest:
        # Listed by name (a commit list of an earlier release: by full path, of which the name is taken)
        files = _names(files)
        for k, f in enumerate(files, 1):
            staged, target = f"{self.staging}/{f['path']}", published_path(self.root, f["path"])
            if self._exists(staged):
                self.fs.move(staged, target)
            elif not self._exists(target):
                raise RuntimeError(f"cannot commit {self.root}: {staged} vanished before publishing")
            crash_point("publish", k)
        manifest_path = f"{self.root}/{MANIFEST}"
        current = Manifest.from_json(read_json(self.fs, manifest_path)) if self._exists(manifest_path) else None
        if current is not None and identity.compare(current.job).same and _names(current.output_files) == files:
            manifest = current  # swapped in already, before a crash: one manifest write per commit
        else:
            manifest = Manifest(**report, job=identity.written(), run=self.run, output_files=files,
                                rows_out=sum(f["rows"] for f in files), errors=sum(f.get("errors", 0) for f in files),
                                commit={"format": "parquet", "path": self.root, "manifest": manifest_path})
            write_json_atomic(self.fs, manifest_path, manifest.to_json())
        crash_point("manifest")
        keep = {f["path"] for f in files}
        for info in self._list(self.root):  # the previous commit's files, now that no manifest names them
            name = info.path.rsplit("/", 1)[-1]
            if info.type == pafs.FileType.File and name not in keep and name.endswith(".parquet"):
                self.fs.delete_file(info.path)
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


def published_path(root: str, path: str) -> str:
    """Where a committed file named in a manifest (``output_files[].path``) is: that name below the folder
    ``root`` that holds the manifest. Manifests name their files relative to the output root, so a folder moved
    or mounted elsewhere still reads through its manifest; those of earlier releases named them by full path, of
    which the file name is taken (a folder output keeps its files at its root)."""
    return f"{root.rstrip('/')}/{path.rsplit('/', 1)[-1]}"


def _names(files: list[dict]) -> list[dict]:
    return [{**f, "path": f["path"].rsplit("/", 1)[-1]} for f in files]


def check_same_job(identity: JobIdentity, recorded: dict, where: str, refusal: str) -> None:
    """Refuse (OutputExistsError: ``where`` ``refusal``) unless ``recorded`` is this job's identity; one line when
    an earlier release recorded it (pipeline/records.py)."""
    import sys

    from .records import IDENTITY_VERSION

    found = identity.compare(recorded)
    note = found.note(where)
    if not found.comparable:
        raise OutputExistsError(f"{note}; use --mode overwrite to start again")
    if note:
        print(note, file=sys.stderr, flush=True)
    if not found.same:
        raise OutputExistsError(f"{where} {refusal}" + (f" (recorded in identity version {found.version}, "
                                                        f"now {IDENTITY_VERSION})" if note else ""))


def write_json_atomic(fs: pafs.FileSystem, path: str, value) -> None:
    """A marker that appears whole or not at all: a temporary name then a rename on local disks; on object
    stores one upload, which is atomic there (pyarrow completes it, single or multipart, at close)."""
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        write_json(fs, tmp, value)
        fs.move(tmp, path)
    else:
        write_json(fs, path, value)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _errors_in(fs: pafs.FileSystem, path: str, meta: pq.FileMetaData) -> int:
    """Rows with an error in a staged file: from its footer, else (staged by an older version) counted."""
    recorded = (meta.metadata or {}).get(ERRORS_KEY)
    if recorded is not None:
        return int(recorded)
    column = pq.read_table(fs.open_input_file(path), columns=["error"]).column("error")
    return len(column) - column.null_count


def _contiguous(parts: list[StagedPart], length: int) -> bool:
    expected = 0
    for p in sorted(parts, key=lambda p: p.first_row):
        if p.first_row != expected:
            return False
        expected += p.rows
    return expected == length
