"""Where tables live: local paths, globs and object-store URIs, through pyarrow filesystems."""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Self

import pyarrow.fs as pafs

_GLOB_CHARS = "*?["

# Requests to a store in flight at once, for work that asks it once per file (footers, stats). Each request to
# S3 waits a network round trip: one at a time leaves the driver waiting. pyarrow's S3 client keeps fewer
# requests than this in flight (raising pyarrow's io_thread_count before the filesystem is made raises that), so
# more threads only queue there (docs/log/, "Scale: planning"). On a local disk footers are parsed in C++
# without the GIL: a few threads per core keep it busy.
STORE_THREADS = 32


class TableError(ValueError):
    """A lake table (iceberg://) cannot be used as asked; the message names the table, column or setting."""


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it; plain paths are local.

    For s3:// the endpoint comes from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (S3-compatible stores),
    credentials and region from the standard AWS variables, profile or instance role. The endpoint is
    set on the filesystem object itself so that actors on other nodes, which receive it pickled,
    reach the same store.
    """
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs = {"endpoint_override": endpoint}
            if os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
                kwargs["region"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            return pafs.S3FileSystem(**kwargs), uri[len("s3://"):].rstrip("/")
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    local = pafs.LocalFileSystem()
    return local, local.normalize_path(str(Path(uri).expanduser().resolve()))


class ListedFile(str):
    """A path as a listing returned it, with the size in bytes the listing gave (None if it gave none).

    A ``str`` everywhere (sorting, equality, JSON, pyarrow calls); ``plan_units`` passes the size to the Parquet
    reader, which then finds the footer without asking the store for it again: on S3 that saves a HEAD request
    per file, half of the requests planning makes.
    """

    size: int | None

    def __new__(cls, path: str, size: int | None = None) -> Self:
        self = super().__new__(cls, path)
        self.size = size
        return self

    def __reduce__(self):  # str's own reduction would drop the size (and call __new__ with the path alone)
        return ListedFile, (str(self), self.size)


def expand_input(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files a file, directory or glob names, sorted (``ListedFile``: each knows its size);
    a clear error if none. Hive-style partition folders (``lang=en/``) are searched too; see ``hive_partitions``.

    One recursive listing below the fixed prefix (S3: one LIST request per 1,000 keys), never one request per file.
    """
    has_glob = any(c in uri for c in _GLOB_CHARS)
    base_uri = uri
    if has_glob:
        cut = min(uri.index(c) for c in _GLOB_CHARS if c in uri)
        base_uri = uri[:cut].rsplit("/", 1)[0] or "/"
    fs, base = filesystem_and_path(base_uri)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri}: {base} does not exist")
    if info.type == pafs.FileType.File and not has_glob:
        return fs, [ListedFile(base, info.size)]
    files = [f for f in fs.get_file_info(pafs.FileSelector(base, recursive=True))
             if f.type == pafs.FileType.File and not _hidden(f.path[len(base):])]
    if has_glob:
        pattern = filesystem_and_path(uri)[1] if "://" not in uri else uri.split("://", 1)[1].rstrip("/")
        files = [f for f in files if fnmatch.fnmatch(f.path, pattern)]
    else:
        files = [f for f in files if f.path.endswith((".parquet", ".parq", ".pq"))]
    if not files:
        raise FileNotFoundError(f"input {uri}: no Parquet files found")
    return fs, sorted(ListedFile(f.path, f.size) for f in files)


def stat_files(fs: pafs.FileSystem, paths: Sequence[str], threads: int = STORE_THREADS) -> list[pafs.FileInfo]:
    """``fs.get_file_info(paths)``: the same answers in the same order, asked ``threads`` at a time. pyarrow asks
    an object store about a list of paths one path after another (S3: a HEAD each, serially). A local stat is a
    system call, no wait: there, threads only add their overhead (docs/log/, "Scale: planning")."""
    paths = [str(p) for p in paths]
    if threads <= 1 or len(paths) <= threads or isinstance(fs, pafs.LocalFileSystem):
        return fs.get_file_info(paths)
    step = -(-len(paths) // (4 * threads))  # 4 slices per thread: a slow slice does not hold up the end
    with ThreadPoolExecutor(threads, thread_name_prefix="stat") as pool:
        slices = pool.map(fs.get_file_info, [paths[i:i + step] for i in range(0, len(paths), step)])
        return [info for infos in slices for info in infos]


def _hidden(relative: str) -> bool:
    """Spark/Hive conventions: _SUCCESS, _manifest.json, .crc and staging folders are not data."""
    return any(part.startswith(("_", ".")) for part in relative.strip("/").split("/") if part)


def write_json(fs: pafs.FileSystem, path: str, value) -> None:
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(value, indent=2, sort_keys=True, default=str).encode("utf-8"))


def read_json(fs: pafs.FileSystem, path: str):
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def input_base(uri: str) -> str:
    """The folder that partition keys are read below: the input directory, or a glob's fixed prefix."""
    if any(c in uri for c in _GLOB_CHARS):
        uri = uri[:min(uri.index(c) for c in _GLOB_CHARS if c in uri)].rsplit("/", 1)[0]
    fs, path = filesystem_and_path(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        return path.rsplit("/", 1)[0]
    return path.rstrip("/")


def hive_partitions(base: str, path: str) -> dict[str, str]:
    """key=value folders between ``base`` and the file: the partition columns of a Hive-style dataset."""
    relative = path[len(base):].strip("/") if path.startswith(base) else ""
    parts = relative.split("/")[:-1]
    return dict(p.split("=", 1) for p in parts if "=" in p)
