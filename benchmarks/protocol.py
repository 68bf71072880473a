"""What the exactly-once output protocol (pipeline.commit) costs, against plain Parquet writes of the same rows.

    python -m benchmarks.protocol [--rows 20000] [--rows-per-unit 1024] [--repeats 3] [--stores local,s3]

No Ray, no model: a table of answered rows shaped like the job's output (SQuAD-like lengths: contexts of about
700 characters shared by about five questions, questions of about 60, answers of about 19; the hidden
``_unit``/``_row`` columns the answering stage adds), cut into one block per read unit as the answering actors stage
them. Three phases, timed for each store:

- ``baseline``: one plain ``pq.write_table`` per unit to its final name (what a job without a protocol writes);
- ``stage``: ``OutputCommitter.inspect`` + ``begin`` (``_job.json``, ``_lease.json``), then ``write_block`` per
  unit (files under ``_staging/``);
- ``commit``: ``OutputCommitter.commit``: the staged footers read, ``_commit.json``, every file moved to the root
  under its run-unique name, ``_manifest.json`` swapped in, old files and staging removed.

Stores: a local directory, and an S3 bucket on a moto server on 127.0.0.1 (its own process, reached the way the
job reaches an S3-compatible store: ``AWS_ENDPOINT_URL`` and ``pipeline.lake.filesystem_and_path``).

Seconds are medians of ``--repeats`` timed passes on the plain filesystems (``x baseline``: the median of the
per-pass ratios, baseline measured in the same pass). Bytes and operations come from one more pass, run first
(it also warms up), through a counting filesystem: a subclass of the store's own pyarrow filesystem class
(``pipeline.commit`` writes a local file under a temporary name and renames it only when the filesystem is a
``LocalFileSystem``; a ``PyFileSystem`` wrapper would send it down the object-store branch and measure the wrong
protocol) that counts the bytes passing through ``open_output_stream`` (split into Parquet data and JSON
markers), the bytes a ``move``/``copy_file`` copies inside the store (S3 has no rename: a move there is a
server-side copy and a delete; a local move is a rename and copies nothing), reads, and every call. On S3 the
server counts the HTTP requests it receives, by kind, and the body bytes of each kind (a wrapper around moto's
WSGI app), so request counts are the store's, not the client's idea of them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.commit import ROW_COLUMN, UNIT_COLUMN, OutputCommitter
from pipeline.config import Columns, DecodeSettings, WindowSettings
from pipeline.precision import Variant
from pipeline.records import JobIdentity, ModelHashes
from pipeline.units import ReadUnit

REPO = Path(__file__).resolve().parents[1]
PHASES = ("baseline", "stage", "commit")
MARKERS = ("_job.json", "_lease.json", "_commit.json", "_manifest.json")
COUNTS_PATH = "/_protocol_bench/counts"  # answered by the counting wrapper, never reaches moto
BUCKET = "protocol-bench"
QUESTIONS_PER_CONTEXT = 5  # SQuAD dev v1.1: 10570 questions on 2067 contexts
ERROR_EVERY = 500  # one row in 500 carries an error (empty question) and no answer


# -- the rows -----------------------------------------------------------------------------------------
def _vocabulary(rng: np.random.Generator, size: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    weights = np.linspace(2.0, 0.05, letters.size)
    weights /= weights.sum()
    words = np.array(["".join(rng.choice(letters, size=int(n), p=weights))
                      for n in rng.integers(2, 11, size=size)])
    zipf = 1.0 / np.arange(1, size + 1)
    return words, zipf / zipf.sum()


def _text(rng: np.random.Generator, words: np.ndarray, p: np.ndarray, chars: int) -> str:
    out, n = [], 0
    for w in rng.choice(words, size=chars // 4 + 8, p=p):
        out.append(str(w))
        n += len(w) + 1
        if n >= chars:
            break
    return " ".join(out)


def answered_blocks(rows: int, rows_per_unit: int, seed: int = 0) -> list[pa.Table]:
    """One block per read unit of answered rows, as an answering actor stages them: the input
    columns, the job's answer columns, and the hidden unit/row columns (row numbers restart in every unit)."""
    rng = np.random.default_rng(seed)
    words, p = _vocabulary(rng)
    contexts = [_text(rng, words, p, int(n)) for n in
                rng.lognormal(np.log(700), 0.4, size=-(-rows // QUESTIONS_PER_CONTEXT)).clip(150, 4000)]
    ids, questions, ctx, answers, starts, ends = [], [], [], [], [], []
    for i in range(rows):
        c = contexts[i // QUESTIONS_PER_CONTEXT]
        ids.append(rng.bytes(12).hex())
        questions.append(_text(rng, words, p, int(rng.integers(35, 90))) + "?")
        ctx.append(c)
        if i % ERROR_EVERY == ERROR_EVERY - 1:
            answers.append(None)
            starts.append(None)
            ends.append(None)
            continue
        start = int(rng.integers(0, max(1, len(c) - 40)))
        start = c.rfind(" ", 0, start) + 1
        end = min(len(c), start + int(rng.integers(4, 40)))
        end = c.find(" ", end) if c.find(" ", end) > 0 else len(c)
        answers.append(c[start:end])
        starts.append(start)
        ends.append(end)
    errored = [a is None for a in answers]
    score = np.round(rng.normal(8.0, 3.0, rows), 6)
    probability = rng.uniform(0.0, 1.0, rows)
    table = pa.table({
        "id": pa.array(ids, pa.string()),
        "question": pa.array(questions, pa.string()),
        "context": pa.array(ctx, pa.string()),
        "answer": pa.array(answers, pa.string()),
        "answer_start": pa.array(starts, pa.int64()),
        "answer_end": pa.array(ends, pa.int64()),
        "score": pa.array([None if e else float(s) for e, s in zip(errored, score)], pa.float64()),
        "probability": pa.array([None if e else float(q) for e, q in zip(errored, probability)], pa.float64()),
        "error": pa.array(["question is empty" if e else None for e in errored], pa.string()),
    })
    blocks = []
    for unit, first in enumerate(range(0, rows, rows_per_unit)):
        part = table.slice(first, min(rows_per_unit, rows - first))
        n = part.num_rows
        part = part.append_column(UNIT_COLUMN, pa.array([unit] * n, pa.int64()))
        blocks.append(part.append_column(ROW_COLUMN, pa.array(range(n), pa.int64())))
    return blocks


def read_units(blocks: list[pa.Table]) -> list[ReadUnit]:
    """The plan the blocks answer: one row group of one input file per unit."""
    return [ReadUnit(u, "lake/questions/part-0.parquet", u, 0, b.num_rows) for u, b in enumerate(blocks)]


def job_and_extra(rows: int, rows_per_unit: int) -> tuple[JobIdentity, dict]:
    """A job identity and manifest fields of the shape and size jobs.plan/jobs.answer write."""
    sha = "0123456789abcdef" * 4
    windows = WindowSettings(max_seq_len=256, doc_stride=128, max_query_len=64)
    job = JobIdentity(
        input={"format": "parquet", "files": [{"path": "lake/questions/part-0.parquet", "size": 7_000 * rows // 10,
                                               "mtime_ns": 1_764_460_800_000_000_000}]},
        model=ModelHashes(graph_sha256=sha, weights_sha256=None, tokenizer_sha256=sha, spec_sha256=sha),
        variant=Variant("onnxruntime", "fp32"), columns=Columns(), decode=DecodeSettings(), windows=windows,
        rows_per_unit=rows_per_unit)
    extra = {"config": {"input": "lake/questions/", "output": "lake/answers", "model": "default",
                        "rows_per_unit": rows_per_unit, "mode": "error", "batch_tokens": 512},
             "model": {"directory": "/models/default", "model_file": "/models/default/model.int8.onnx",
                       "sha256": sha, "tokenizer_file": "/models/default/tokenizer.json",
                       "tokenizer_sha256": sha, "spec_sha256": sha, "lowercase": True,
                       "windows": asdict(windows)},
             "input_files": ["lake/questions/part-0.parquet"], "skipped_bad_files": [],
             "read_units": -(-rows // rows_per_unit), "rows_in": rows, "rows_per_input_row": 1,
             "units_answered_now": -(-rows // rows_per_unit), "rows_staged_before": 0,
             "errors_by_kind_this_run": {"question is empty": rows // ERROR_EVERY},
             "ray": {"concurrency": 2, "cpus_per_actor": 1, "cluster_cpus": 2},
             "stages": {"tokenize_s": 4.0, "infer_s": 185.3, "decode_s": 2.0},
             "durations_s": {"total": 200.0, "answer_and_write": 190.0}, "questions_per_s": 28.4}
    return job, extra


# -- counting ---------------------------------------------------------------------------------------
@dataclass
class Counts:
    """What one phase did through a counting filesystem. Bytes written = data + markers (what the client sent)
    + copied (what the store copied for it: S3 moves)."""

    data_bytes: int = 0  # Parquet bytes through open_output_stream
    marker_bytes: Counter = field(default_factory=Counter)  # JSON bytes by marker name (temporary names folded)
    copied_bytes: int = 0  # bytes a move/copy_file copies inside the store
    read_bytes: int = 0
    calls: Counter = field(default_factory=Counter)  # filesystem calls by kind

    @property
    def markers(self) -> int:
        return sum(self.marker_bytes.values())

    @property
    def written(self) -> int:
        return self.data_bytes + self.markers + self.copied_bytes

    def as_dict(self) -> dict:
        return {"data_bytes": self.data_bytes, "marker_bytes": dict(self.marker_bytes), "copied_bytes": self.copied_bytes,
                "read_bytes": self.read_bytes, "calls": dict(self.calls)}


def _marker_name(path: str) -> str | None:
    name = path.rsplit("/", 1)[-1].split(".tmp-", 1)[0]
    return name if name.endswith(".json") else None


class _CountingWriter:
    def __init__(self, raw, on_close: Callable[[int], None]):
        self.raw, self.n, self._on_close = raw, 0, on_close

    def write(self, data) -> int:
        self.n += memoryview(data).nbytes
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()

    def tell(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        if not self.raw.closed:
            self.raw.close()
            self._on_close(self.n)

    @property
    def closed(self) -> bool:
        return self.raw.closed


class _CountingReader:
    def __init__(self, raw, counts: Counts):
        self.raw, self.counts = raw, counts

    def read(self, nbytes: int | None = None) -> bytes:
        data = self.raw.read() if nbytes is None or nbytes < 0 else self.raw.read(nbytes)
        self.counts.read_bytes += len(data)
        return data

    def seek(self, position: int, whence: int = 0) -> int:
        return self.raw.seek(position, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def size(self) -> int:
        return self.raw.size()

    def close(self) -> None:
        self.raw.close()

    @property
    def closed(self) -> bool:
        return self.raw.closed


class _Counting:
    """Mixed into a subclass of the store's own filesystem class: every call the committer, pq and lake make goes
    through these methods (they are Python-level calls), then on to the real implementation."""

    def _init_counting(self) -> None:
        self.counts = Counts()
        self._sizes: dict[str, int] = {}  # bytes of the files written through this object, by path
        self._lock = threading.Lock()

    def take(self) -> Counts:
        """The counts so far, reset."""
        with self._lock:
            counts, self.counts = self.counts, Counts()
        return counts

    def _renames(self) -> bool:
        return isinstance(self, pafs.LocalFileSystem)

    def _written(self, path: str, n: int) -> None:
        with self._lock:
            self._sizes[path] = n
            marker = _marker_name(path)
            if marker is None:
                self.counts.data_bytes += n
            else:
                self.counts.marker_bytes[marker] += n

    def open_output_stream(self, path, compression="detect", buffer_size=None, metadata=None):
        self.counts.calls["write"] += 1
        raw = super().open_output_stream(path, compression=compression, buffer_size=buffer_size, metadata=metadata)
        return pa.PythonFile(_CountingWriter(raw, lambda n: self._written(path, n)), mode="w")

    def _size(self, path: str) -> int:
        size = self._sizes.pop(path, None)
        return super().get_file_info(path).size if size is None else size  # not written here: ask (an extra HEAD)

    def move(self, src, dest):
        size = self._size(src)
        self.counts.calls["rename" if self._renames() else "move (copy + delete)"] += 1
        if not self._renames():
            self.counts.copied_bytes += size
        super().move(src, dest)
        self._sizes[dest] = size

    def copy_file(self, src, dest):
        size = self._size(src)
        self._sizes[src] = size
        self.counts.calls["copy"] += 1
        self.counts.copied_bytes += size
        super().copy_file(src, dest)
        self._sizes[dest] = size

    def delete_file(self, path):
        self.counts.calls["delete file"] += 1
        self._sizes.pop(path, None)
        super().delete_file(path)

    def delete_dir(self, path):
        self.counts.calls["delete dir"] += 1
        super().delete_dir(path)

    def create_dir(self, path, *, recursive=True):
        self.counts.calls["create dir"] += 1
        super().create_dir(path, recursive=recursive)

    def get_file_info(self, paths_or_selector):
        if isinstance(paths_or_selector, pafs.FileSelector):
            self.counts.calls["list"] += 1
        else:
            self.counts.calls["info"] += 1 if isinstance(paths_or_selector, str) else len(paths_or_selector)
        return super().get_file_info(paths_or_selector)

    def open_input_file(self, path):
        self.counts.calls["read"] += 1
        return pa.PythonFile(_CountingReader(super().open_input_file(path), self.counts), mode="r")

    def open_input_stream(self, path, compression="detect", buffer_size=None):
        self.counts.calls["read"] += 1
        raw = super().open_input_stream(path, compression=compression, buffer_size=buffer_size)
        return pa.PythonFile(_CountingReader(raw, self.counts), mode="r")


class CountingLocalFileSystem(_Counting, pafs.LocalFileSystem):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._init_counting()


class CountingS3FileSystem(_Counting, pafs.S3FileSystem):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._init_counting()


# -- the S3 server ----------------------------------------------------------------------------------
def request_kind(method: str, path: str, query: str, headers: dict) -> str:
    """An S3 request's kind, as billed: PUT/COPY/POST/LIST are one class, GET/HEAD another, DELETE free."""
    key = path.lstrip("/").partition("/")[2]  # "/bucket/key", path-style; a directory marker ends in "/"
    args = {a.split("=", 1)[0] for a in query.split("&") if a}
    if method == "PUT":
        if "HTTP_X_AMZ_COPY_SOURCE" in headers:
            return "COPY" if "partNumber" not in args else "COPY part"
        if "partNumber" in args:
            return "PUT part"
        if not key:
            return "PUT bucket"
        return "PUT dir marker" if key.endswith("/") else "PUT"
    if method == "POST":
        if "delete" in args:
            return "POST delete (bulk)"
        if "uploads" in args:
            return "POST multipart start"
        if "uploadId" in args:
            return "POST multipart complete"
        return "POST"
    if method == "GET":
        return "GET" if key and not ({"list-type", "prefix", "delimiter"} & args) else "LIST"
    return method


class RequestCounter:
    """WSGI wrapper around moto's app: counts requests by kind and the body bytes of each kind; answers
    GET COUNTS_PATH[?reset=1] itself with the counts so far (reset after reading)."""

    def __init__(self, app):
        self.app = app
        self.requests: Counter = Counter()
        self.body: Counter = Counter()
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == COUNTS_PATH:
            with self.lock:
                body = json.dumps({"requests": dict(self.requests), "body_bytes": dict(self.body)}).encode()
                if "reset=1" in environ.get("QUERY_STRING", ""):
                    self.requests, self.body = Counter(), Counter()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        kind = request_kind(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""),
                            environ)
        decoded = environ.get("HTTP_X_AMZ_DECODED_CONTENT_LENGTH")  # aws-chunked bodies: the payload, not framing
        n = int(decoded or environ.get("CONTENT_LENGTH") or 0)
        with self.lock:
            self.requests[kind] += 1
            self.body[kind] += n
        return self.app(environ, start_response)


def serve_s3(port: int) -> None:
    """A moto S3 server on 127.0.0.1:port that counts what it is asked (run in its own process)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = RequestCounter(DomainDispatcherApplication(create_backend_app))
    make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler).serve_forever()


class ServerCounts:
    def __init__(self, endpoint: str):
        self.url = endpoint + COUNTS_PATH

    def take(self) -> dict:
        with urllib.request.urlopen(self.url + "?reset=1", timeout=30) as r:
            return json.loads(r.read())


def moto_available() -> bool:
    try:
        import moto.moto_server.werkzeug_app  # noqa: F401
    except ImportError:
        return False
    return True


# -- the stores -------------------------------------------------------------------------------------
@dataclass
class Store:
    name: str
    plain: pafs.FileSystem  # what the job would use
    counting: _Counting  # the same store through a counting subclass
    base: str
    server: ServerCounts | None = None


@contextmanager
def local_store(directory: str | None = None) -> Iterator[Store]:
    root = tempfile.mkdtemp(prefix="protocol-bench-", dir=directory)
    fs = pafs.LocalFileSystem()
    try:
        yield Store("local", fs, CountingLocalFileSystem(), fs.normalize_path(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    """A port free on 127.0.0.1 now (for a moto server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server(serve: str) -> Iterator[str]:
    """A moto server on 127.0.0.1 in its own process, ``serve`` (``module:function``) called there with its port;
    yields the endpoint, stops the server on the way out."""
    module, function = serve.split(":")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", f"from {module} import {function}; {function}({port})"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError("the moto server exited at start (is moto[server] installed?)") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@contextmanager
def moto_store(allow_delayed_open: bool = False) -> Iterator[Store]:
    """An S3 bucket on a moto server (its own process) on 127.0.0.1, configured for this process the way a user
    points the job at an S3-compatible store (AWS_ENDPOINT_URL and credentials in the environment).
    ``allow_delayed_open``: the same filesystem with that pyarrow option (a small file is then one PutObject at
    close instead of a multipart upload of one part: three requests), to show what the option would save."""

    with moto_server("benchmarks.protocol:serve_s3") as endpoint:
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
        with environment(env, drop=("AWS_ENDPOINT_URL_S3", "AWS_REGION")):
            yield _moto_bucket(endpoint, env, allow_delayed_open)


def _moto_bucket(endpoint: str, env: dict, allow_delayed_open: bool) -> Store:
    from pipeline.lake import filesystem_and_path

    pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True).create_dir(BUCKET)
    fs, base = filesystem_and_path(f"s3://{BUCKET}/runs")
    settings = {"endpoint_override": endpoint, "region": env["AWS_DEFAULT_REGION"]}  # filesystem_and_path's
    name = "S3 (moto, 127.0.0.1)"
    if allow_delayed_open:
        fs, name = pafs.S3FileSystem(**settings, allow_delayed_open=True), f"{name}, allow_delayed_open"
    counting = CountingS3FileSystem(**settings, allow_delayed_open=allow_delayed_open)
    return Store(name, fs, counting, base, ServerCounts(endpoint))


@contextmanager
def environment(values: dict[str, str], drop: tuple[str, ...] = ()) -> Iterator[None]:
    """This process's environment with ``values`` set and ``drop`` unset, as it was again on the way out."""
    saved = {k: os.environ.get(k) for k in (*values, *drop)}
    try:
        for k in drop:
            os.environ.pop(k, None)
        os.environ.update(values)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- measuring --------------------------------------------------------------------------------------
def write_baseline(fs: pafs.FileSystem, root: str, tables: list[pa.Table]) -> None:
    fs.create_dir(root, recursive=True)
    for unit, table in enumerate(tables):
        pq.write_table(table, f"{root}/part-{unit:06d}.parquet", filesystem=fs)


def stage(committer: OutputCommitter, blocks: list[pa.Table], job: JobIdentity) -> None:
    committer.inspect("error", job)
    committer.begin("error", job)
    for block in blocks:
        committer.write_block(block)


@dataclass
class StoreResult:
    store: str
    rows: int
    units: int
    seconds: dict[str, list[float]]  # by phase, one per timed pass
    counts: dict[str, Counts]  # by phase, from the counted pass
    requests: dict[str, dict] | None  # by phase: server-side {"requests": {kind: n}, "body_bytes": {kind: n}}
    files: dict[str, dict[str, int]]  # by phase: path -> size of every file under the pass's root after it
    manifest: dict  # the counted pass's manifest
    root: str  # the counted pass's root (kept while the store lives, if keep)

    def ratios(self, phases: tuple[str, ...]) -> list[float]:
        base = self.seconds["baseline"]
        return [sum(self.seconds[p][k] for p in phases) / base[k] for k in range(len(base))]


def _listing(fs: pafs.FileSystem, root: str) -> dict[str, int]:
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return {}
    return {i.path: i.size for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if i.type == pafs.FileType.File}


def _one_pass(fs: pafs.FileSystem, root: str, blocks: list[pa.Table], plain: list[pa.Table], job: JobIdentity,
              extra: dict, protocol_first: bool = False, on_start: Callable[[str], None] | None = None,
              on_end: Callable[[str], None] | None = None) -> tuple[dict[str, float], dict]:
    seconds: dict[str, float] = {}
    committer = OutputCommitter(fs, f"{root}/protocol")
    result: dict = {}
    steps = {"baseline": lambda: write_baseline(fs, f"{root}/baseline", plain),
             "stage": lambda: stage(committer, blocks, job),
             "commit": lambda: result.update(committer.commit(read_units(blocks), job, extra).to_json())}
    order = ("stage", "commit", "baseline") if protocol_first else PHASES
    for phase in order:
        if on_start:
            on_start(phase)
        t0 = time.perf_counter()
        steps[phase]()
        seconds[phase] = time.perf_counter() - t0
        if on_end:
            on_end(phase)
    return seconds, result


def measure(store: Store, blocks: list[pa.Table], repeats: int = 3, job: JobIdentity | None = None,
            extra: dict | None = None, keep: bool = False, progress: Callable[[str], None] | None = None
            ) -> StoreResult:
    """The counted pass (also the warm-up), then ``repeats`` timed passes (the order of baseline and protocol
    alternates between passes); each timed pass's files are removed after it (not timed)."""
    rows = sum(b.num_rows for b in blocks)
    if job is None or extra is None:
        job, extra = job_and_extra(rows, max(b.num_rows for b in blocks))
    plain = [b.drop_columns([UNIT_COLUMN, ROW_COLUMN]) for b in blocks]
    counts: dict[str, Counts] = {}
    requests: dict[str, dict] = {}
    files: dict[str, dict[str, int]] = {}
    fs = store.counting
    counted_root = f"{store.base}/counted"

    def start(phase: str) -> None:
        fs.take()
        if store.server is not None:
            store.server.take()

    def end(phase: str) -> None:
        counts[phase] = fs.take()
        if store.server is not None:
            requests[phase] = store.server.take()
        files[phase] = _listing(store.plain, counted_root)  # after the server's counts: a LIST of its own

    _, manifest = _one_pass(fs, counted_root, blocks, plain, job, extra, on_start=start, on_end=end)
    seconds: dict[str, list[float]] = {p: [] for p in PHASES}
    for k in range(repeats):
        root = f"{store.base}/pass-{k}"
        took, _ = _one_pass(store.plain, root, blocks, plain, job, extra, protocol_first=k % 2 == 1)
        for p in PHASES:
            seconds[p].append(took[p])
        store.plain.delete_dir(root)
        if progress:
            progress(f"{store.name} pass {k + 1}/{repeats}: " + ", ".join(f"{p} {took[p]:.3f} s" for p in PHASES))
    if not keep:
        store.plain.delete_dir(counted_root)
    return StoreResult(store.name, rows, len(blocks), seconds, counts, requests or None, files, manifest,
                       counted_root)


# -- report -----------------------------------------------------------------------------------------
def filesystem_type(path: str) -> str:
    """The mount type (ext4, tmpfs, overlay...) of the mount a local path is on."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def header(rows: int, rows_per_unit: int, units: int, repeats: int, local_dir: str) -> str:
    from pipeline.cpu import cpu_class, model_name

    try:
        import moto
        moto_version = moto.__version__
    except ImportError:
        moto_version = "not installed"
    return (f"CPU: {model_name()} (class {cpu_class()}), {os.cpu_count()} CPUs; pyarrow {pa.__version__}, "
            f"moto {moto_version}; local directory on {filesystem_type(local_dir)}. {rows} rows in {units} units of "
            f"{rows_per_unit}; seconds: median of {repeats} passes.")


def _kb(n: float) -> str:
    return f"{n / 1000:,.2f}"


def _per_k(value: float, rows: int) -> float:
    return value * 1000 / rows


def _requests(r: StoreResult, phases: tuple[str, ...]) -> int:
    if r.requests is not None:
        return sum(sum(r.requests[p]["requests"].values()) for p in phases)
    return sum(sum(r.counts[p].calls.values()) for p in phases)


def table(results: list[StoreResult]) -> str:
    columns = ("store", "phase", "s per 1,000 rows", "x baseline (time)", "data uploaded kB", "copied in store kB",
               "markers kB", "written kB", "x baseline (bytes)",
               "requests per 1,000 rows (S3: the server's; local: fs calls)")
    lines = ["| " + " | ".join(columns) + " |", "| --- | --- |" + " ---: |" * (len(columns) - 2)]
    for r in results:
        base_written = r.counts["baseline"].written
        for label, phases in (("baseline: pq.write_table per unit", ("baseline",)), ("stage", ("stage",)),
                              ("commit", ("commit",)), ("**protocol: stage + commit**", ("stage", "commit"))):
            per_pass = [sum(r.seconds[p][k] for p in phases) for k in range(len(r.seconds["baseline"]))]
            c = [r.counts[p] for p in phases]
            written = sum(x.written for x in c)
            ratio = "1" if phases == ("baseline",) else f"{statistics.median(r.ratios(phases)):.2f}"
            bytes_ratio = "1" if phases == ("baseline",) else f"{written / base_written:.3f}"
            lines.append(
                f"| {r.store} | {label} | {_per_k(statistics.median(per_pass), r.rows):.4f} | {ratio} "
                f"| {_kb(_per_k(sum(x.data_bytes for x in c), r.rows))} "
                f"| {_kb(_per_k(sum(x.copied_bytes for x in c), r.rows))} "
                f"| {_kb(_per_k(sum(x.markers for x in c), r.rows))} | {_kb(_per_k(written, r.rows))} "
                f"| {bytes_ratio} | {_per_k(_requests(r, phases), r.rows):.1f} |")
    return "\n".join(lines)


def details(r: StoreResult) -> str:
    """Per phase, whole run: the calls (local) or the server's requests (S3), the markers and the reads."""
    lines = []
    for p in PHASES:
        c = r.counts[p]
        markers = ", ".join(f"{m} {n:,} B" for m, n in sorted(c.marker_bytes.items())) or "none"
        if r.requests is not None:
            what = ", ".join(f"{k} {n}" for k, n in sorted(r.requests[p]["requests"].items()))
            body = sum(r.requests[p]["body_bytes"].values())
            ops = f"requests: {what}; request bodies {body:,} B"
        else:
            ops = "calls: " + ", ".join(f"{k} {n}" for k, n in sorted(c.calls.items()))
        lines.append(f"- {r.store}, {p}: {ops}; markers: {markers}; read {c.read_bytes:,} B")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.protocol", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20000, help="output rows (default 20000)")
    p.add_argument("--rows-per-unit", type=int, default=1024, help="rows per read unit, one file each (default 1024)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per store (default 3)")
    p.add_argument("--stores", default="local,s3", help="comma-separated: local, s3 (default both)")
    p.add_argument("--s3-allow-delayed-open", action="store_true",
                   help="also measure S3 with pyarrow's allow_delayed_open (not what the job sets today)")
    p.add_argument("--dir", default=None, help="where the local store's temporary directory goes (default: $TMPDIR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the raw numbers here")
    args = p.parse_args(argv)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    unknown = set(stores) - {"local", "s3"}
    if unknown or args.rows < 1 or args.rows_per_unit < 1 or args.repeats < 1:
        p.error(f"--stores takes local and s3 (got {sorted(unknown)}); --rows, --rows-per-unit, --repeats >= 1")

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    blocks = answered_blocks(args.rows, args.rows_per_unit, args.seed)
    results = []
    if "local" in stores:
        with local_store(args.dir) as store:
            local_dir = store.base
            results.append(measure(store, blocks, args.repeats, progress=say))
    else:
        local_dir = args.dir or tempfile.gettempdir()
    notes = []
    if "s3" in stores:
        if moto_available():
            for delayed in (False, True) if args.s3_allow_delayed_open else (False,):
                with moto_store(delayed) as store:
                    results.append(measure(store, blocks, args.repeats, progress=say))
        else:
            notes.append("S3 skipped: needs moto[server] (pip install -e '.[test]').")
    print(header(args.rows, args.rows_per_unit, len(blocks), args.repeats, local_dir))
    print()
    print(table(results))
    print()
    for r in results:
        print(details(r))
    for n in notes:
        print(n)
    if args.json:
        Path(args.json).write_text(json.dumps([{
            "store": r.store, "rows": r.rows, "units": r.units, "seconds": r.seconds,
            "counts": {p: c.as_dict() for p, c in r.counts.items()}, "requests": r.requests} for r in results],
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
