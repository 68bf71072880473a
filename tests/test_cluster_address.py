"""A stale or unreachable cluster address: a local Ray (stale cluster file only) or a one-line error, never a hang.

Ray's cluster file is found through Ray's own lookup, which honours RAY_TMPDIR: each test points it at a temporary
directory, so the real /tmp/ray/ray_current_cluster is never read or written. A closed port is one bound on all
interfaces and closed again; nothing here sleeps or races.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO

from jobs.cluster import ClusterAddressError, bootstrap_address, cluster_file

QUICK_S = 10


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture
def listener():
    """An address where something accepts TCP connections (the backlog answers; nothing needs to accept)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def ray_tmp(tmp_path, monkeypatch) -> Path:
    """Ray's temp dir moved under tmp_path, RAY_ADDRESS unset; returns where Ray looks for its cluster file."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = Path(cluster_file())
    assert path == tmp_path / "ray" / "ray_current_cluster"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def timed(fn, *args):
    start = time.monotonic()
    try:
        return fn(*args)
    finally:
        assert time.monotonic() - start < QUICK_S


def raised(address: str | None) -> str:
    start = time.monotonic()
    with pytest.raises(ClusterAddressError) as info:
        bootstrap_address(address)
    assert time.monotonic() - start < QUICK_S
    message = str(info.value)
    assert "\n" not in message
    return message


def test_stale_cluster_file_starts_a_local_ray(ray_tmp):
    dead = f"127.0.0.1:{closed_port()}"
    ray_tmp.write_text(dead + "\n")
    address, note = timed(bootstrap_address, None)
    assert address == "local"
    assert str(ray_tmp) in note and dead in note and "local Ray" in note and "\n" not in note


def test_live_cluster_file_is_joined(ray_tmp, listener):
    ray_tmp.write_text(listener)
    assert bootstrap_address(None) == (listener, None)


def test_no_address_anywhere_is_a_local_ray(ray_tmp):
    assert bootstrap_address(None) == ("local", None)


def test_local_never_reads_the_cluster_file(ray_tmp):
    ray_tmp.write_text(f"127.0.0.1:{closed_port()}")
    assert bootstrap_address("local") == ("local", None)


def test_dead_ray_address_is_a_one_line_error(ray_tmp, monkeypatch):
    dead = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", dead)
    message = raised(None)
    assert dead in message and "RAY_ADDRESS" in message and "unset" in message and "ray start" in message


def test_dead_flag_address_is_a_one_line_error(ray_tmp):
    dead = f"127.0.0.1:{closed_port()}"
    message = raised(dead)
    assert dead in message and "--address" in message and "RAY_ADDRESS" not in message


def test_flag_wins_over_ray_address_except_auto(ray_tmp, monkeypatch, listener):
    dead = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", dead)
    assert bootstrap_address(listener) == (listener, None)
    assert "RAY_ADDRESS" in raised("auto")  # as ray.init: RAY_ADDRESS replaces None and "auto"
    monkeypatch.setenv("RAY_ADDRESS", listener)
    assert bootstrap_address("auto") == (listener, None)


def test_auto_with_a_stale_cluster_file_is_an_error(ray_tmp):
    dead = f"127.0.0.1:{closed_port()}"
    ray_tmp.write_text(dead)
    message = raised("auto")
    assert dead in message and str(ray_tmp) in message


def test_ray_client_address_is_probed(ray_tmp, listener):
    dead = f"ray://127.0.0.1:{closed_port()}"
    assert dead in raised(dead)
    assert bootstrap_address(f"ray://{listener}") == (f"ray://{listener}", None)


def test_dashboard_url_in_ray_address_is_an_error(ray_tmp, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    message = raised(None)
    assert "http://127.0.0.1:8265" in message and "RAY_ADDRESS" in message and "dashboard" in message


def test_malformed_address_is_an_error(ray_tmp):
    assert "HOST:PORT" in raised("headnode")


def answer(tmp_path: Path, tiny_model: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jobs.answer", "--input", "tests/data/sample.parquet",
           "--output", str(tmp_path / "answers"), "--model", str(tiny_model)]
    return subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _reported_as_user_error() -> bool:
    from jobs.answer import USER_ERRORS

    return issubclass(ClusterAddressError, USER_ERRORS)


# Needs ClusterAddressError in jobs/answer.py's USER_ERRORS (printed as one "error:" line); until it is there the
# error ends in a traceback and this test is an expected failure. Once it is there the mark is off by itself.
@pytest.mark.xfail(not _reported_as_user_error(), strict=True,
                   reason="ClusterAddressError not yet in jobs.answer.USER_ERRORS: the job exits 1 with a traceback")
def test_job_with_dead_ray_address_fails_fast_with_one_line(tmp_path, tiny_model):
    dead = f"127.0.0.1:{closed_port()}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ADDRESS=dead, RAY_TMPDIR=str(tmp_path))
    done = answer(tmp_path, tiny_model, env, timeout=60)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and dead in errors[0] and "RAY_ADDRESS" in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "answers").exists() or not any((tmp_path / "answers").glob("*.parquet"))


def test_job_with_stale_cluster_file_runs_on_a_local_ray(tiny_model, tmp_path):
    # A short temp dir: the local Ray's session (and its socket paths) lives under it.
    ray_tmp = Path(tempfile.mkdtemp(prefix="qa-ray-", dir="/tmp"))
    try:
        (ray_tmp / "ray").mkdir()
        dead = f"127.0.0.1:{closed_port()}"
        (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=str(ray_tmp))
        done = answer(tmp_path, tiny_model, env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        notes = [line for line in done.stdout.splitlines() if line.startswith("note: ")]
        assert len(notes) == 1 and dead in notes[0] and "local Ray" in notes[0], done.stdout
        assert "done: 12 rows in, 12 rows out" in done.stdout
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
