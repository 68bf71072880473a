"""Where a job reads its rows and commits its answers: declared sources and sinks, and the one table of formats.

A ``Source`` plans read units over its data (Parquet row-group slices) and says what its rows are (its identity,
part of the job's); ``pinned`` gives the source as a recorded identity read it, so that a resume reads exactly
the first attempt's rows. A ``Sink`` follows the lifecycle of Ray Data's ``Datasink``, with the exactly-once
protocol of ``pipeline.commit`` in it: check the schema, ``inspect`` what the output holds for this job, ``begin``
(take the lease, hand the actors a picklable ``Stager``), renew the lease while answering, ``commit`` (returns
the typed ``Manifest``), or ``release_lease`` when the run fails.

``FORMATS`` is the table: the first format that claims a URI (or the one named by ``--input-format`` /
``--output-format``) reads or writes it. A new format is one module and one ``register`` call; the driver
(jobs/) only ever calls ``open_source`` and ``open_sink``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.fs as pafs

from ..commit import OutputState, StagedPart
from ..records import JobIdentity, Manifest
from ..refresh import CommittedOutput
from ..units import ReadUnit


@dataclass(frozen=True)
class ReadOptions:
    """How a source is read (from the job's config): a row filter and a projection for tables, and whether
    unreadable files are skipped."""

    where: str | None = None
    select: tuple[str, ...] = ()
    skip_bad_files: bool = False


@dataclass(frozen=True)
class SourcePlan:
    """What a source found at plan time: the files its units read, the units, the schema the actors read."""

    fs: pafs.FileSystem
    files: tuple[str, ...]
    skipped_files: tuple[str, ...]  # unreadable, with --skip-bad-files
    units: tuple[ReadUnit, ...]
    schema: pa.Schema
    identity: dict  # what the rows depend on: {"format": name, ...}


@runtime_checkable
class Source(Protocol):
    uri: str
    partition_fields: tuple[tuple[str, str, str], ...]  # (source column, transform, name): a sink may follow them

    def plan(self, rows_per_unit: int, needed: Sequence[str]) -> SourcePlan:
        """Read units over the data, the columns ``needed`` checked present by the caller."""
        ...

    def pinned(self, recorded: dict | None) -> Source:
        """This source as the job identity ``recorded`` (an interrupted run's) read it; itself if that says
        nothing of it."""
        ...


@runtime_checkable
class Stager(Protocol):
    """What the answering actors stage through; pickled to them, so it holds no connection."""

    def write_block(self, table: pa.Table) -> list[dict]:
        """Stage answered rows (with the hidden unit and row columns); one record per staged file."""
        ...

    def discard(self, unit: int, first_row: int) -> None:
        """Remove a file this run staged."""
        ...

    # --mode refresh writes its scratch files below ``staging`` on ``fs``, reads back ``staged_parts``, and sets
    # ``rows_per_input_row`` to 1 (its units count output rows); pipeline.commit.OutputCommitter has all four,
    # and the sink's commit checks units with its stager's ``rows_per_input_row``.
    fs: pafs.FileSystem
    staging: str
    rows_per_input_row: int

    def staged_parts(self) -> list[StagedPart]: ...


@runtime_checkable
class Sink(Protocol):
    uri: str

    def check_columns(self, names: Sequence[str]) -> None:
        """Refuse an existing output whose columns differ from those the job writes, naming the column."""
        ...

    def inspect(self, mode: str, identity: JobIdentity) -> OutputState:
        """What the output already holds for this job under ``mode``; raises where the mode refuses it."""
        ...

    def recorded_job(self) -> dict | None:
        """The identity of the job staged (else committed) here, as written, if the output keeps it."""
        ...

    def staged_job(self) -> dict | None:
        """The identity of the job staged here, as written, if any."""
        ...

    def committed_output(self) -> CommittedOutput | None:
        """What ``--mode refresh`` reuses: the committed rows' files and the settings they were answered with;
        None when nothing is committed. A commit of a job whose identity has ``replaces`` replaces those rows."""
        ...

    def begin(self, mode: str, identity: JobIdentity, stale: tuple[StagedPart, ...] = ()) -> Stager:
        """Take the output for this run (the lease) and return the stager the actors write through."""
        ...

    def renew_lease(self) -> None: ...

    def release_lease(self) -> None: ...

    def commit(self, units: list[ReadUnit], identity: JobIdentity, report: dict,
               adopted: tuple[StagedPart, ...] = (), interrupted: list[dict] | None = None) -> Manifest:
        """Publish every unit's staged rows exactly once; ``report``: the run's facts for the manifest
        (``Manifest`` field names); ``interrupted``: the file list of a commit that died while publishing."""
        ...


@dataclass(frozen=True)
class Format:
    """One row of the table: how to tell a URI is this format's, and how to open it as a source or a sink."""

    name: str
    claims: Callable[[str], bool]  # whether a URI (without --input-format/--output-format) is this format's
    source: Callable[[str, ReadOptions], Source] | None = None
    sink: Callable[[str, int, Source | None], Sink] | None = None  # (uri, output rows per input row, the source)
    extra: str | None = None  # the pyproject extra it needs, for messages


FORMATS: list[Format] = []


def register(fmt: Format) -> Format:
    """Add a format ahead of those registered before it (the last, Parquet, claims every other URI)."""
    FORMATS[:] = [fmt, *(f for f in FORMATS if f.name != fmt.name)]
    return fmt


def format_names() -> tuple[str, ...]:
    return tuple(f.name for f in FORMATS)


def find(uri: str, name: str | None, role: str) -> Format:
    """The format of ``uri``: the one named, else the first that claims it."""
    if name is not None:
        fmt = next((f for f in FORMATS if f.name == name), None)
        if fmt is None:
            raise ValueError(f"--{role}-format {name!r}: not a format (formats: {', '.join(format_names())})")
        return fmt
    return next(f for f in FORMATS if f.claims(uri))


def open_source(uri: str, options: ReadOptions, name: str | None = None) -> Source:
    fmt = find(uri, name, "input")
    if fmt.source is None:
        raise ValueError(f"input {uri}: format {fmt.name} cannot be read as a job's input")
    return fmt.source(uri, options)


def open_sink(uri: str, rows_per_input_row: int, source: Source | None = None, name: str | None = None) -> Sink:
    fmt = find(uri, name, "output")
    if fmt.sink is None:
        raise ValueError(f"output {uri}: format {fmt.name} cannot be written as a job's output")
    return fmt.sink(uri, rows_per_input_row, source)


def _builtin() -> None:
    """The formats this package ships; a table format's module is imported only when a URI names it."""

    def iceberg_source(uri: str, options: ReadOptions) -> Source:
        from .iceberg import IcebergSource

        return IcebergSource.open(uri, options)

    def iceberg_sink(uri: str, rows_per_input_row: int, source: Source | None) -> Sink:
        from .iceberg import IcebergSink

        return IcebergSink(uri, rows_per_input_row, partition_fields=getattr(source, "partition_fields", ()))

    def delta_claims(uri: str) -> bool:  # a folder holding _delta_log/ (pyarrow only: deltalake is not imported)
        from .delta import claims

        return claims(uri)

    def delta_source(uri: str, options: ReadOptions) -> Source:
        from .delta import DeltaSource

        return DeltaSource.open(uri, options)

    def delta_sink(uri: str, rows_per_input_row: int, source: Source | None) -> Sink:
        from .delta import DeltaSink

        return DeltaSink(uri, rows_per_input_row, partition_fields=getattr(source, "partition_fields", ()))

    from .parquet import FolderSink, ParquetSource

    register(Format("parquet", lambda uri: True, ParquetSource.open, FolderSink.open))
    register(Format("iceberg", lambda uri: uri.startswith("iceberg://"), iceberg_source, iceberg_sink, "iceberg"))
    register(Format("delta", delta_claims, delta_source, delta_sink, "delta"))


_builtin()
