"""The one adapter between Ray Data and the pure pipeline: an actor class for map_batches."""

from __future__ import annotations

import os
from dataclasses import fields

import pyarrow as pa
import pyarrow.fs as pafs
import ray

from pipeline.answer import Answerer, load_model
from pipeline.config import Columns, DecodeSettings
from pipeline.units import ReadUnit, UnitReader


@ray.remote(num_cpus=0)
class StageStats:
    """Latest cumulative StageTimes of each answering actor, for the manifest and progress."""

    def __init__(self) -> None:
        self.by_actor: dict[str, dict] = {}

    def report(self, actor: str, times: dict) -> None:
        self.by_actor[actor] = times

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
        return total


class AnswerActor:
    """Loads one ONNX Runtime session in __init__; in __call__ reads read units and answers them."""

    def __init__(self, fs: pafs.FileSystem, model_dir: str, threads: int, columns: Columns,
                 decode: DecodeSettings, batch_tokens: int, model_overrides: dict | None = None,
                 stats: ray.actor.ActorHandle | None = None):
        spec, session = load_model(model_dir, threads, model_overrides)
        self.answerer = Answerer(spec, session, columns, decode, batch_tokens)
        self.reader = UnitReader(fs)
        self.stats = stats
        self.name = f"{os.getpid()}@{ray.util.get_node_ip_address()}"

    def __call__(self, units: pa.Table) -> pa.Table:
        out = pa.concat_tables([self.answerer(self.reader.read(ReadUnit(**u))) for u in units.to_pylist()])
        if self.stats is not None:
            t = self.answerer.times
            times = {**{f.name: getattr(t, f.name) for f in fields(t)}, "errors": dict(t.errors)}
            ray.get(self.stats.report.remote(self.name, times))
        return out
