"""How long the driver takes to plan a job over many small Parquet files, before and after concurrent footers.

    python -m benchmarks.planning --files 10000 --store local --repeats 3
    python -m benchmarks.planning --files 1000 --store s3 --repeats 3 [--s3-latency-ms 20]

No Ray, no model: ``--files`` small Parquet files (0 to 63 rows of id/question/context each, one row group;
one file in 64 empty) are written once, then planned the way ``jobs.plan`` plans them: ``expand_input`` (the
listing), ``input_base`` and ``plan_units``. Two variants, each measured in its own fresh process (so that its
peak RSS is its own), alternating order from pass to pass:

- ``before``: ``plan_units(..., threads=1)`` on plain ``str`` paths: one footer after another, each file opened
  by name alone (on S3 a HEAD for the size, then a GET of the footer): the request pattern and the code path of
  ``plan_units`` before footers were read concurrently;
- ``after``: ``plan_units`` as the job calls it: ``STORE_THREADS`` footers at once, the listed size passed to
  the reader (``ListedFile``), so that a footer is one ranged GET.

Also timed in both: ``stat``, the per-file ``get_file_info`` that ``jobs.plan.job_identity`` does after planning
(sizes and modification times for resume; pyarrow asks S3 one path after another), and the same stat through
``pipeline.lake.stat_files`` (``STORE_THREADS`` at a time; checked to answer the same).

Stores: ``local``, a temporary directory (``--dir``); ``s3``, a bucket on a moto server started here on 127.0.0.1 (its
own process; the job reaches it through ``AWS_ENDPOINT_URL`` as it reaches any S3-compatible store). The server counts
the requests it answers, by kind; ``--s3-latency-ms`` makes it wait that long before answering each request, as a
far-away store does (moto on loopback answers in ~2-4 ms of its own CPU; S3 in tens of ms), so that what
concurrency hides can be seen. Seconds are medians of ``--repeats`` passes; RSS is the planning process's peak
(VmHWM) and its growth during planning (VmHWM minus VmRSS before ``expand_input``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from benchmarks.protocol import COUNTS_PATH, RequestCounter, ServerCounts, filesystem_type, moto_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "planning-bench"
LATENCY_PATH = "/_planning_bench/latency"  # ?ms=N sets the server's delay; answered by the wrapper, not moto
VARIANTS = ("before", "after")
SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()), ("context", pa.string())])


# -- the files --------------------------------------------------------------------------------------
def file_rows(i: int) -> int:
    return (i * 37) % 64  # 0..63 rows, every row count as often; file 0, 64, 128... empty


def write_files(fs: pafs.FileSystem, root: str, n: int, threads: int = 8) -> int:
    """``n`` small files ``root/part-NNNNNN.parquet``; returns the rows written."""
    fs.create_dir(root, recursive=True)

    def one(i: int) -> None:
        k = file_rows(i)
        table = pa.table({"id": [f"{i}-{r}" for r in range(k)], "question": ["who was born in paris?"] * k,
                          "context": ["The king of France was born in Paris in 1789."] * k}, schema=SCHEMA)
        pq.write_table(table, f"{root}/part-{i:06d}.parquet", filesystem=fs)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))
    return sum(file_rows(i) for i in range(n))


# -- one measurement, in its own process --------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure_once(uri: str, variant: str, rows_per_unit: int, threads: int | None) -> dict:
    """Plan ``uri`` as ``jobs.plan`` does, in the way ``variant`` names; seconds, units and memory."""
    from pipeline.lake import expand_input, input_base, stat_files
    from pipeline.units import FOOTER_THREADS, plan_units

    rss_before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    fs, files = expand_input(uri)
    t1 = time.perf_counter()
    if variant == "before":
        files, threads = [str(f) for f in files], 1  # no listed sizes, one at a time
    threads = threads or FOOTER_THREADS
    units, _, bad = plan_units(fs, files, rows_per_unit, base=input_base(uri), threads=threads)
    t2 = time.perf_counter()
    peak = _status_kb("VmHWM")
    server = ServerCounts(os.environ["AWS_ENDPOINT_URL"]) if uri.startswith("s3://") else None
    planning_requests = server.take()["requests"] if server else None
    t2_stat = time.perf_counter()  # the count request above is in neither phase
    serial = fs.get_file_info(files)  # what jobs.plan.job_identity does today
    t3 = time.perf_counter()
    stat_requests = server.take()["requests"] if server else None
    t3_concurrent = time.perf_counter()
    concurrent = stat_files(fs, files)
    t4 = time.perf_counter()
    if server:
        server.take()  # reset: the next measurement counts its own
    if [(f.path, f.size, f.mtime_ns) for f in concurrent] != [(f.path, f.size, f.mtime_ns) for f in serial]:
        raise RuntimeError("stat_files answered differently from fs.get_file_info")
    return {"variant": variant, "threads": threads, "files": len(files), "units": len(units), "bad": len(bad),
            "rows": sum(u.length for u in units), "list_s": t1 - t0, "footers_s": t2 - t1, "plan_s": t2 - t0,
            "stat_s": t3 - t2_stat, "stat_files_s": t4 - t3_concurrent, "rss_peak_mb": peak / 1024,
            "rss_growth_mb": (peak - rss_before) / 1024, "requests": planning_requests, "stat_requests": stat_requests}


def measure(uri: str, variant: str, rows_per_unit: int, threads: int | None, env: dict) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.planning", "--measure", variant, "--uri", uri,
           "--rows-per-unit", str(rows_per_unit)] + (["--threads", str(threads)] if threads else [])
    done = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {variant} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the S3 server ----------------------------------------------------------------------------------
class Latency:
    """WSGI wrapper: waits ``ms`` before passing each request on (``GET LATENCY_PATH?ms=N`` sets it)."""

    def __init__(self, app):
        self.app, self.seconds = app, 0.0

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == LATENCY_PATH:
            self.seconds = float(environ.get("QUERY_STRING", "ms=0").split("=", 1)[1]) / 1000
            start_response("200 OK", [("Content-Length", "0")])
            return [b""]
        if self.seconds and path != COUNTS_PATH:
            time.sleep(self.seconds)  # sleeps release the GIL: concurrent requests wait side by side
        return self.app(environ, start_response)


def serve_s3(port: int) -> None:
    """A moto S3 server on 127.0.0.1:port that counts what it answers and can be slowed (its own process)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = Latency(RequestCounter(DomainDispatcherApplication(create_backend_app)))
    make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler).serve_forever()


@dataclass
class Store:
    name: str
    fs: pafs.FileSystem
    root: str  # where the files go, inside fs
    uri: str  # what the job would be given as --input
    env: dict  # the environment the job would run in
    endpoint: str | None = None

    def counts(self) -> dict | None:
        return ServerCounts(self.endpoint).take()["requests"] if self.endpoint else None

    def set_latency(self, ms: float) -> None:
        if self.endpoint:
            urllib.request.urlopen(f"{self.endpoint}{LATENCY_PATH}?ms={ms}", timeout=30).close()


@contextmanager
def local_store(directory: str | None = None) -> Iterator[Store]:
    root = tempfile.mkdtemp(prefix="planning-bench-", dir=directory)
    try:
        yield Store(f"local ({filesystem_type(root)})", pafs.LocalFileSystem(), f"{root}/in", f"{root}/in",
                    dict(os.environ))
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def moto_store() -> Iterator[Store]:
    """A bucket on a moto server (its own process) on 127.0.0.1, and the environment that points a job at it."""
    with moto_server("benchmarks.planning:serve_s3") as endpoint:
        env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL_S3", "AWS_REGION")}
        env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
        fs = pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", access_key="testing",
                               secret_key="testing", allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        yield Store("S3 (moto, 127.0.0.1)", fs, f"{BUCKET}/in", f"s3://{BUCKET}/in", env, endpoint)


# -- the run ----------------------------------------------------------------------------------------
def run(store: Store, files: int, repeats: int, rows_per_unit: int, threads: int | None, latency_ms: float) -> dict:
    rows = write_files(store.fs, store.root, files)
    store.set_latency(latency_ms)
    store.counts()  # reset: the writes are not planning (each measurement takes its own counts)
    passes: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for k in range(repeats):
        for variant in VARIANTS if k % 2 == 0 else VARIANTS[::-1]:
            result = measure(store.uri, variant, rows_per_unit, threads, store.env)
            if result["files"] != files or result["rows"] != rows:
                raise RuntimeError(f"{variant} planned {result['files']} files, {result['rows']} rows; "
                                   f"wrote {files} files, {rows} rows")
            passes[variant].append(result)
            print(f"  pass {k + 1} {variant}: plan {result['plan_s']:.3f} s (list {result['list_s']:.3f}), "
                  f"stat {result['stat_s']:.3f} s (stat_files {result['stat_files_s']:.3f}), peak RSS {result['rss_peak_mb']:.0f} MB"
                  + (f", requests {result['requests']}" if result["requests"] else ""), file=sys.stderr)
    return {"store": store.name, "files": files, "rows": rows, "latency_ms": latency_ms, "passes": passes}


def summary(result: dict) -> dict:
    med = {v: {k: statistics.median(p[k] for p in result["passes"][v])
               for k in ("list_s", "footers_s", "plan_s", "rss_peak_mb", "rss_growth_mb")}
           for v in VARIANTS}
    for k in ("stat_s", "stat_files_s"):  # the same work in both variants: the median of all passes
        med["stat"] = med.get("stat", {}) | {k: statistics.median(p[k] for v in VARIANTS for p in result["passes"][v])}
    ratios = [a["plan_s"] / b["plan_s"] for a, b in zip(result["passes"]["after"], result["passes"]["before"],
                                                         strict=True)]
    return {"median": med, "ratio": statistics.median(ratios),
            "threads": result["passes"]["after"][0]["threads"], "units": result["passes"]["after"][0]["units"],
            "requests": {v: result["passes"][v][0]["requests"] for v in VARIANTS},
            "stat_requests": result["passes"]["after"][0]["stat_requests"]}


def table_row(result: dict) -> str:
    s = summary(result)
    b, a, st = s["median"]["before"], s["median"]["after"], s["median"]["stat"]
    store = result["store"] + (f", +{result['latency_ms']:g} ms per request" if result["latency_ms"] else "")
    req = ""
    if s["requests"]["before"]:
        per_file = {v: sum(n for k, n in s["requests"][v].items() if k in ("GET", "HEAD")) / result["files"]
                    for v in VARIANTS}
        req = f" | {per_file['before']:.2f} -> {per_file['after']:.2f}"
    return (f"| {result['files']:,} | {store} | {b['plan_s']:.2f} | {a['plan_s']:.2f} | {s['ratio']:.2f} "
            f"| {b['rss_peak_mb']:.0f} (+{b['rss_growth_mb']:.0f}) | {a['rss_peak_mb']:.0f} (+{a['rss_growth_mb']:.0f}) "
            f"| {a['list_s']:.2f} | {st['stat_s']:.2f} | {st['stat_files_s']:.2f}{req or ' | -'} |")


TABLE_HEADER = ("| files | store | before s | after s | after / before | driver peak RSS MB before (growth) "
                "| after (growth) | of which listing s (after) | + per-file stat s (job_identity today) "
                "| that stat with stat_files | GET+HEAD per file before -> after |\n"
                "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.planning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=10000, help="small Parquet files to plan (default 10000)")
    p.add_argument("--store", choices=("local", "s3"), default="local")
    p.add_argument("--repeats", type=int, default=3, help="passes of each variant (default 3)")
    p.add_argument("--rows-per-unit", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="footer threads after (default: STORE_THREADS)")
    p.add_argument("--s3-latency-ms", type=float, default=0.0, help="the S3 server's delay per request (default 0)")
    p.add_argument("--dir", default=None, help="where the local files go (default: $TMPDIR)")
    p.add_argument("--json", default=None, help="also write the raw numbers here")
    p.add_argument("--measure", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement (a child process)
    p.add_argument("--uri", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_once(args.uri, args.measure, args.rows_per_unit, args.threads)))
        return 0
    from pipeline.cpu import cpu_class, model_name

    with (local_store(args.dir) if args.store == "local" else moto_store()) as store:
        result = run(store, args.files, args.repeats, args.rows_per_unit, args.threads, args.s3_latency_ms)
    try:
        import moto
        moto_version = moto.__version__
    except ImportError:
        moto_version = "not installed"
    s = summary(result)
    print(f"CPU: {model_name()} (class {cpu_class()}), {os.cpu_count()} CPUs; pyarrow {pa.__version__}, "
          f"moto {moto_version}; {result['files']:,} files, {result['rows']:,} rows, {s['units']:,} units; "
          f"after: {s['threads']} threads; medians of {args.repeats} passes.")
    print(TABLE_HEADER)
    print(table_row(result))
    if s["requests"]["before"]:
        print(f"requests (one pass), planning: before {s['requests']['before']}; after {s['requests']['after']}; "
              f"per-file stat: {s['stat_requests']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "summary": s}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
