"""The one adapter between Ray Data and the pure pipeline: an actor class for map_batches."""

from __future__ import annotations

import os
import time
from dataclasses import fields

import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from pipeline import fanout
from pipeline.answer import Answerer, load_model
from pipeline.commit import ROW_COLUMN, UNIT_COLUMN, OutputCommitter
from pipeline.config import Columns, DecodeSettings
from pipeline.units import ReadUnit, UnitReader


@ray.remote(num_cpus=0)
class StageStats:
    """Latest cumulative StageTimes of each answering actor, for the manifest and progress."""

    def __init__(self) -> None:
        self.by_actor: dict[str, dict] = {}
        self.ready_at: dict[str, float] = {}

    def report(self, actor: str, times: dict) -> None:
        self.by_actor[actor] = times

    def ready(self, actor: str, at: float) -> None:
        """An actor finished loading its model at wall-clock ``at``."""
        self.ready_at[actor] = at

    def totals(self) -> dict:
        total: dict = {}
        for times in self.by_actor.values():
            for key, value in times.items():
                if isinstance(value, dict):
                    bucket = total.setdefault(key, {})
                    for k, v in value.items():
                        bucket[k] = bucket.get(k, 0) + v
                else:
                    total[key] = total.get(key, 0) + value
        total["actors"] = len(self.by_actor)
        if self.ready_at:
            total["first_actor_ready_at"] = min(self.ready_at.values())
        return total


class AnswerActor:
    """Loads one ONNX Runtime session in __init__; in __call__ reads read units and answers them."""

    def __init__(self, fs: pafs.FileSystem, model_dir: str, threads: int, columns: Columns,
                 decode: DecodeSettings, batch_tokens: int, model_overrides: dict | None = None,
                 backend: str = "auto", precision: str = "fp32", stats: ray.actor.ActorHandle | None = None,
                 questions: pa.Table | None = None, wide: bool = False):
        t0 = time.perf_counter()
        spec, session = load_model(model_dir, threads, model_overrides, backend, precision)
        self.answerer = Answerer(spec, session, columns, decode, batch_tokens)
        self.answerer.times.model_load = time.perf_counter() - t0
        self.reader = UnitReader(fs)
        self.stats = stats
        self.name = f"{os.getpid()}@{ray.util.get_node_ip_address()}"
        if stats is not None:
            ray.get(stats.ready.remote(self.name, time.time()))
        self.calls = 0
        self.input_rows = 0
        self.questions, self.wide = questions, wide

    def __call__(self, units: pa.Table) -> pa.Table:
        self.calls += 1
        _maybe_crash(self.calls)
        parts = []
        for u in units.to_pylist():
            documents = self.reader.read(ReadUnit.from_row(u))
            if self.questions is None:
                answered = self.answerer(documents)
            else:
                answered = self.answerer(fanout.expand(documents, self.questions))
                if self.wide:
                    answered = fanout.to_wide(answered, documents, self.questions)
            self.input_rows += documents.num_rows
            n = answered.num_rows
            answered = answered.append_column(UNIT_COLUMN, pa.array([u["index"]] * n, pa.int64()))
            parts.append(answered.append_column(ROW_COLUMN, pa.array(range(n), pa.int64())))
        out = pa.concat_tables(parts)
        if self.stats is not None:
            t = self.answerer.times
            times = {**{f.name: getattr(t, f.name) for f in fields(t)}, "errors": dict(t.errors),
                     "input_rows": self.input_rows}
            ray.get(self.stats.report.remote(self.name, times))
        return out


def _maybe_crash(call: int) -> None:
    """Fault injection for tests: QA_FAULT_CRASH_ON_CALL=k kills the actor process on its k-th call,
    once per QA_FAULT_MARKER file (so the restarted actor goes on); QA_FAULT_SLOW_CALL_S=t makes
    every call take t seconds longer (so a test can kill the driver mid-run)."""
    if os.environ.get("QA_FAULT_SLOW_CALL_S"):
        time.sleep(float(os.environ["QA_FAULT_SLOW_CALL_S"]))
    k, marker = os.environ.get("QA_FAULT_CRASH_ON_CALL"), os.environ.get("QA_FAULT_MARKER")
    if k and marker and call == int(k) and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(17)


class StagedParquetDatasink(Datasink[list]):
    """Ray Data's write hooks around pipeline.commit: write tasks stage files per read unit;
    the driver commits after the last one (see OutputCommitter)."""

    def __init__(self, committer: OutputCommitter):
        self.committer = committer
        self.written: list[dict] = []

    def write(self, blocks, ctx) -> list[dict]:
        written = []
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if table.num_rows:
                written.extend(self.committer.write_block(table))
        return written

    def on_write_complete(self, write_result) -> None:
        self.written = [w for ws in write_result.write_returns for w in ws]

    def get_name(self) -> str:
        return "StagedParquet"
