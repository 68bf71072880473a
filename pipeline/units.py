"""Input split into read units: row ranges of Parquet row groups, planned from file footers.

Why not `ray.data.read_parquet`: its file-listing task needs a whole CPU, which answering actors
sized to every core never leave free (the job hangs), and a unit we name ourselves is what
exactly-once output and resume key on. A unit is small enough for one actor call and is read
inside the actor, so Parquet decoding runs where the rows are answered.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .lake import hive_partitions


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

    def as_row(self) -> dict:
        return {**asdict(self), "partitions": [list(kv) for kv in self.partitions], "columns": list(self.columns)}

    @classmethod
    def from_row(cls, row: dict) -> ReadUnit:
        return cls(**{**row, "partitions": tuple(tuple(kv) for kv in row.get("partitions") or ()),
                      "columns": tuple(row.get("columns") or ())})


def plan_units(fs: pafs.FileSystem, files: list[str], rows_per_unit: int, skip_bad_files: bool = False,
               base: str | None = None) -> tuple[list[ReadUnit], pa.Schema, list[str]]:
    """Units in file order, each at most ``rows_per_unit`` rows; the files' common schema (with
    the Hive partition keys found below ``base`` as string columns); the files skipped as
    unreadable (only with ``skip_bad_files``, else the first one raises)."""
    units: list[ReadUnit] = []
    schema = None
    bad: list[str] = []
    for path in files:
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                file_schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as exc:
            if skip_bad_files:
                bad.append(path)
                continue
            raise InputFileError(f"input file {path}: not readable as Parquet ({exc}); "
                                 "fix or remove it, or pass --skip-bad-files") from exc
        partitions = tuple(hive_partitions(base, path).items()) if base else ()
        for key, _ in partitions:
            if key not in file_schema.names:
                file_schema = file_schema.append(pa.field(key, pa.string()))
        if schema is None:
            schema = file_schema
        elif not file_schema.equals(schema, check_metadata=False):
            raise InputFileError(f"input file {path}: schema differs from {files[0]}:\n{file_schema}\nvs\n{schema}")
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            for offset in range(0, n, rows_per_unit):
                units.append(ReadUnit(len(units), path, rg, offset, min(rows_per_unit, n - offset), partitions))
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
        return table
