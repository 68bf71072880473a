"""Where tables live: local paths, globs and object-store URIs, through pyarrow filesystems."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pyarrow.fs as pafs

_GLOB_CHARS = "*?["


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it; plain paths are local."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    local = pafs.LocalFileSystem()
    return local, local.normalize_path(str(Path(uri).expanduser().resolve()))


def expand_input(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files a file, directory or glob names, sorted; a clear error if none."""
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
        return fs, [base]
    files = [f for f in fs.get_file_info(pafs.FileSelector(base, recursive=True))
             if f.type == pafs.FileType.File and not _hidden(f.path[len(base):])]
    if has_glob:
        pattern = filesystem_and_path(uri)[1] if "://" not in uri else uri.split("://", 1)[1]
        files = [f for f in files if fnmatch.fnmatch(f.path, pattern)]
    else:
        files = [f for f in files if f.path.endswith((".parquet", ".parq", ".pq"))]
    if not files:
        raise FileNotFoundError(f"input {uri}: no Parquet files found")
    return fs, sorted(f.path for f in files)


def _hidden(relative: str) -> bool:
    """Spark/Hive conventions: _SUCCESS, _manifest.json, .crc and staging folders are not data."""
    return any(part.startswith(("_", ".")) for part in relative.strip("/").split("/") if part)


def write_json(fs: pafs.FileSystem, path: str, value) -> None:
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(value, indent=2, sort_keys=True, default=str).encode("utf-8"))


def read_json(fs: pafs.FileSystem, path: str):
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))
