"""benchmarks.peers judges issue 31's target from a run's numbers, and its kept pages are rendered from its kept
json (no job run here)."""

from __future__ import annotations

import json

import pytest

from benchmarks import peers
from benchmarks.marginal import OV_PEER_NAME, copies

CPU = {"model": "Some CPU", "class": "amx", "flags_of_note": "flags amx_bf16"}


def row(system: str, n: int, seconds_n: list[float], seconds_2n: list[float], f1: float | None) -> dict:
    t_n, t_2n = sorted(seconds_n)[len(seconds_n) // 2], sorted(seconds_2n)[len(seconds_2n) // 2]
    return {"system": system, "n": n, "seconds_n": seconds_n, "seconds_2n": seconds_2n, "f1": f1,
            "questions_per_s": n / (t_2n - t_n)}


def run(ours: list[dict]) -> dict:
    peer = row(OV_PEER_NAME, 1000, [20.0, 21.0, 22.0], [30.0, 31.0, 32.0], 80.0)  # N / 10 s in every repeat
    return {"date": "2026-12-06T12:00:00", "commit": "abc1234", "dirty": "", "command": "python -m benchmarks ...",
            "cpu": CPU, "cores": 2, "seconds": 600.0,
            "models": {"default": {"n": 1000, "text": "(the run's table)", "rows": [*ours, peer]}}}


def test_target_needs_twice_the_peer_and_f1_within_margin():
    fast = row("our job, default", 1000, [10.0, 10.0, 10.0], [14.0, 15.0, 14.5], 79.8)  # 2.5x, 2x, 2.2x the peer
    slow = row("our job, --shapes dynamic", 1000, [10.0, 10.0, 10.0], [15.5, 15.5, 15.5], 80.5)  # 1.8x the peer
    worse = row("our job, --precision int8", 1000, [10.0, 10.0, 10.0], [14.0, 14.0, 14.0], 79.6)  # 2.5x the peer
    peer = run([])["models"]["default"]["rows"][0]
    met, cells = peers.verdict(fast, peer)
    assert met and cells.startswith("2.22 | 2.50, 2.00, 2.22 | 79.80 / 80.00 | **met**")
    met, cells = peers.verdict(slow, peer)
    assert not met and cells.endswith("not met: questions/s below 2x")
    met, cells = peers.verdict(worse, peer)  # 2.5x, but F1 0.4 below the peer's
    assert not met and cells.endswith("not met: F1 more than 0.3 below the peer's")
    page = peers.render(run([fast, slow, worse]))
    assert page.startswith("# Our job against the optimum-intel pipeline: CPU class `amx`")
    assert page.count("**met**") == 1 and page.count("not met") == 2
    assert "optimum-intel pipeline 100.0, 100.0, 100.0" in page


def test_keep_writes_the_json_and_the_page_it_renders(tmp_path):
    import datetime

    report = run([row("our job, default", 1000, [10.0], [14.0], 80.0)])
    page = peers.keep({k: report[k] for k in ("models", "seconds")}, ["--mode", "marginal"], tmp_path,
                      datetime.datetime(2026, 12, 6, 12, 0))
    kept = json.loads(next(tmp_path.glob("peers-*.json")).read_text())
    assert kept["command"] == "python -m benchmarks --mode marginal" and kept["date"] == "2026-12-06T12:00:00"
    assert page.read_text() == peers.render(kept) and "2.50 | 2.50 |" in page.read_text()


def test_copies_suffix_ids_and_keep_order():
    items = [{"id": "a", "question": "q1"}, {"id": "b", "question": "q2"}]
    assert copies(items, 1) is items
    assert [q["id"] for q in copies(items, 3)] == ["a-0", "b-0", "a-1", "b-1", "a-2", "b-2"]


@pytest.mark.parametrize("kept", sorted(peers.RESULTS.glob("peers-*.json")), ids=lambda p: p.stem)
def test_kept_pages_are_rendered_from_their_json(kept):
    assert kept.with_suffix(".md").read_text() == peers.render(json.loads(kept.read_text()))
