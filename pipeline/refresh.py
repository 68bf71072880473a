"""Nightly refresh: which committed answers still hold for tonight's input, and the rows that need the model.

A committed output row's answer holds for an input row when both have the same question text and context text
(and question id, with fan-out questions) and the committed run answered with the same answer-affecting
settings (``settings_of``: the model's file hashes, the served variant, the columns, window and decoding
settings). A row's answer depends on nothing else (not its batch-mates: the variants auto serves are batch
invariant), so a refreshed output equals a full run's on the same input. Rows whose committed answer is
"crashed the model process" are answered again: that error says what happened to a run, not what the row is.

The match is a hash join on a content key (``content_keys``: 16 bytes of BLAKE2b over the key texts), done in
buckets so that no process holds more than one bucket: map steps split the input's rows and the committed
rows by the key's bucket into files, and one reduce step per bucket joins them (``join``): input rows with a
committed answer are written with it as a staged part of the new output, the others to a file the answering
actors read as input. jobs/reuse.py runs the steps as Ray tasks; everything here is pure (Arrow and numpy).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from .config import OUTPUT_COLUMNS, TOP_ANSWERS_COLUMN, Columns
from .fanout import QUESTION_ID
from .poison import CRASHED

KEY = "_qa_key"  # the content key, in the map steps' files
CRASHED_FLAG = "_qa_crashed"  # a cached row whose error is CRASHED
ORDER = "_qa_order"  # an input row's place in the input (read unit << 32 | row): reused and missed rows keep it
BUCKET_ROWS = 65536  # rows a reduce step joins at most, about: the number of buckets follows from the input's rows
MAP_ROWS = 65536  # rows one map step reads, about (whole read units, or whole committed files)
SETTINGS = ("model", "variant", "columns", "decode", "windows", "wide", "fanout")  # what answers depend on
WHY = {"model": "the model's files changed", "variant": "the served variant changed",
       "columns": "the id, question or context column changed", "decode": "the decoding settings changed",
       "windows": "the window settings changed", "wide": "--wide changed", "fanout": "--questions was added or removed"}
NEW_CONTENT = "new or edited question or context"
CRASHED_BEFORE = "crashed the model process in the committed run"
GROUPS = 4096  # per bucket, partitions of a partitioned table output at most: unit b * GROUPS + k holds group k
PLAN_FILE = "_plan.json"  # written last by the reuse pass: the buckets' reused rows and the files left to answer


@dataclass(frozen=True)
class CommittedOutput:
    """What a sink holds committed, as a refresh reads it: the files whose rows are exactly the committed rows,
    and what they were answered with."""

    fs: pafs.FileSystem
    files: tuple[str, ...]
    rows: int
    ref: dict  # what a refresh of it records as ``replaces`` (a folder's run, a table's snapshot)
    settings: dict | None  # ``settings_of`` the committed job; None: not known (an earlier release, another writer)
    input_key: str | None  # ``input_key`` of the committed job
    manifest: object = None  # pipeline.records.Manifest of the committed run, when the sink has one
    unknown_because: str = ""  # why ``settings`` is None


def settings_of(identity: dict) -> dict:
    """The answer-affecting part of a job identity (as written, version 2): the same for two runs whose rows'
    answers are the same. Fan-out's question texts are not in it: they are in each row's key."""
    out = {k: identity.get(k) for k in SETTINGS if k != "fanout"}
    out["fanout"] = identity.get("questions") is not None
    if identity.get("wide"):  # a wide row holds every question's answer: it holds for the same question set only
        out["questions"] = identity.get("questions")
    return out


def input_key(identity: dict) -> str:
    """What the rows of a job are, as a hash: its input's identity and its fan-out questions. A committed run
    with the same key and settings answered exactly this input (a refresh has nothing to do)."""
    return settings_key({"input": identity.get("input"), "questions": identity.get("questions")})


def why_not_reused(committed: dict | None, current: dict, unknown_because: str = "") -> str | None:
    """None when the committed answers were made with ``current`` settings; else the first difference, in words."""
    if committed is None:
        return unknown_because or "the committed run's settings are not known"
    for k in (*SETTINGS, "questions"):
        if committed.get(k) != current.get(k):
            if k == "variant":
                a, b = committed.get(k) or {}, current.get(k) or {}
                return (f"the served variant changed ({a.get('backend')} {a.get('precision')} -> "
                        f"{b.get('backend')} {b.get('precision')})")
            return WHY.get(k, "the fan-out questions changed (a --wide row holds every question's answer: it is "
                              "answered again whole)")
    return None


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def content_keys(table: pa.Table, columns: Columns, fanout: bool, wide: bool = False) -> pa.Array:
    """A 16-byte key per row from its question and context texts (and question id with fan-out; the context
    alone for a wide row, whose questions are the job's); a null and an empty text differ, and a text that is not
    a string keys by its repr."""
    if wide:
        parts = [table.column(columns.context)]
    else:
        parts = ([table.column(QUESTION_ID)] if fanout else []) + [table.column(columns.question),
                                                                   table.column(columns.context)]
    values = [p.to_pylist() for p in parts]
    keys = []
    for row in zip(*values):
        h = hashlib.blake2b(digest_size=16)
        for v in row:
            if v is None:
                h.update(b"\x00")
                continue
            data = v.encode() if isinstance(v, str) else repr(v).encode()
            h.update((b"\x01" if isinstance(v, str) else b"\x02") + len(data).to_bytes(8, "little") + data)
        keys.append(h.digest())
    return pa.array(keys, pa.binary(16))


def bucket_count(rows: int, per_bucket: int = BUCKET_ROWS) -> int:
    return max(1, math.ceil(rows / per_bucket))


def buckets_of(keys: pa.Array, n: int) -> np.ndarray:
    """Each key's bucket: its first 8 bytes as an integer, modulo n."""
    if len(keys) == 0:
        return np.zeros(0, np.int64)
    data = np.frombuffer(keys.buffers()[1], np.uint8)[keys.offset * 16:(keys.offset + len(keys)) * 16]
    return (data.reshape(-1, 16)[:, :8].copy().view(np.uint64).ravel() % np.uint64(n)).astype(np.int64)


def split(table: pa.Table, buckets: np.ndarray, n: int) -> dict[int, pa.Table]:
    """``table``'s rows by bucket (only the buckets that have rows), each in the table's order."""
    order = np.argsort(buckets, kind="stable")
    counts = np.bincount(buckets, minlength=n)
    out, start = {}, 0
    for b, c in enumerate(counts):
        if c:
            out[b] = table.take(pa.array(order[start:start + c]))
            start += c
    return out


def partition_groups(table: pa.Table, columns: list[str], where: str) -> list[pa.Table]:
    """``table``'s rows grouped by the values of ``columns`` (a partitioned output's source columns: a table
    sink commits each file into one partition), in order of first appearance, each group in table order."""
    if not columns or table.num_rows == 0:
        return [table] if table.num_rows else []
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(*(table.column(c).to_pylist() for c in columns))):
        groups.setdefault(key, []).append(i)
    if len(groups) > GROUPS:
        raise ValueError(f"{where}: {len(groups)} distinct values of the partition columns {columns} in one "
                         f"bucket, more than {GROUPS}; refresh this output with --mode overwrite")
    return [table.take(pa.array(rows)) for rows in groups.values()]


def answer_columns(schema: pa.Schema) -> list[str]:
    """The columns a job adds to its input's, in the order it adds them, as a committed output has them."""
    return [c for c in (*OUTPUT_COLUMNS, TOP_ANSWERS_COLUMN) if c in schema.names]


def wide_columns(question_ids: list[str]) -> list[str]:
    """The columns a wide fan-out adds to its documents' (pipeline.fanout.to_wide), in order."""
    return [c for q in question_ids for c in (f"answer_{q}", f"score_{q}")] + ["error"]


def reusable(committed: pa.Table, columns: Columns, fanout: bool, wide: list[str] | None = None) -> pa.Table:
    """A committed output's rows as a cache: their key, their answer columns (``wide``: those of a wide output),
    and whether the row crashed the model process (not reused)."""
    keys = content_keys(committed, columns, fanout, wide is not None)
    cache = committed.select(wide or answer_columns(committed.schema)).append_column(KEY, keys)
    error = cache.column("error") if "error" in cache.column_names else pa.nulls(cache.num_rows, pa.string())
    crashed = pc.match_substring(error, CRASHED) if wide else pc.equal(error, CRASHED)
    return cache.append_column(CRASHED_FLAG, pc.fill_null(crashed, False))


@dataclass(frozen=True)
class Joined:
    reused: pa.Table  # input rows (in input order) with the committed answer columns appended
    missing: pa.Table  # input rows with no committed answer, in input order
    crashed_before: int  # of the missing: rows whose committed answer was a crash


def join(rows: pa.Table, cache: pa.Table) -> Joined:
    """Input rows (with KEY and ORDER) against cached answers (``reusable``): each row takes the first cached
    answer with its key that did not crash. KEY and ORDER are dropped from both results."""
    rows = rows.sort_by(ORDER)
    first: dict[bytes, int] = {}
    crashed_keys: set[bytes] = set()
    for i, (k, crashed) in enumerate(zip(cache.column(KEY).to_pylist(), cache.column(CRASHED_FLAG).to_pylist())):
        if crashed:
            crashed_keys.add(k)
        else:
            first.setdefault(k, i)
    row_keys = rows.column(KEY).to_pylist()
    found = np.array([first.get(k, -1) for k in row_keys], np.int64)
    hit = found >= 0
    plain = rows.drop_columns([KEY, ORDER])
    reused = plain.filter(pa.array(hit))
    answers = cache.take(pa.array(found[hit])).drop_columns([KEY, CRASHED_FLAG])
    for name in answers.column_names:
        reused = reused.append_column(answers.schema.field(name), answers.column(name))
    crashed = sum(1 for k, h in zip(row_keys, hit) if not h and k in crashed_keys)
    return Joined(reused, plain.filter(pa.array(~hit)), crashed)


@dataclass(frozen=True)
class RefreshPlan:
    """What the reuse pass left in staging (``PLAN_FILE``): the read units staged with committed answers (per
    bucket, one per partition of a partitioned output), and the files of rows left to answer."""

    buckets: int
    reused: dict[int, int]  # read unit (bucket * GROUPS + partition group) -> rows staged with committed answers
    missing_files: list[str]
    rows_in: int  # output rows the input yields
    answered_because: dict[str, int] = field(default_factory=dict)

    @property
    def rows_reused(self) -> int:
        return sum(self.reused.values())

    def to_json(self) -> dict:
        return {**asdict(self), "reused": {str(k): v for k, v in self.reused.items()}}

    @classmethod
    def from_json(cls, d: dict) -> RefreshPlan:
        return cls(d["buckets"], {int(k): v for k, v in d["reused"].items()}, d["missing_files"], d["rows_in"],
                   d.get("answered_because", {}))
