"""Delta Lake tables in and out (a local or ``s3://`` folder that holds ``_delta_log/``), through deltalake (delta-rs).

Imported to tell a URI's format (``claims``: a stat of ``<uri>/_delta_log``, and of ``<uri>/_qa_staging``, through
pyarrow); deltalake itself, from the ``delta`` extra, only once a Delta table is read or written. On S3 it takes the
endpoint, region and credentials from the same AWS variables as pyarrow (``storage_options``).

Input: one table version (the current one at plan time, or the one an interrupted run of the same job pinned),
its data files as read units (row-group slices, as for Parquet folders), in path order. Partition columns, which
Delta keeps in the log rather than in the data files, come from each file's partition values, as strings (as
Hive partition keys of Parquet folders do). Deletion vectors are applied: a unit is a run of consecutive rows
that are not deleted, so deleted rows are never read. ``--where`` (a SQL predicate: comparisons, ``[NOT] IN``,
``IS [NOT] NULL``, ``[NOT] BETWEEN``, ``AND``, ``OR``, ``NOT``; the syntax of delta-rs's file pruning) prunes
files through the log's statistics and partition values, then is evaluated at plan time on the filter's own
columns, row group by row group, as for Iceberg. ``--select`` projects columns. Tables with column mapping
(``delta.columnMapping.mode`` name or id), or a reader feature this reader does not know, are refused.

Output: the same staging as folder outputs (``pipeline.commit.OutputCommitter``, under
``<table>/_qa_staging``); the final step differs. Staged files are moved to the table's folder and added in one
Delta commit (``create_write_transaction`` with add actions: no rewrite) that carries an application
transaction (``txn``: app id ``qa_batch:<sha256 of the job identity>``, version 1) and, in its commit info, the
job's hash, run id, rows and errors. Before committing, and before every retry after a concurrent commit won,
``DeltaTable.transaction_version`` of that app id says whether this job is in the table already: found, nothing
is appended.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..commit import StagedPart
from ..extras import require
from ..faults import crash_point, written_identity_version
from ..lake import TableError, filesystem_and_path
from ..records import IDENTITY_VERSION, JobIdentity, Manifest
from ..refresh import CommittedOutput, input_key, settings_of
from ..units import InputFileError, ReadUnit, plan_units
from . import ReadOptions, SourcePlan
from .table import StagedTableSink, TableStager

if TYPE_CHECKING:
    from types import ModuleType

    from deltalake import DeltaTable

LOG_DIR = "_delta_log"
APP_PREFIX = "qa_batch:"  # a commit's application transaction: APP_PREFIX + sha256 of the job identity
TXN_VERSION = 1  # the transaction's version: a job commits once
JOB_KEY = "qa_batch.job"  # commit info: sha256 of the job identity, in the form IDENTITY_KEY's version writes
IDENTITY_KEY = "qa_batch.identity_version"
RUN_KEY = "qa_batch.run"
ROWS_KEY = "qa_batch.rows"
ERRORS_KEY = "qa_batch.errors"
# --mode refresh: a commit that leaves the table holding exactly one job's rows (it created the table, or replaced
# the rows a refresh read) records the settings they were answered with and what their input was
SETTINGS_KEY = "qa_batch.settings"  # pipeline.refresh.settings_of
INPUT_KEY = "qa_batch.input"  # pipeline.refresh.input_key
STAGING_DIR = "_qa_staging"
COMMIT_ATTEMPTS = 8  # our commit, each attempt after re-reading the table and re-checking the job's transaction
RACE_HOOK = "QA_FAULT_DELTA_RACE"  # tests: a Parquet file another writer appends right before our commit
PIP = 'pip install -e ".[delta]"'
# Reader features whose tables read right from the data files and the log as this module reads them
# (deletion vectors: applied; the others change nothing in a Parquet file's rows).
READABLE = frozenset({"deletionVectors", "timestampNtz", "v2Checkpoint", "vacuumProtocolCheck", "variantType",
                      "variantType-preview"})
_raced = False


def claims(uri: str) -> bool:
    """Whether ``uri`` is a folder holding ``_delta_log/``, or the staging of a first run into a new table that
    died before its commit (so that ``--mode resume`` finishes it without ``--output-format delta``): a stat or
    two through pyarrow, without deltalake."""
    if not isinstance(uri, str) or uri.startswith("iceberg://") or any(c in uri for c in "*?["):
        return False
    try:
        fs, path = filesystem_and_path(uri)
        return any(fs.get_file_info(f"{path.rstrip('/')}/{name}").type == pafs.FileType.Directory
                   for name in (LOG_DIR, STAGING_DIR))
    except Exception:  # noqa: BLE001 - not a URI pyarrow reaches: not ours (the Parquet reader says why)
        return False


def table_uri(uri: str) -> str:
    """The table's URI as the job identity and deltalake name it: an absolute local path, or ``scheme://path``."""
    fs, path = filesystem_and_path(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return path.rstrip("/") or "/"
    return f"{uri.split('://', 1)[0]}://{path.rstrip('/')}"


def storage_options(uri: str) -> dict[str, str]:
    """deltalake's settings for ``uri``: on S3, the endpoint and region of the AWS variables pyarrow reads
    (``pipeline.lake.filesystem_and_path``); credentials it reads from the environment itself."""
    if not uri.startswith("s3://"):
        return {}
    options = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):  # an S3-compatible store without TLS (local MinIO, tests)
            options["AWS_ALLOW_HTTP"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["AWS_REGION"] = region
    return options


def require_deltalake(what: str) -> ModuleType:
    """The deltalake module, or the one line naming the extra (``pipeline.extras``)."""
    return require("deltalake", "delta", what)


def load(uri: str, version: int | None = None) -> DeltaTable | None:
    """The table at ``uri`` (at ``version``, default the latest), None if there is none."""
    dl = require_deltalake(f"{uri} (a Delta table)")
    from deltalake.exceptions import DeltaError, TableNotFoundError

    try:
        return dl.DeltaTable(uri, version=version, storage_options=storage_options(uri) or None)
    except TableNotFoundError:
        return None
    except DeltaError as exc:
        if version is not None:
            raise TableError(f"{uri}: version {version} (pinned by the interrupted run) cannot be read "
                             f"({one_line(exc)}); use --mode overwrite") from exc
        raise TableError(f"{uri}: {one_line(exc)}") from exc


def one_line(exc: BaseException) -> str:
    """delta-rs's error text (several lines, terminal colours) as one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    return " ".join(part.strip(" ↳") for part in text.splitlines() if part.strip(" ↳"))


def _fields(schema) -> list[dict]:
    """A deltalake schema's top-level fields as the log writes them (name, type, nullable, metadata)."""
    return json.loads(schema.to_json())["fields"]


def _column_mapping(dt: DeltaTable) -> str | None:
    mode = dt.metadata().configuration.get("delta.columnMapping.mode") or "none"
    return None if mode == "none" else mode


# ------------------------------------------------------------------------------------------- input


@dataclass(frozen=True, eq=False)
class DeltaFile:
    """One data file of the pinned version."""

    path: str  # filesystem path (pyarrow)
    log_path: str  # as the log names it: relative to the table, URL-encoded
    size: int
    partitions: tuple[tuple[str, str | None], ...]  # its partition values, as text (the job's columns)
    typed: dict = field(default_factory=dict)  # the same, typed as the table's schema types them (for --where)
    keep: np.ndarray | None = None  # deletion vector: True for each row not deleted (rows past its end: kept)


@dataclass(frozen=True)
class DeltaSource:
    """An input table pinned to one version: its data files and what the job reads of them."""

    uri: str
    version: int
    where: str | None
    select: tuple[str, ...]  # () = every column
    fs: pafs.FileSystem
    files: tuple[DeltaFile, ...]  # in path order
    schema: pa.Schema  # the table's columns, partition columns with their own types
    partition_columns: tuple[str, ...]

    @property
    def partition_fields(self) -> tuple[tuple[str, str, str], ...]:
        """(source column, transform, name): a Delta partition column is Iceberg's identity transform."""
        return tuple((c, "identity", c) for c in self.partition_columns)

    @classmethod
    def open(cls, uri: str, options: ReadOptions) -> DeltaSource:
        return open_input(uri, options.where, options.select)

    def pinned(self, recorded: dict | None) -> DeltaSource:
        """The version an interrupted run of this job read (``recorded``: its identity), else this one."""
        source = (recorded or {}).get("input") if (recorded or {}).get("version") else None
        if not source or source.get("format") != "delta" or source.get("table") != self.uri:
            return self
        version = source.get("version", self.version)
        return self if version == self.version else open_input(self.uri, self.where, self.select, version)

    def identity(self) -> dict:
        """What a job's rows depend on: the table, the version, the filter, the projection, the data files."""
        return {"format": "delta", "table": self.uri, "version": self.version, "where": self.where,
                "select": list(self.select),
                "files": [{"path": f.log_path, "size": f.size,
                           **({"deleted_rows": int(f.keep.size - f.keep.sum())} if f.keep is not None else {})}
                          for f in self.files]}

    def plan(self, rows_per_unit: int, needed: Sequence[str]) -> SourcePlan:
        units, schema = self.plan_units(rows_per_unit, tuple(needed))
        return SourcePlan(self.fs, tuple(f.path for f in self.files), (), tuple(units), schema, self.identity())

    def plan_units(self, rows_per_unit: int, needed: tuple[str, ...]) -> tuple[list[ReadUnit], pa.Schema]:
        """Read units over the version's data files, without deleted rows, projected and filtered; the schema
        the actors read (data columns in the table's order, then the partition columns, as text)."""
        none = f"{self.uri}: no rows at version {self.version}" + (f" match --where {self.where!r}"
                                                                   if self.where else "")
        if not self.files:
            raise TableError(none)
        try:
            units, file_schema, _ = plan_units(self.fs, [f.path for f in self.files], rows_per_unit)
        except InputFileError as exc:  # files of one table with different columns: the schema evolved
            first = str(exc).splitlines()[0]
            raise TableError(f"{self.uri} at version {self.version}: {first}; its data files were written under "
                             "different schemas (a column added or changed since), which this reader does not "
                             "reconcile: rewrite the table (e.g. overwrite it with its own rows) first") from exc
        data = [c for c in self.schema.names if c not in self.partition_columns]
        missing = [c for c in data if c not in file_schema.names]
        if missing:
            raise TableError(f"{self.uri} at version {self.version}: column {missing[0]!r} is in the table's "
                             "schema but not in its data files (added after they were written); rewrite the table "
                             "first")
        if self.select:
            unknown = [c for c in self.select if c not in self.schema.names]
            if unknown:
                raise TableError(f"{self.uri}: --select names {unknown[0]!r}, not a column "
                                 f"(columns: {self.schema.names})")
            wanted = set(self.select) | set(needed)
            data = [c for c in data if c in wanted]
            partitions = [c for c in self.partition_columns if c in wanted]
        else:
            partitions = list(self.partition_columns)
        schema = pa.schema([file_schema.field(c).remove_metadata() for c in data]
                           + [pa.field(c, pa.string()) for c in partitions])
        by_path = {f.path: f for f in self.files}
        units = [replace(u, columns=tuple(data), partitions=tuple(
            (k, v) for k, v in by_path[u.path].partitions if k in partitions)) for u in units]
        if self.where or any(f.keep is not None for f in self.files):
            units = self._cut(units, by_path)
            if not units:
                raise TableError(none)
        return units, schema

    def _cut(self, units: list[ReadUnit], by_path: dict[str, DeltaFile]) -> list[ReadUnit]:
        """Each unit cut to its runs of consecutive rows that are not deleted and match the filter."""
        expression, columns = parse_where(self.where, self.schema) if self.where else (None, [])
        out: list[ReadUnit] = []
        seen: dict[str, int] = {}  # rows of each file before the unit (units cover a file's row groups in order)
        group_start: dict[tuple[str, int], int] = {}
        cache: tuple[tuple[str, int], np.ndarray] | None = None
        for u in units:
            key = (u.path, u.row_group)
            group_start.setdefault(key, seen.get(u.path, 0))
            seen[u.path] = seen.get(u.path, 0) + u.length
            keep = np.ones(u.length, dtype=bool)
            f = by_path[u.path]
            if f.keep is not None:
                first = group_start[key] + u.offset
                kept = f.keep[first:first + u.length]
                keep[:kept.size] &= kept
            if expression is not None:
                if cache is None or cache[0] != key:
                    cache = (key, self._matches(u, f, expression, columns))
                keep &= cache[1][u.offset:u.offset + u.length]
            rows = np.flatnonzero(keep)
            for run in np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1) if rows.size else []:
                out.append(replace(u, index=len(out), offset=u.offset + int(run[0]), length=int(run.size)))
        return out

    def _matches(self, unit: ReadUnit, f: DeltaFile, expression: pc.Expression, columns: list[str]) -> np.ndarray:
        """Which rows of the unit's row group match the filter, evaluated on the filter's columns only."""
        data = [c for c in columns if c not in self.partition_columns]
        with self.fs.open_input_file(unit.path) as fh:
            rows = pq.ParquetFile(fh).read_row_group(unit.row_group, columns=data)
        try:  # the filter's literals have the table's types; a writer's file may store a column differently
            rows = rows.cast(pa.schema([pa.field(c, self.schema.field(c).type) for c in data]))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise TableError(f"{self.uri}: --where {self.where!r}: {unit.path} holds its columns as "
                             f"{rows.schema.types}, not as the table's types ({exc})") from exc
        for c in columns:
            if c in self.partition_columns:
                rows = rows.append_column(c, pa.array([f.typed.get(c)] * rows.num_rows, self.schema.field(c).type))
        rows = rows.append_column("__row", pa.array(np.arange(rows.num_rows)))
        mask = np.zeros(rows.num_rows, dtype=bool)
        mask[rows.filter(expression).column("__row").to_numpy()] = True
        return mask


def open_input(uri: str, where: str | None = None, select: tuple[str, ...] = (),
               version: int | None = None) -> DeltaSource:
    """The table at ``version`` (default: its latest), its data files planned for ``where``."""
    uri = table_uri(uri)
    dt = load(uri, version)
    if dt is None:
        raise TableError(f"{uri}: not a Delta table (no {LOG_DIR}/ there)")
    version = dt.version()
    _check_readable(dt, uri, version)
    schema = pa.schema(dt.schema().to_arrow())
    partition_columns = tuple(dt.metadata().partition_columns)
    if where:
        parse_where(where, schema)  # a filter that does not parse or names no column fails here, in one line
    actions = pa.table(dt.get_add_actions(flatten=False))
    names = actions.column_names
    rows = actions.select([c for c in ("path", "size_bytes", "partition") if c in names]).to_pylist()
    outside = [r["path"] for r in rows if "://" in r["path"]]
    if outside:
        raise TableError(f"{uri}: data file {outside[0]} lies outside the table's folder (a shallow clone?); "
                         "not read")
    fs, root = filesystem_and_path(uri)
    relative = {unquote(r["path"]): r for r in rows}  # the name below the table's folder
    chosen = _pruned(dt, where, relative) if where else None
    keep = _deletion_vectors(dt, uri, relative) if "deletionVectors" in _reader_features(dt) else {}
    files = []
    for name in sorted(relative):
        if chosen is not None and name not in chosen:
            continue
        r = relative[name]
        typed = dict(r.get("partition") or {})
        files.append(DeltaFile(f"{root}/{name}", r["path"], int(r["size_bytes"]),
                               tuple((c, _partition_text(typed.get(c))) for c in partition_columns),
                               {c: typed.get(c) for c in partition_columns}, keep.get(name)))
    return DeltaSource(uri, version, where, tuple(select), fs, tuple(files), schema, partition_columns)


def _reader_features(dt: DeltaTable) -> set[str]:
    return set(dt.protocol().reader_features or ())


def _check_readable(dt: DeltaTable, uri: str, version: int) -> None:
    """Refuse, naming the feature, a table whose rows this reader would get wrong."""
    mode = _column_mapping(dt)
    if mode is not None or "columnMapping" in _reader_features(dt):
        raise TableError(f"{uri} at version {version}: column mapping (delta.columnMapping.mode={mode}) is not "
                         "supported: its data files name columns by physical names or ids that this reader does not "
                         "map back; rewrite the rows into a table without column mapping first")
    unknown = sorted(_reader_features(dt) - READABLE)
    if unknown:
        raise TableError(f"{uri} at version {version}: reader feature {unknown[0]!r} is not supported "
                         f"(supported: {', '.join(sorted(READABLE))}); its rows would be read wrong")


def _prefixes(dt: DeltaTable) -> list[str]:
    """Prefixes that deltalake's absolute file URIs for this table start with (URL or path form)."""
    base = dt.table_uri.rstrip("/") + "/"
    forms = [base, unquote(base)]
    if base.startswith("file://"):
        forms += [base[len("file://"):], unquote(base[len("file://"):])]
    return forms


def _relative(file_uri: str, prefixes: list[str], known: dict) -> str | None:
    """The table-relative name of a file URI deltalake gave, if it is one of ``known``'s."""
    for prefix in prefixes:
        if file_uri.startswith(prefix):
            rest = file_uri[len(prefix):]
            for name in (rest, unquote(rest)):
                if name in known:
                    return name
    return None


def _pruned(dt: DeltaTable, where: str, relative: dict) -> set[str] | None:
    """The files the log's statistics and partition values leave for ``where`` (deltalake's file pruning); None
    (every file) where deltalake does not take the predicate or its answer does not map onto the log's files.
    Pruning only saves reads: the filter is evaluated on every row of the files kept."""
    from deltalake.exceptions import DeltaError

    try:
        uris = dt.file_uris(file_pruning_predicate=where)
    except (DeltaError, ValueError, TypeError):
        return None
    prefixes = _prefixes(dt)
    names = {_relative(u, prefixes, relative) for u in uris}
    return None if None in names else names


def _deletion_vectors(dt: DeltaTable, uri: str, relative: dict) -> dict[str, np.ndarray]:
    """Each file's rows not deleted (True), from its deletion vector; refuses a vector it cannot place."""
    table = pa.table(dt.deletion_vectors().read_all())
    prefixes = _prefixes(dt)
    out = {}
    for i, file_uri in enumerate(table.column("filepath").to_pylist()):
        name = _relative(file_uri, prefixes, relative)
        if name is None:
            raise TableError(f"{uri}: a deletion vector names {file_uri}, which is not one of the table's data files "
                             "as this reader finds them; not read (deleted rows would come back)")
        out[name] = np.asarray(table.column("selection_vector")[i].values.to_numpy(zero_copy_only=False), dtype=bool)
    return out


def _partition_text(value: Any) -> str | None:
    """A partition value as Delta writes it in the log (the text partition columns carry in the job)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return value.isoformat(sep=" ")
    if isinstance(value, (datetime.date, int, str, Decimal)):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    raise TableError(f"partition value {value!r} ({type(value).__name__}) is not one this job writes")


# ----------------------------------------------------------------------------------- --where

_TOKEN = re.compile(r"""\s*(?:
    (?P<num>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)
  | (?P<str>'(?:[^']|'')*')
  | (?P<quoted>"(?:[^"]|"")*"|`[^`]*`)
  | (?P<op><=|>=|<>|!=|==|=|<|>|\(|\)|,)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
)""", re.VERBOSE)
_KEYWORDS = {"AND", "OR", "NOT", "IN", "IS", "NULL", "BETWEEN", "TRUE", "FALSE"}
_COMPARE = {"=": "__eq__", "==": "__eq__", "!=": "__ne__", "<>": "__ne__", "<": "__lt__", "<=": "__le__",
            ">": "__gt__", ">=": "__ge__"}


def parse_where(text: str, schema: pa.Schema) -> tuple[pc.Expression, list[str]]:
    """A SQL predicate (the subset delta-rs's file pruning takes) as a pyarrow expression over ``schema``'s
    columns, and the columns it names; literals take the type of the column they are compared with."""
    return _Where(text, schema).parse()


class _Where:
    def __init__(self, text: str, schema: pa.Schema):
        self.text, self.schema, self.columns = text, schema, set()
        self.tokens: list[tuple[str, str]] = []
        pos, text = 0, text.rstrip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                self.fail(f"cannot read {text[pos:].strip()[:20]!r}")
            kind = m.lastgroup
            value = m.group(kind)
            if kind == "word" and value.upper() in _KEYWORDS:
                kind, value = "kw", value.upper()
            self.tokens.append((kind, value))
            pos = m.end()
        self.i = 0

    def fail(self, why: str):
        raise TableError(f"--where {self.text!r}: {why} (a SQL predicate: comparisons, [NOT] IN, IS [NOT] NULL, "
                         "[NOT] BETWEEN, AND, OR, NOT, parentheses; strings in single quotes)")

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, kind: str, value: str | None = None) -> bool:
        token = self.peek()
        if token is not None and token[0] == kind and (value is None or token[1] == value):
            self.i += 1
            return True
        return False

    def expect(self, kind: str, value: str) -> None:
        if not self.take(kind, value):
            token = self.peek()
            self.fail(f"expected {value} " + (f"before {token[1]!r}" if token else "at the end"))

    def parse(self) -> tuple[pc.Expression, list[str]]:
        expression = self.disjunction()
        if self.peek() is not None:
            self.fail(f"unexpected {self.peek()[1]!r}")
        return expression, sorted(self.columns)

    def disjunction(self) -> pc.Expression:
        e = self.conjunction()
        while self.take("kw", "OR"):
            e = e | self.conjunction()
        return e

    def conjunction(self) -> pc.Expression:
        e = self.negation()
        while self.take("kw", "AND"):
            e = e & self.negation()
        return e

    def negation(self) -> pc.Expression:
        return ~self.negation() if self.take("kw", "NOT") else self.predicate()

    def predicate(self) -> pc.Expression:
        if self.take("op", "("):
            e = self.disjunction()
            self.expect("op", ")")
            return e
        left = self.operand()
        if self.take("kw", "IS"):
            negated = self.take("kw", "NOT")
            self.expect("kw", "NULL")
            e = self.expression(left).is_null()
            return ~e if negated else e
        negated = self.take("kw", "NOT")
        if self.take("kw", "IN"):
            self.expect("op", "(")
            values = [self.operand()]
            while self.take("op", ","):
                values.append(self.operand())
            self.expect("op", ")")
            if left[0] != "column" or any(v[0] == "column" for v in values):
                self.fail("IN takes a column and a list of values")
            e = pc.field(left[1]).isin(pa.array([self.value(v, left) for v in values], self.schema.field(left[1]).type))
            return ~e if negated else e
        if self.take("kw", "BETWEEN"):
            low = self.operand()
            self.expect("kw", "AND")
            high = self.operand()
            e = self.compare(left, ">=", low) & self.compare(left, "<=", high)
            return ~e if negated else e
        if negated:
            self.fail("NOT must be followed by IN or BETWEEN here")
        token = self.peek()
        if token is not None and token[0] == "op" and token[1] in _COMPARE:
            self.i += 1
            return self.compare(left, token[1], self.operand())
        if left[0] == "column" and pa.types.is_boolean(self.schema.field(left[1]).type):
            return pc.field(left[1])  # a boolean column on its own
        self.fail(f"expected a comparison after {left[1]!r}")

    def operand(self) -> tuple[str, Any]:
        token = self.peek()
        if token is None:
            self.fail("ends too early")
        self.i += 1
        kind, value = token
        if kind == "word" or kind == "quoted":
            name = value if kind == "word" else value[1:-1].replace('""', '"')
            if name not in self.schema.names:
                self.fail(f"no column {name!r} (columns: {self.schema.names})")
            self.columns.add(name)
            return ("column", name)
        if kind == "str":
            return ("value", value[1:-1].replace("''", "'"))
        if kind == "num":
            return ("value", float(value) if any(c in value for c in ".eE") else int(value))
        if kind == "kw" and value in ("TRUE", "FALSE", "NULL"):
            return ("value", {"TRUE": True, "FALSE": False, "NULL": None}[value])
        self.fail(f"unexpected {value!r}")

    def value(self, operand: tuple[str, Any], column: tuple[str, Any]) -> pa.Scalar:
        """A literal, as a scalar of the type of the column it is compared with."""
        if column[0] != "column":
            return pa.scalar(operand[1])
        kind = self.schema.field(column[1]).type
        try:
            if operand[1] is None:
                return pa.scalar(None, kind)
            if pa.types.is_timestamp(kind) and kind.tz is not None and isinstance(operand[1], str) \
                    and not re.search(r"(Z|[+-]\d\d:?\d\d)$", operand[1]):
                return pa.scalar(operand[1]).cast(pa.timestamp(kind.unit)).cast(kind)  # Delta's timestamps: UTC
            return pa.scalar(operand[1]).cast(kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            self.fail(f"{operand[1]!r} is not a {kind} (column {column[1]!r})")

    def expression(self, operand: tuple[str, Any], other: tuple[str, Any] | None = None) -> pc.Expression:
        if operand[0] == "column":
            return pc.field(operand[1])
        return pc.scalar(self.value(operand, other or ("value", None)))

    def compare(self, left: tuple[str, Any], op: str, right: tuple[str, Any]) -> pc.Expression:
        return getattr(self.expression(left, right), _COMPARE[op])(self.expression(right, left))


# ------------------------------------------------------------------------------------------ output


class DeltaSink(StagedTableSink):
    """The commit protocol of ``pipeline.commit`` with a Delta commit as its final step: a
    ``pipeline.formats.Sink``. Its stager holds no deltalake object."""

    def __init__(self, uri: str, rows_per_input_row: int = 1, run: str | None = None,
                 partition_fields: tuple[tuple[str, str, str], ...] = ()):
        self.uri = self.root = table_uri(uri)
        require_deltalake(f"{self.uri} (a Delta table)")  # without it: the line naming the extra, before any work
        self.fs, self.path = filesystem_and_path(self.uri)
        self.staged = TableStager(self.fs, f"{self.path}/{STAGING_DIR}", rows_per_input_row, run)
        self.run = self.staged.run
        self.partition_fields = partition_fields

    # -- driver, before the run ------------------------------------------------------------------
    def check_columns(self, names: Sequence[str]) -> None:
        """Refuse an existing table whose columns differ from the ones the job writes, naming the column, or one
        this writer cannot add files to as they are; refuse a folder that holds something else."""
        table = load(self.uri)
        if table is None:
            try:
                entries = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
            except (OSError, pa.ArrowException):  # not a folder (a file): the commit's stat says so
                entries = [self.fs.get_file_info(self.path)]
            others = [e.path for e in entries if e.path.rstrip("/").rsplit("/", 1)[-1] != STAGING_DIR]
            if others:
                raise TableError(f"output {self.uri} exists and is not a Delta table (no {LOG_DIR}/; it holds "
                                 f"{others[0]}); write the table to a new path")
            return
        _check_writable(table, self.uri)
        self._check_names(table, names)

    def _check_names(self, table: DeltaTable, names: Sequence[str]) -> None:
        have = [f["name"] for f in _fields(table.schema())]
        missing = [n for n in names if n not in have]
        extra = [n for n in have if n not in names]
        if missing or extra:
            what = (f"has no column {missing[0]!r}, which the job writes" if missing
                    else f"has a column {extra[0]!r}, which the job does not write")
            raise TableError(f"output table {self.uri} {what} (table: {list(have)}; job: {list(names)}); "
                             "write to a new table, or add the column (ALTER TABLE ... ADD COLUMNS) first")

    def _committed(self, identity: JobIdentity) -> Manifest | None:
        commit = committed(load(self.uri), identity)
        return None if commit is None else _manifest_of(self.uri, commit, identity.written(), [])

    def committed_output(self) -> CommittedOutput | None:
        """The latest version's data files; their settings only where that version's commit says the table's rows
        are all one job's (pipeline.refresh: a refresh reuses nothing else)."""
        table = load(self.uri)
        if table is None:
            return None
        rows = pa.table(table.get_add_actions(flatten=False)).select(["path", "num_records"]).to_pylist()
        info = next(iter(table.history(1)), {})
        settings, why = info.get(SETTINGS_KEY), ""
        if _column_mapping(table) is not None or any("://" in r["path"] for r in rows):
            settings, why = None, "the table's data files are not plain files of its folder (column mapping?)"
        elif "deletionVectors" in _reader_features(table) and table.deletion_vectors().read_all().num_rows:
            settings, why = None, "the table has deletion vectors"
        elif settings is None:
            why = "the table's current rows were not all written by one qa-batch run that recorded its settings"
        files = tuple(f"{self.path}/{unquote(r['path'])}" for r in rows)
        counted = sum(r["num_records"] or 0 for r in rows) if all(r["num_records"] is not None for r in rows) \
            else sum(pq.ParquetFile(self.fs.open_input_file(f)).metadata.num_rows for f in files)
        return CommittedOutput(self.fs, files, counted, {"table_version": table.version()}, settings,
                               info.get(INPUT_KEY), _manifest_of(self.uri, info, {}, []), why)

    # -- driver, after the run ------------------------------------------------------------------
    def commit(self, units: list[ReadUnit], identity: JobIdentity, report: dict,
               adopted: tuple[StagedPart, ...] = (), interrupted: list[dict] | None = None) -> Manifest:
        if interrupted is not None:
            return self._publish(interrupted, identity, report)
        files = self.staged.write_commit_list(units, adopted, dest=self.path)
        crash_point("commit-list")
        return self._publish(files, identity, report)

    def _publish(self, files: list[dict], identity: JobIdentity, report: dict) -> Manifest:
        table = load(self.uri)
        commit = committed(table, identity)
        if commit is None:
            facts = [self._facts(f) for f in files]
            staged = self._staged_schema(files)
            self._check_table(table, staged, facts, files)  # refused before any file moves
            self._move_in(files)
            commit = self._append(files, identity, staged, facts)
        crash_point("manifest")
        self.fs.delete_dir(self.staged.root)
        return _manifest_of(self.uri, commit, identity.written(), files, report)

    def _append(self, files: list[dict], identity: JobIdentity, staged: pa.Schema, facts: list[dict]) -> dict:
        """One commit adding ``files``, carrying the job's transaction; retried on a concurrent commit after
        re-reading the table and checking that no other attempt committed this job meanwhile."""
        dl = require_deltalake(f"{self.uri} (a Delta table)")
        from deltalake import CommitProperties, Transaction
        from deltalake.exceptions import CommitFailedError, DeltaError
        from deltalake.transaction import create_table_with_add_actions

        version = written_identity_version(IDENTITY_VERSION)
        key = identity.key(version)
        info = {JOB_KEY: key, IDENTITY_KEY: version, RUN_KEY: self.run, ROWS_KEY: sum(f["rows"] for f in files),
                ERRORS_KEY: sum(f.get("errors", 0) for f in files)}
        whole = {**info, SETTINGS_KEY: settings_of(identity.to_json()), INPUT_KEY: input_key(identity.to_json())}
        for attempt in range(COMMIT_ATTEMPTS):
            table = load(self.uri)
            found = committed(table, identity)
            if found is not None:
                return found
            _race_hook(self.uri)
            # delta-rs's own retries would rebase our commit without our transaction check: our loop retries.
            replaces = identity.replaces is not None and table is not None
            props = CommitProperties(custom_metadata=whole if table is None or replaces else info,
                                     max_commit_retries=0,
                                     app_transactions=[Transaction(APP_PREFIX + key, TXN_VERSION)])
            try:
                actions = self._actions(files, facts, self._check_table(table, staged, facts, files))
                if replaces:  # --mode refresh: the rows it read go, in the same commit
                    actions += _removals(table, self.uri, identity.replaces["table_version"])
                if table is None:
                    create_table_with_add_actions(self.uri, dl.Schema.from_arrow(staged), actions, mode="error",
                                                  partition_by=self._partition_by(staged) or None,
                                                  storage_options=storage_options(self.uri) or None,
                                                  commit_properties=props)
                else:
                    table.create_write_transaction(actions, mode="append", schema=table.schema(),
                                                   partition_by=list(table.metadata().partition_columns) or None,
                                                   commit_properties=props)
            except DeltaError as exc:
                lost = isinstance(exc, CommitFailedError) or (table is None and load(self.uri) is not None)
                if not lost:
                    raise TableError(f"cannot commit to {self.uri}: {one_line(exc)}") from exc
                print(f"commit to {self.uri}: another writer committed first ({one_line(exc)}); retrying", flush=True)
                time.sleep(min(0.1 * 2 ** attempt, 5.0))
                continue
            found = committed(load(self.uri), identity)
            if found is None:
                raise RuntimeError(f"{self.uri}: committed, but no transaction carries job {key}")
            return found
        raise RuntimeError(f"cannot commit {self.uri}: {COMMIT_ATTEMPTS} concurrent commits won over ours; "
                           "nothing was appended (run again with --mode resume)")

    def _now(self, f: dict) -> str:
        """Where a listed file is now: still staged, or moved into the table's folder."""
        staged = f"{self.staging}/{f['path'].rsplit('/', 1)[-1]}"
        return staged if self.fs.get_file_info(staged).type != pafs.FileType.NotFound else f["path"]

    def _staged_schema(self, files: list[dict]) -> pa.Schema:
        with self.fs.open_input_file(self._now(files[0])) as f:
            schema = pq.read_schema(f)
        return pa.schema([f.remove_metadata() for f in schema])

    def _facts(self, f: dict) -> dict:
        """What a staged file's footer says: rows, nulls per column (Delta statistics), and a cache of its
        partition values."""
        with self.fs.open_input_file(self._now(f)) as fh:
            meta = pq.ParquetFile(fh).metadata
        nulls: dict[str, int] = {}
        for i in range(meta.num_columns):
            name = meta.schema.column(i).path
            if "." in name:
                continue  # nested: no statistics
            counts = [meta.row_group(g).column(i).statistics for g in range(meta.num_row_groups)]
            if all(s is not None and s.has_null_count for s in counts):
                nulls[name] = sum(s.null_count for s in counts)
        return {"rows": meta.num_rows, "nulls": nulls, "partitions": {}}

    def _check_table(self, table: DeltaTable | None, staged: pa.Schema, facts: list[dict],
                     files: list[dict]) -> list[str]:
        """Refuse, naming the column, rows the table cannot take as they are; the partition columns."""
        if table is None:
            partition_by = self._partition_by(staged)
        else:
            _check_writable(table, self.uri)
            self._check_fits(table, staged, facts)
            partition_by = list(table.metadata().partition_columns)
        for f, fact in zip(files, facts):
            self._partition_values(f, fact, partition_by)
        return partition_by

    def _partition_by(self, staged: pa.Schema) -> list[str]:
        """A new table's partition columns: the input table's identity partition columns it has."""
        return [src for src, transform, _ in self.partition_fields
                if transform == "identity" and src in staged.names]

    def _actions(self, files: list[dict], facts: list[dict], partition_by: list[str]) -> list:
        """Add actions for the moved files: their size, modification time, partition values and statistics."""
        from deltalake.transaction import AddAction

        actions = []
        for f, fact in zip(files, facts):
            info = self.fs.get_file_info(f["path"])
            if info.type == pafs.FileType.NotFound:
                raise RuntimeError(f"cannot commit {self.uri}: {f['path']} vanished before the commit")
            mtime = info.mtime.timestamp() if info.mtime is not None else time.time()
            nulls = {c: n for c, n in fact["nulls"].items() if c not in partition_by}  # data columns only
            stats = {"numRecords": fact["rows"], "nullCount": nulls}
            actions.append(AddAction(f["path"].rsplit("/", 1)[-1], info.size,
                                     self._partition_values(f, fact, partition_by), int(mtime * 1000), True,
                                     json.dumps(stats)))
        return actions

    def _partition_values(self, f: dict, fact: dict, partition_by: list[str]) -> dict[str, str | None]:
        """A file's partition values (each partition column holds one value in it; refused otherwise)."""
        todo = [c for c in partition_by if c not in fact["partitions"]]
        if todo:
            with self.fs.open_input_file(self._now(f)) as fh:
                rows = pq.read_table(fh, columns=todo)
            for c in todo:
                distinct = pc.unique(rows.column(c)).to_pylist()
                if len(distinct) != 1:
                    raise TableError(f"output table {self.uri} is partitioned by {c!r}, and the rows of one read "
                                     f"unit hold {len(distinct)} values of it; write to a new table, or read an "
                                     "input partitioned by it")
                fact["partitions"][c] = _partition_text(distinct[0])
        return {c: fact["partitions"][c] for c in partition_by}

    def _check_fits(self, table: DeltaTable, staged: pa.Schema, facts: list[dict]) -> None:
        """Refuse, naming the column, rows whose types differ from the table's or nulls in a non-null column."""
        self._check_names(table, staged.names)  # again: a fan-out job's columns are known only now
        dl = require_deltalake(self.uri)
        ours = {f["name"]: f for f in _fields(dl.Schema.from_arrow(staged))}
        for column in _fields(table.schema()):
            name, mine = column["name"], ours[column["name"]]
            if mine["type"] != column["type"]:
                raise TableError(f"output table {self.uri}: column {name!r} is {json.dumps(column['type'])} in the "
                                 f"table but {json.dumps(mine['type'])} in the job's rows; write to a new table")
            if not column["nullable"] and any(fact["nulls"].get(name, 1) for fact in facts):
                raise TableError(f"output table {self.uri}: column {name!r} is NOT NULL in the table, and the job's "
                                 "rows hold nulls in it (rows with an error have no answer); write to a new table")


def _removals(table: DeltaTable, uri: str, version: int) -> list:
    """Remove actions for the data files of ``version`` (what a refresh read) that the table still has; files
    another writer added since stay."""
    from deltalake.transaction import RemoveAction

    read = load(uri, version)
    if read is None:
        raise TableError(f"{uri}: version {version}, which this refresh read, is gone; run --mode refresh again")
    live = {r["path"] for r in pa.table(table.get_add_actions(flatten=False)).select(["path"]).to_pylist()}
    now = int(time.time() * 1000)
    removals = []
    for r in pa.table(read.get_add_actions(flatten=False)).to_pylist():
        if r["path"] in live:
            values = {k: _partition_text(v) for k, v in (r.get("partition") or {}).items()}
            removals.append(RemoveAction(unquote(r["path"]), True, now, r["size_bytes"], values))
    return removals


def _check_writable(table: DeltaTable, uri: str) -> None:
    """Refuse a table to which added files, as they are, would be wrong: column mapping (names), CHECK
    constraints, generated or identity columns, invariants (values this writer does not check)."""
    mode = _column_mapping(table)
    if mode is not None:
        raise TableError(f"output table {uri} uses column mapping (delta.columnMapping.mode={mode}); this writer "
                         "writes columns by name only: write to a new table")
    constraints = sorted(k for k in table.metadata().configuration if k.startswith("delta.constraints."))
    if constraints:
        raise TableError(f"output table {uri} has a CHECK constraint ({constraints[0]}), which this writer does not "
                         "check; write to a new table")
    for column in _fields(table.schema()):
        meta = column.get("metadata") or {}
        feature = next((f for k, f in (("delta.generationExpression", "a generated column"),
                                       ("delta.identity.start", "an identity column"),
                                       ("delta.invariants", "an invariant")) if k in meta), None)
        if feature:
            raise TableError(f"output table {uri}: column {column['name']!r} is {feature}, which this writer does "
                             "not compute or check; write to a new table")


def committed(table: DeltaTable | None, identity: JobIdentity) -> dict | None:
    """The commit info of the commit that added this job to the table (its application transaction is in the
    table's state), else None. Where the log no longer holds that commit's entry (log retention), only what the
    transaction says: the job's hash."""
    if table is None:
        return None
    for key in identity.keys().values():
        if table.transaction_version(APP_PREFIX + key) is not None:
            return next((info for info in table.history() if info.get(JOB_KEY) == key), {JOB_KEY: key})
    return None


def _manifest_of(uri: str, info: dict, job: dict, files: list[dict], report: dict | None = None) -> Manifest:
    rows = info.get(ROWS_KEY, sum(f["rows"] for f in files))
    errors = info.get(ERRORS_KEY, sum(f.get("errors", 0) for f in files))
    return Manifest(**(report or {}), job=job, run=info.get(RUN_KEY, ""), output_files=files,
                    rows_out=int(rows), errors=int(errors),
                    commit={"format": "delta", "table": uri, "table_version": info.get("version"),
                            "job_sha256": info.get(JOB_KEY)})


def _race_hook(uri: str) -> None:
    """Tests: another writer appends the rows of the Parquet file named by QA_FAULT_DELTA_RACE to the table right
    before our first commit attempt, so that attempt loses the race."""
    global _raced
    path = os.environ.get(RACE_HOOK)
    if not path or _raced:
        return
    _raced = True
    require_deltalake(uri).write_deltalake(uri, pq.read_table(path), mode="append",
                                   storage_options=storage_options(uri) or None)
