"""Input split into read units: row ranges of Parquet row groups, planned from file footers.

Why not `ray.data.read_parquet`: its file-listing task needs a whole CPU, which answering actors
sized to every core never leave free (the job hangs), and a unit we name ourselves is what
exactly-once output and resume key on. A unit is small enough for one actor call and is read
inside the actor, so Parquet decoding runs where the rows are answered.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, replace

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .lake import STORE_THREADS, hive_partitions


class InputFileError(ValueError):
    """An input file cannot be read; the message names it."""


@dataclass(frozen=True)
class ReadUnit:
    index: int  # position in the job's plan, also the output file's name
    path: str
    row_group: int
    offset: int  # first row inside the row group
    length: int
    partitions: tuple[tuple[str, str], ...] = ()  # Hive key=value folders above the file
    columns: tuple[str, ...] = ()  # the columns to read (a projection); () = all
    group_row: int = 0  # rows of the file before its row group: the unit's first row is group_row + offset
    # An input without an id column: the column the reader adds, each row's "<id_file>:<row index in the file>"
    id_column: str = ""
    id_file: str = ""  # the file's path below the input's root (derived_id_label)

    def as_row(self) -> dict:
        return {**asdict(self), "partitions": [list(kv) for kv in self.partitions], "columns": list(self.columns)}

    @classmethod
    def from_row(cls, row: dict) -> ReadUnit:
        return cls(**{**row, "partitions": tuple(tuple(kv) for kv in row.get("partitions") or ()),
                      "columns": tuple(row.get("columns") or ())})


FOOTER_THREADS = STORE_THREADS  # footers read at once (see STORE_THREADS)
_PARQUET = ds.ParquetFileFormat()


@dataclass(frozen=True)
class Footer:
    """What planning keeps of a file's footer: its schema and rows per row group, never the whole ``FileMetaData``
    (column chunks, statistics), so that a plan's memory grows with its units, not with row groups x columns.
    ``error``: why the file is unreadable (then no schema, no row groups)."""

    path: str
    schema: pa.Schema | None
    row_group_rows: tuple[int, ...] = ()
    error: OSError | pa.ArrowException | None = None


def read_footer(fs: pafs.FileSystem, path: str) -> Footer:
    """One file's footer; an unreadable file's error is kept, not raised, so that a pool thread hands it back
    in file order. A ``ListedFile`` gives the reader its size: the footer is then one ranged read, without
    asking the store for the size first (S3: no HEAD)."""
    try:
        fragment = _PARQUET.make_fragment(str(path), fs, file_size=getattr(path, "size", None))
        meta = fragment.metadata  # reads and parses the footer, releasing the GIL while it does
    except (OSError, pa.ArrowException) as exc:
        return Footer(str(path), None, error=exc)
    return Footer(str(path), meta.schema.to_arrow_schema(),
                  tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)))


def read_footers(fs: pafs.FileSystem, files: Sequence[str], threads: int = FOOTER_THREADS) -> Iterator[Footer]:
    """``read_footer(fs, path)`` for each file, in the order of ``files``. ``threads`` footers are read at once
    (1: one after another, in this thread); at most ``2 * threads`` are read ahead of the consumer, so a
    consumer that stops early (a bad file) leaves little work behind, and results never pile up."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if threads == 1:
        for path in files:
            yield read_footer(fs, path)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="footer") as pool:
        todo = iter(files)
        ahead: deque[Future] = deque(pool.submit(read_footer, fs, p) for p in itertools.islice(todo, 2 * threads))
        try:
            while ahead:
                future = ahead.popleft()
                more = next(todo, None)
                if more is not None:  # keep the pool busy while the consumer works on this one
                    ahead.append(pool.submit(read_footer, fs, more))
                yield future.result()
        finally:  # the consumer stopped early: drop what has not started
            for future in ahead:
                future.cancel()


def plan_units(fs: pafs.FileSystem, files: Sequence[str], rows_per_unit: int, skip_bad_files: bool = False,
               base: str | None = None, threads: int = FOOTER_THREADS) -> tuple[list[ReadUnit], pa.Schema, list[str]]:
    """Units in file order, each at most ``rows_per_unit`` rows; the files' common schema (with
    the Hive partition keys found below ``base`` as string columns); the files skipped as
    unreadable (only with ``skip_bad_files``, else the first one in file order raises).

    Footers are read ``threads`` at once (``read_footers``); the result does not depend on ``threads``.
    Paths in the units and the skipped list are plain ``str`` (units are pickled to actors and made Arrow rows).
    """
    units: list[ReadUnit] = []
    schema = None
    bad: list[str] = []
    with closing(read_footers(fs, files, threads)) as footers:
        for footer in footers:
            path = footer.path
            if footer.error is not None:
                if skip_bad_files:
                    bad.append(path)
                    continue
                raise InputFileError(f"input file {path}: not readable as Parquet ({footer.error}); "
                                     "fix or remove it, or pass --skip-bad-files") from footer.error
            file_schema = footer.schema
            partitions = tuple(hive_partitions(base, path).items()) if base else ()
            for key, _ in partitions:
                if key not in file_schema.names:
                    file_schema = file_schema.append(pa.field(key, pa.string()))
            if schema is None:
                schema = file_schema
            elif not file_schema.equals(schema, check_metadata=False):
                raise InputFileError(f"input file {path}: schema differs from {files[0]}:\n{file_schema}\nvs\n{schema}")
            before = 0
            for rg, n in enumerate(footer.row_group_rows):
                for offset in range(0, n, rows_per_unit):
                    units.append(ReadUnit(len(units), path, rg, offset, min(rows_per_unit, n - offset), partitions,
                                          group_row=before))
                before += n
    if schema is None:
        raise InputFileError(f"no readable input files (unreadable: {bad})")
    return units, schema, bad


class UnitReader:
    """Reads units, keeping the last row group decoded: consecutive units of one big row group
    then cost one decode, not one each."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs
        self._cached: tuple[tuple[str, int, tuple[str, ...]], pa.Table] | None = None

    def read(self, unit: ReadUnit) -> pa.Table:
        key = (unit.path, unit.row_group, unit.columns)
        if self._cached is None or self._cached[0] != key:
            try:
                with self.fs.open_input_file(unit.path) as f:
                    table = pq.ParquetFile(f).read_row_group(unit.row_group, columns=list(unit.columns) or None)
            except (OSError, pa.ArrowException) as exc:
                raise InputFileError(f"input file {unit.path}, row group {unit.row_group}: {exc}") from exc
            self._cached = (key, table)
        table = self._cached[1].slice(unit.offset, unit.length)
        for key, value in unit.partitions:
            if key not in table.column_names:
                table = table.append_column(key, pa.array([value] * table.num_rows, pa.string()))
        if unit.id_column and unit.id_column not in table.column_names:
            table = table.add_column(0, pa.field(unit.id_column, pa.string()), derived_ids(unit))
        return table


def derived_ids(unit: ReadUnit) -> pa.Array:
    """The ids of an input without an id column: ``<file>:<row>``, the file's path below the input's root and the
    row's 0-based index in that file (as DuckDB's ``file_row_number`` and Spark's ``_metadata.row_index`` count
    it): unique, the same on every run over the same files, and joinable back to the input row."""
    first = unit.group_row + unit.offset
    return pa.array([f"{unit.id_file}:{first + i}" for i in range(unit.length)], pa.string())


def derived_id_label(path: str, base: str | None) -> str:
    """A file's part of its rows' derived ids: its path below ``base`` (the input folder), else the path itself."""
    base = (base or "").rstrip("/")
    return path[len(base) + 1:] if base and path.startswith(base + "/") else path


def with_derived_ids(units: Sequence[ReadUnit], column: str, base: str | None) -> list[ReadUnit]:
    """``units`` whose reader adds ``column`` with each row's derived id (``derived_ids``)."""
    return [replace(u, id_column=column, id_file=derived_id_label(u.path, base)) for u in units]
