"""Parquet files in, a folder of Parquet files out: local paths, directories, globs and ``s3://`` URIs.

Input: the files a path, directory or glob names (``pipeline.lake.expand_input``), their row groups sliced into
read units; a file is known by its path, size and modification time, so a file rewritten with the same size is a
different input. Output: a folder committed by ``pipeline.commit`` (staged parts, then ``_manifest.json``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..commit import MANIFEST, OutputCommitter, published_path
from ..lake import expand_input, filesystem_and_path, input_base, read_json, stat_files
from ..records import IDENTITY_VERSION, Manifest, identity_version, json_key
from ..refresh import CommittedOutput, input_key, settings_of
from ..units import plan_units
from . import ReadOptions, Source, SourcePlan


@dataclass(frozen=True)
class ParquetSource:
    uri: str
    skip_bad_files: bool = False
    partition_fields: tuple = ()

    @classmethod
    def open(cls, uri: str, options: ReadOptions) -> ParquetSource:
        if options.where or options.select:
            raise ValueError(f"--where and --select read lake tables (iceberg://); input {uri} is Parquet files")
        return cls(uri, options.skip_bad_files)

    def plan(self, rows_per_unit: int, needed: Sequence[str]) -> SourcePlan:
        fs, files = expand_input(self.uri)
        units, schema, bad = plan_units(fs, files, rows_per_unit, skip_bad_files=self.skip_bad_files,
                                        base=input_base(self.uri))
        read = [f for f in files if f not in bad]
        # S3: the HEADs many at a time, not one after another
        identity = {"format": "parquet", "files": [{"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns}
                                                   for f in stat_files(fs, read)]}
        return SourcePlan(fs, tuple(files), tuple(bad), tuple(units), schema, identity)

    def pinned(self, recorded: dict | None) -> Source:
        return self  # files are compared by path, size and mtime: a changed file makes another job


class FolderSink(OutputCommitter):
    """A folder output: the commit protocol of ``pipeline.commit`` as it is; the sink is its own stager."""

    def __init__(self, uri: str, rows_per_input_row: int = 1, run: str | None = None):
        fs, path = filesystem_and_path(uri)
        super().__init__(fs, path, rows_per_input_row, run)
        self.uri = uri

    @classmethod
    def open(cls, uri: str, rows_per_input_row: int, source: Source | None = None) -> FolderSink:
        return cls(uri, rows_per_input_row)

    def check_columns(self, names: Sequence[str]) -> None:
        """A folder's commit replaces what it held: any columns fit."""

    def committed_output(self) -> CommittedOutput | None:
        """The committed run's files (found next to the manifest, wherever the folder was moved) and settings."""
        path = f"{self.root}/{MANIFEST}"
        if not self._exists(path):
            return None
        manifest = Manifest.from_json(read_json(self.fs, path))
        job = manifest.job
        version = identity_version(job)
        known = version == IDENTITY_VERSION
        return CommittedOutput(
            self.fs, tuple(published_path(self.root, f["path"]) for f in manifest.output_files),
            manifest.rows_out, {"run": manifest.run, "job_sha256": json_key(job)},
            settings_of(job) if known else None, input_key(job) if known else None, manifest,
            "" if known else f"the committed run was made by a release with job identity version {version}")
