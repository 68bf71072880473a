"""What the table sinks (Iceberg, Delta) share: folder staging (``pipeline.commit``) under the table's location,
and a final step that moves the staged files into the table and commits them in the format's own way.

A subclass sets ``uri`` (= ``root``, what messages name), ``fs`` and ``staged`` (a ``TableStager``), and says how
to find this job's commit in the table (``_committed``); it commits in its own ``commit``.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs

from ..commit import COMMIT_LIST, MODES, OutputBusyError, OutputCommitter, OutputExistsError, OutputState, StagedPart
from ..faults import crash_point
from ..lake import read_json
from ..records import JobIdentity, Manifest


class TableStager(OutputCommitter):
    """Folder staging of rows bound for a table."""

    def write_block(self, table: pa.Table) -> list[dict]:
        # Field metadata carried over from the input's files (Parquet field ids) would contradict the output
        # table's own; without it, columns map by name.
        plain = pa.schema([f.remove_metadata() for f in table.schema], metadata=table.schema.metadata)
        return super().write_block(table.cast(plain))


class StagedTableSink:
    """The lifecycle of a ``pipeline.formats.Sink`` up to its table's commit."""

    uri: str
    root: str
    fs: pafs.FileSystem
    staged: TableStager

    def _committed(self, identity: JobIdentity) -> Manifest | None:
        """This job's commit in the table's history, as a manifest; None if the table has none."""
        raise NotImplementedError

    @property
    def staging(self) -> str:
        return self.staged.staging

    def inspect(self, mode: str, identity: JobIdentity) -> OutputState:
        if mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
        committed = self._committed(identity)
        if committed is not None:
            listed = self._commit_list(identity)
            if listed is not None:  # committed, then died before cleaning up: the commit only cleans up
                return OutputState(commit_list=listed)
            return OutputState(committed=committed)
        try:
            return self.staged.inspect(mode, identity)
        except OutputBusyError:
            raise
        except OutputExistsError as exc:
            if mode != "error":
                raise
            raise OutputExistsError(f"output table {self.root}: an interrupted run left staged answers in "
                                    f"{self.staged.root}; --mode resume finishes it, --mode overwrite drops them "
                                    "and starts again (no table row is deleted either way)") from exc

    def staged_job(self) -> dict | None:
        return self.staged.staged_job()

    def recorded_job(self) -> dict | None:
        """The staged job's identity; a committed one is known only by its hash (in the table's commit), so a
        ``--precision auto`` re-run finds it after choosing the same variant again."""
        return self.staged.staged_job()

    def begin(self, mode: str, identity: JobIdentity, stale: tuple[StagedPart, ...] = ()) -> TableStager:
        return self.staged.begin(mode, identity, stale)

    def renew_lease(self, started_at: float | None = None) -> None:
        self.staged.renew_lease(started_at)

    def release_lease(self) -> None:
        self.staged.release_lease()

    def _commit_list(self, identity: JobIdentity) -> list[dict] | None:
        """The files this job's interrupted commit listed, if its staging is still there."""
        path = f"{self.staging}/{COMMIT_LIST}"
        staged = self.staged_job()
        if staged is None or not identity.compare(staged).same or \
                self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        return read_json(self.fs, path)["files"]

    def _move_in(self, files: list[dict]) -> None:
        """Staged files to where the table keeps them (roll forward: a file already moved stays)."""
        for k, f in enumerate(files, 1):
            staged = f"{self.staging}/{f['path'].rsplit('/', 1)[-1]}"
            if self.fs.get_file_info(staged).type != pafs.FileType.NotFound:
                self.fs.move(staged, f["path"])
            elif self.fs.get_file_info(f["path"]).type == pafs.FileType.NotFound:
                raise RuntimeError(f"cannot commit {self.root}: {staged} vanished before the commit")
            crash_point("publish", k)  # moved files are in no commit: readers do not see them
