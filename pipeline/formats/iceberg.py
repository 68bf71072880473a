"""Apache Iceberg tables in and out (``iceberg://<catalog>/<namespace>.<table>``), through pyiceberg.

Imported only when a URI names a table; pyiceberg comes with the ``iceberg`` extra. The catalog is configured
the way pyiceberg configures it: ``~/.pyiceberg.yaml`` (or ``$PYICEBERG_HOME/.pyiceberg.yaml``), or
``PYICEBERG_CATALOG__<NAME>__URI`` / ``__WAREHOUSE`` and the other ``PYICEBERG_CATALOG__<NAME>__*`` variables.

Input: one snapshot (the current one at plan time, or the one an interrupted run of the same job pinned), its
data files as read units (row-group slices, as for Parquet folders). ``--where`` (pyiceberg's row filter syntax)
prunes files through the table's metadata, then is evaluated at plan time on the filter's own columns, row group
by row group: a unit is a run of consecutive matching rows, so actors read exactly the matching rows and the
protocol's row counts hold. A filter matching scattered rows gives many small units. ``--select`` projects
columns (the id, question and context columns are always read). Tables whose scan has delete files
(merge-on-read deletes) are refused: compact them first.

Output: the same staging as folder outputs (``pipeline.commit.OutputCommitter``, under
``<table location>/_qa_staging``); the final step differs. Staged files are moved to ``<table location>/data/``
and committed in one Iceberg transaction (``add_files``: no rewrite) whose snapshot summary carries the job's
identity hash and run id. Before committing, and before every retry, the table's history (the current
snapshot's ancestors) is searched for a snapshot with this job's hash: found, nothing is appended.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..commit import StagedPart
from ..extras import require
from ..faults import crash_point
from ..lake import TableError, filesystem_and_path
from ..records import IDENTITY_VERSION, JobIdentity, Manifest
from ..refresh import CommittedOutput, input_key, settings_of
from ..units import ReadUnit, plan_units
from . import ReadOptions, SourcePlan
from .table import StagedTableSink, TableStager

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table
    from pyiceberg.table.snapshots import Snapshot

SCHEME = "iceberg://"
JOB_KEY = "qa_batch.job"  # snapshot summary: sha256 of the job identity, in the form IDENTITY_KEY's version writes
IDENTITY_KEY = "qa_batch.identity_version"  # absent: version 1
RUN_KEY = "qa_batch.run"
ERRORS_KEY = "qa_batch.errors"
# --mode refresh: a snapshot that leaves the table holding exactly one job's rows (it created the table, or
# replaced the rows a refresh read) records the settings they were answered with and what their input was
SETTINGS_KEY = "qa_batch.settings"  # pipeline.refresh.settings_of, as JSON
INPUT_KEY = "qa_batch.input"  # pipeline.refresh.input_key
STAGING_DIR = "_qa_staging"
COMMIT_ATTEMPTS = 8  # our commit, each attempt after re-reading the table and re-checking the job's hash
RACE_HOOK = "QA_FAULT_ICEBERG_RACE"  # tests: a Parquet file another writer appends right before our commit
_raced = False


def is_table(uri: str) -> bool:
    return uri.startswith(SCHEME)


@dataclass(frozen=True)
class TableRef:
    catalog: str
    identifier: str  # namespace.table

    @classmethod
    def parse(cls, uri: str) -> TableRef:
        rest = uri[len(SCHEME):] if is_table(uri) else ""
        catalog, _, identifier = rest.partition("/")
        if not catalog or "." not in identifier.strip("."):
            raise TableError(f"{uri!r}: a table is iceberg://<catalog>/<namespace>.<table>")
        return cls(catalog, identifier)

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.catalog}/{self.identifier}"

    @property
    def namespace(self) -> str:
        return self.identifier.rsplit(".", 1)[0]

    def connect(self) -> Catalog:
        require("pyiceberg", "iceberg", "an iceberg:// table")
        from pyiceberg.catalog import load_catalog

        try:
            return load_catalog(self.catalog)
        except ValueError as exc:  # no such catalog configured: pyiceberg says which setting is missing
            raise TableError(f"{self.uri}: catalog {self.catalog!r} is not configured ({exc}); set "
                             f"PYICEBERG_CATALOG__{self.catalog.upper()}__URI (and __WAREHOUSE) or add it to "
                             "~/.pyiceberg.yaml") from exc

    def load(self, catalog: Catalog | None = None) -> Table | None:
        catalog = catalog or self.connect()  # first: without pyiceberg, the one-line error naming the extra
        from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

        try:
            return catalog.load_table(self.identifier)
        except (NoSuchTableError, NoSuchNamespaceError):
            return None


# ------------------------------------------------------------------------------------------- input


@dataclass(frozen=True)
class IcebergSource:
    """An input table pinned to one snapshot: its data files and what the job reads of them."""

    ref: TableRef
    snapshot_id: int
    where: str | None
    select: tuple[str, ...]  # () = every column
    fs: pafs.FileSystem
    files: tuple[str, ...]  # data files (filesystem paths) the scan plans, in plan order
    file_uris: tuple[str, ...]
    file_sizes: tuple[int, ...]
    partition_fields: tuple[tuple[str, str, str], ...]  # (source column, transform, name) of its partition spec

    @property
    def uri(self) -> str:
        return self.ref.uri

    @classmethod
    def open(cls, uri: str, options: ReadOptions) -> IcebergSource:
        return open_input(uri, options.where, options.select)

    def pinned(self, recorded: dict | None) -> IcebergSource:
        """The snapshot an interrupted run of this job read (``recorded``: its identity), else this one."""
        source = (recorded or {}).get("input") if (recorded or {}).get("version") else \
            {"format": "iceberg", **((recorded or {}).get("input_table") or {})}
        if not source or source.get("format") != "iceberg" or source.get("table") != self.ref.uri:
            return self
        snapshot = source.get("snapshot_id", self.snapshot_id)
        return self if snapshot == self.snapshot_id else open_input(self.ref.uri, self.where, self.select, snapshot)

    def identity(self) -> dict:
        """What a job's rows depend on: the table, the snapshot, the filter, the projection, the data files."""
        return {"format": "iceberg", "table": self.ref.uri, "snapshot_id": self.snapshot_id, "where": self.where,
                "select": list(self.select), "files": [{"path": p, "size": s}
                                                       for p, s in zip(self.file_uris, self.file_sizes)]}

    def plan(self, rows_per_unit: int, needed: Sequence[str]) -> SourcePlan:
        units, schema = self.plan_units(rows_per_unit, tuple(needed))
        return SourcePlan(self.fs, self.files, (), tuple(units), schema, self.identity())

    def plan_units(self, rows_per_unit: int, needed: tuple[str, ...]) -> tuple[list[ReadUnit], pa.Schema]:
        """Read units over the snapshot's data files, projected and filtered; the schema the actors read."""
        if not self.files:
            raise TableError(f"{self.ref.uri}: no rows at snapshot {self.snapshot_id}"
                             + (f" match --where {self.where!r}" if self.where else ""))
        units, schema, _ = plan_units(self.fs, list(self.files), rows_per_unit)
        if self.select:
            missing = [c for c in self.select if c not in schema.names]
            if missing:
                raise TableError(f"{self.ref.uri}: --select names {missing[0]!r}, not a column "
                                 f"(columns: {schema.names})")
            keep = tuple(c for c in schema.names if c in self.select or c in needed)
            schema = pa.schema([schema.field(c) for c in keep])
            units = [replace(u, columns=keep) for u in units]
        if self.where:
            units = self._matching(units)
            if not units:
                raise TableError(f"{self.ref.uri}: no rows at snapshot {self.snapshot_id} match "
                                 f"--where {self.where!r}")
        return units, schema

    def _matching(self, units: list[ReadUnit]) -> list[ReadUnit]:
        """Each unit cut to its runs of consecutive rows that match the filter (evaluated on its columns only)."""
        expression, columns = self._filter()
        out: list[ReadUnit] = []
        cache: tuple[tuple[str, int], np.ndarray] | None = None
        for u in units:
            if cache is None or cache[0] != (u.path, u.row_group):
                with self.fs.open_input_file(u.path) as f:
                    rows = pq.ParquetFile(f).read_row_group(u.row_group, columns=columns)
                rows = rows.append_column("__row", pa.array(np.arange(rows.num_rows)))
                cache = ((u.path, u.row_group), rows.filter(expression).column("__row").to_numpy())
            hits = cache[1]
            hits = hits[(hits >= u.offset) & (hits < u.offset + u.length)]
            for run in np.split(hits, np.flatnonzero(np.diff(hits) != 1) + 1) if hits.size else []:
                out.append(replace(u, index=len(out), offset=int(run[0]), length=int(run.size)))
        return out

    def _filter(self):
        from pyiceberg.expressions import parser
        from pyiceberg.expressions.visitors import bind, extract_field_ids
        from pyiceberg.io.pyarrow import expression_to_pyarrow

        table = self.ref.load()
        schema = table.schemas()[table.snapshot_by_id(self.snapshot_id).schema_id]
        bound = bind(schema, parser.parse(self.where), case_sensitive=True)
        return expression_to_pyarrow(bound, schema), [schema.find_column_name(i) for i in extract_field_ids(bound)]


def open_input(uri: str, where: str | None = None, select: tuple[str, ...] = (),
               snapshot_id: int | None = None) -> IcebergSource:
    """The table at ``snapshot_id`` (default: its current snapshot), its data files planned for ``where``."""
    ref = TableRef.parse(uri)
    table = ref.load()
    if table is None:
        raise TableError(f"{uri}: no such table in catalog {ref.catalog!r}")
    snapshot = table.snapshot_by_id(snapshot_id) if snapshot_id is not None else table.current_snapshot()
    if snapshot is None:
        raise TableError(f"{uri}: " + (f"snapshot {snapshot_id} (pinned by the interrupted run) is gone "
                                       "(expired?); use --mode overwrite" if snapshot_id is not None
                                       else "the table has no snapshot (no rows yet)"))
    from pyiceberg.expressions import AlwaysTrue
    from pyiceberg.manifest import FileFormat

    try:
        scan = table.scan(row_filter=where or AlwaysTrue(), snapshot_id=snapshot.snapshot_id)
        tasks = list(scan.plan_files())
    except ValueError as exc:  # a filter that does not parse or names no column
        raise TableError(f"{uri}: --where {where!r}: {exc}") from exc
    with_deletes = [t.file.file_path for t in tasks if t.delete_files]
    if with_deletes:
        raise TableError(f"{uri}: snapshot {snapshot.snapshot_id} has row-level delete files (merge-on-read) "
                         f"for {len(with_deletes)} data files, e.g. {with_deletes[0]}; they are not applied here: "
                         "compact the table first (Spark: CALL system.rewrite_data_files with delete-file-threshold)")
    not_parquet = [t.file.file_path for t in tasks if t.file.file_format != FileFormat.PARQUET]
    if not_parquet:
        raise TableError(f"{uri}: data file {not_parquet[0]} is not Parquet; only Parquet data files are read")
    fs, paths = None, []
    for t in tasks:
        fs, path = filesystem_and_path(t.file.file_path)
        paths.append(path)
    spec = table.specs()[table.metadata.default_spec_id]
    schema = table.schema()
    fields = tuple((schema.find_column_name(f.source_id), str(f.transform), f.name) for f in spec.fields)
    return IcebergSource(ref, snapshot.snapshot_id, where, tuple(select), fs or pafs.LocalFileSystem(), tuple(paths),
                      tuple(t.file.file_path for t in tasks), tuple(t.file.file_size_in_bytes for t in tasks), fields)


# ------------------------------------------------------------------------------------------ output


def committed_snapshot(table: Table | None, identity: JobIdentity) -> Snapshot | None:
    """The snapshot in the table's current history (the current snapshot and its ancestors) that committed this
    job: its summary carries the job's hash in the form of the identity version it records (a snapshot an
    earlier release committed carries that release's form)."""
    from pyiceberg.table.snapshots import ancestors_of

    if table is None:
        return None
    keys = identity.keys()
    for snapshot in ancestors_of(table.current_snapshot(), table.metadata):
        summary = snapshot.summary
        if summary is None or summary.get(JOB_KEY) is None:
            continue
        if summary.get(JOB_KEY) == keys.get(int(summary.get(IDENTITY_KEY) or 1)):
            return snapshot
    return None


class IcebergSink(StagedTableSink):
    """The commit protocol of ``pipeline.commit`` with an Iceberg transaction as its final step: a
    ``pipeline.formats.Sink``. Its stager holds no catalog connection."""

    def __init__(self, uri: str, rows_per_input_row: int = 1, run: str | None = None,
                 partition_fields: tuple[tuple[str, str, str], ...] = ()):
        self.ref = TableRef.parse(uri)
        self.uri = self.root = self.ref.uri  # what messages name
        catalog = self.ref.connect()
        table = self.ref.load(catalog)
        if table is not None:
            self.location = table.location().rstrip("/")
        else:
            catalog.create_namespace_if_not_exists(self.ref.namespace)
            table_name = self.ref.identifier.rsplit(".", 1)[1]
            self.location = catalog._resolve_table_location(None, self.ref.namespace, table_name)
        self.fs, location_path = filesystem_and_path(self.location)
        self.data_path = f"{location_path}/data"
        self.staged = TableStager(self.fs, f"{location_path}/{STAGING_DIR}", rows_per_input_row, run)
        self.run = self.staged.run
        self.partition_fields = partition_fields

    # -- driver, before the run ------------------------------------------------------------------
    def check_columns(self, names: Sequence[str]) -> None:
        """Refuse an existing table whose columns differ from the ones the job writes, naming the column."""
        table = self.ref.load()
        if table is None:
            return
        have = [f.name for f in table.schema().fields]
        missing = [n for n in names if n not in have]
        extra = [n for n in have if n not in names]
        if missing or extra:
            what = (f"has no column {missing[0]!r}, which the job writes" if missing
                    else f"has a column {extra[0]!r}, which the job does not write")
            raise TableError(f"output table {self.root} {what} (table: {have}; job: {names}); "
                             "write to a new table, or add the column (ALTER TABLE) first")

    def _committed(self, identity: JobIdentity) -> Manifest | None:
        snapshot = committed_snapshot(self.ref.load(), identity)
        return None if snapshot is None else _manifest_of(self.root, snapshot, identity.written(), [])

    def committed_output(self) -> CommittedOutput | None:
        """The current snapshot's data files; its settings only where the snapshot says the table's rows are all
        one job's (pipeline.refresh: a refresh reuses nothing else)."""
        table = self.ref.load()
        snapshot = None if table is None else table.current_snapshot()
        if snapshot is None:
            return None
        tasks = list(table.scan(snapshot_id=snapshot.snapshot_id).plan_files())
        summary = snapshot.summary
        settings, why = summary.get(SETTINGS_KEY), ""
        if any(t.delete_files for t in tasks):
            settings, why = None, "the table has row-level delete files"
        elif settings is None:
            why = "the table's current rows were not all written by one qa-batch run that recorded its settings"
        return CommittedOutput(self.fs, tuple(filesystem_and_path(t.file.file_path)[1] for t in tasks),
                               sum(t.file.record_count for t in tasks), {"snapshot_id": snapshot.snapshot_id},
                               json.loads(settings) if settings else None, summary.get(INPUT_KEY),
                               _manifest_of(self.root, snapshot, {}, []), why)

    # -- driver, after the run ------------------------------------------------------------------
    def commit(self, units: list[ReadUnit], identity: JobIdentity, report: dict,
               adopted: tuple[StagedPart, ...] = (), interrupted: list[dict] | None = None) -> Manifest:
        if interrupted is not None:
            return self._publish(interrupted, identity, report)
        files = self.staged.write_commit_list(units, adopted, dest=self.data_path)
        crash_point("commit-list")
        return self._publish(files, identity, report)

    def _publish(self, files: list[dict], identity: JobIdentity, report: dict) -> Manifest:
        snapshot = committed_snapshot(self.ref.load(), identity)
        if snapshot is None:
            self.fs.create_dir(self.data_path, recursive=True)
            self._move_in(files)
            snapshot = self._append(files, identity)
        crash_point("manifest")
        self.fs.delete_dir(self.staged.root)
        return _manifest_of(self.root, snapshot, identity.written(), files, report)

    def _uri(self, path: str) -> str:
        """A data file's URI, as the table's metadata names it (the location's scheme, not a filesystem path)."""
        return f"{self.location}/data/{path.rsplit('/', 1)[-1]}"

    def _append(self, files: list[dict], identity: JobIdentity) -> Snapshot:
        """One transaction adding ``files``, with the job's hash in its summary; retried on a concurrent commit
        after re-reading the table and checking that no other attempt committed this job meanwhile."""
        from pyiceberg.exceptions import CommitFailedException, TableAlreadyExistsError

        from ..faults import written_identity_version

        version = written_identity_version(IDENTITY_VERSION)
        props = {JOB_KEY: identity.key(version), RUN_KEY: self.run,
                 ERRORS_KEY: str(sum(f.get("errors", 0) for f in files)),
                 **({IDENTITY_KEY: str(version)} if version > 1 else {})}  # version 1 wrote none
        whole = {SETTINGS_KEY: json.dumps(settings_of(identity.to_json()), sort_keys=True),
                 INPUT_KEY: input_key(identity.to_json())}
        uris = [self._uri(f["path"]) for f in files]
        for attempt in range(COMMIT_ATTEMPTS):
            catalog = self.ref.connect()
            table = self.ref.load(catalog)
            found = committed_snapshot(table, identity)
            if found is not None:
                return found
            _race_hook(self.ref)
            try:
                if table is None:
                    schema = self._schema(files[0]["path"])
                    tx = catalog.create_table_transaction(self.ref.identifier, schema, location=self.location,
                                                          partition_spec=self._spec(schema))
                    tx.add_files(uris, snapshot_properties={**props, **whole})
                elif identity.replaces is not None:
                    tx = _one_attempt(table).transaction()
                    _replace_files(tx, table, identity.replaces["snapshot_id"], uris, {**props, **whole})
                else:
                    tx = _one_attempt(table).transaction()
                    tx.add_files(uris, snapshot_properties=props)
                tx.commit_transaction()
            except (CommitFailedException, TableAlreadyExistsError) as exc:
                print(f"commit to {self.root}: another writer committed first ({exc}); retrying", flush=True)
                time.sleep(min(0.1 * 2 ** attempt, 5.0))
                continue
            found = committed_snapshot(self.ref.load(catalog), identity)
            if found is None:
                raise RuntimeError(f"{self.root}: committed, but no snapshot carries job {props[JOB_KEY]}")
            return found
        raise RuntimeError(f"cannot commit {self.root}: {COMMIT_ATTEMPTS} concurrent commits won over ours; "
                           "nothing was appended (run again with --mode resume)")

    def _schema(self, path: str):
        """The new table's Iceberg schema, from a staged file's columns."""
        from pyiceberg.catalog import Catalog
        from pyiceberg.schema import assign_fresh_schema_ids

        with self.fs.open_input_file(path) as f:
            schema = pq.read_schema(f)
        # ids of our own (the conversion leaves -1), so that the partition spec can name its source columns
        return assign_fresh_schema_ids(Catalog._convert_schema_if_needed(pa.schema([f.remove_metadata()
                                                                                     for f in schema])))

    def _spec(self, schema):
        """The input table's partition spec, on ``schema``'s columns (``add_files`` reads each file's partition
        from its statistics: a unit's rows come from one data file, so from one partition)."""
        from pyiceberg.partitioning import UNPARTITIONED_PARTITION_SPEC, PartitionField, PartitionSpec
        from pyiceberg.transforms import parse_transform

        names = [f.name for f in schema.fields]
        fields = [PartitionField(schema.find_field(src).field_id, 1000 + i, parse_transform(transform), name)
                  for i, (src, transform, name) in enumerate(self.partition_fields) if src in names]
        return PartitionSpec(*fields) if fields else UNPARTITIONED_PARTITION_SPEC


def _replace_files(tx, table: Table, snapshot_id: int, uris: list[str], props: dict) -> None:
    """One overwrite snapshot in ``tx``: the data files of snapshot ``snapshot_id`` (what the refresh read)
    that the table still has are removed, ``uris`` added; files another writer added since stay."""
    from pyiceberg.table import _parquet_files_to_data_files

    if tx.table_metadata.name_mapping() is None:  # add_files sets it too: our files carry no field ids
        from pyiceberg.table import TableProperties

        tx.set_properties(**{TableProperties.DEFAULT_NAME_MAPPING:
                             tx.table_metadata.schema().name_mapping.model_dump_json()})
    if table.snapshot_by_id(snapshot_id) is None:
        raise TableError(f"{table.name()}: snapshot {snapshot_id}, which this refresh read, is gone (expired?); "
                         "run --mode refresh again")
    live = {t.file.file_path for t in table.scan().plan_files()}
    with tx.update_snapshot(snapshot_properties=props).overwrite() as update:
        for t in table.scan(snapshot_id=snapshot_id).plan_files():
            if t.file.file_path in live:
                update.delete_data_file(t.file)
        for data_file in _parquet_files_to_data_files(tx.table_metadata, uris, table.io):
            update.append_data_file(data_file)


def _one_attempt(table: Table) -> Table:
    """pyiceberg retries a failed commit itself, rebuilding the append on fresh metadata without our job-hash
    check; with no retries there, our loop re-checks the history before each new attempt. Only this process's
    view of the table properties changes: the commit sends updates, not properties."""
    props = {**table.metadata.properties, "commit.retry.num-retries": "0"}
    table.metadata = table.metadata.model_copy(update={"properties": props})
    return table


def _manifest_of(uri: str, snapshot: Snapshot, job: dict, files: list[dict], report: dict | None = None) -> Manifest:
    summary = snapshot.summary
    return Manifest(**(report or {}), job=job, run=summary.get(RUN_KEY), output_files=files,
                    rows_out=int(summary.get("added-records", 0)), errors=int(summary.get(ERRORS_KEY, 0)),
                    commit={"format": "iceberg", "table": uri, "snapshot_id": snapshot.snapshot_id,
                            "job_sha256": summary.get(JOB_KEY)})


def _race_hook(ref: TableRef) -> None:
    """Tests: another writer (its own catalog connection) appends the rows of the Parquet file named by
    QA_FAULT_ICEBERG_RACE right before our first commit attempt, so that attempt loses the race."""
    global _raced
    path = os.environ.get(RACE_HOOK)
    if not path or _raced:
        return
    _raced = True
    ref.load(ref.connect()).append(pq.read_table(path))
