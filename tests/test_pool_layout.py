"""The answering pool's bounds (jobs/execute.py: pool_layout), the flags that set them, and the per-node
bookkeeping, without a cluster."""

from __future__ import annotations

import pytest

from jobs.config import JobConfig
from jobs.pool import LARGE_MODEL_BYTES, Capacity, actor_threads, pool_layout
from jobs.ray_stage import ActorReport, StageBook
from pipeline.answer import StageTimes

SMALL = 23 * 2**20


def layout(capacity: Capacity, min_actors=1, max_actors=None, concurrency=None, cpus_per_actor=None,
           model_bytes=SMALL, pieces=100):
    return pool_layout(capacity, min_actors, max_actors, concurrency, cpus_per_actor, model_bytes, pieces)


def test_maximum_from_flags_autoscaler_or_pieces():
    two_workers = Capacity(cpus=2, largest_node_cpus=1, nodes=3)
    l = layout(two_workers)  # no autoscaler: the pool may grow to one actor per piece as nodes join
    assert (l.min_actors, l.initial_actors, l.actors, l.max_from) == (1, 2, 100, "pieces")
    l = layout(Capacity(2, 1, 3, bound_cpus=128))  # KubeRay: maxReplicas x CPUs
    assert (l.initial_actors, l.actors, l.max_from) == (2, 128, "autoscaling bound")
    l = layout(Capacity(2, 1, 3, bound_cpus=128), max_actors=8)
    assert (l.initial_actors, l.actors, l.max_from) == (2, 8, "--max-actors")
    l = layout(two_workers, max_actors=1)  # never more at the start than the maximum
    assert (l.initial_actors, l.actors) == (1, 1)
    l = layout(two_workers, concurrency=3)  # a fixed pool, as before
    assert (l.min_actors, l.initial_actors, l.actors, l.max_from) == (3, 3, 3, "--concurrency")


def test_head_only_cluster_starts_at_the_minimum():
    """A 0-CPU head and no worker yet (the job waited for one; an autoscaler may still be adding pods)."""
    l = layout(Capacity(cpus=0, largest_node_cpus=0, nodes=1, bound_cpus=64), min_actors=2)
    assert (l.min_actors, l.initial_actors, l.actors, l.cpus_per_actor) == (2, 2, 64, 1)


def test_large_graphs_fit_one_node():
    """4 CPUs per actor for big graphs, but never more than a node has: an actor runs on one node."""
    assert layout(Capacity(16, 16, 2), model_bytes=LARGE_MODEL_BYTES).cpus_per_actor == 4
    l = layout(Capacity(8, 2, 5), model_bytes=LARGE_MODEL_BYTES)
    assert (l.cpus_per_actor, l.initial_actors) == (2, 4)
    assert layout(Capacity(8, 2, 5), cpus_per_actor=4).cpus_per_actor == 4  # as given
    # The same rule where the driver checks forced static shapes against an actor's memory (jobs/choose.py).
    assert actor_threads(8, 2, None, None, LARGE_MODEL_BYTES) == 2
    assert actor_threads(8, None, None, None, LARGE_MODEL_BYTES) == 4  # node sizes unknown
    assert actor_threads(8, 2, None, 4, LARGE_MODEL_BYTES) == 4


def test_flags_are_validated_once():
    for bad, match in [({"min_actors": 0}, "min-actors"), ({"min_actors": 3, "max_actors": 2}, "min-actors"),
                       ({"concurrency": 2, "max_actors": 4}, "excludes"), ({"wait_for_workers_s": -1}, "wait")]:
        with pytest.raises(ValueError, match=match):
            JobConfig(input="in", output="out", **bad)
    assert JobConfig(input="in", output="out").wait_for_workers_s == 600


def test_nodes_from_the_actors_reports():
    """Per node: its CPU class, actors started, rows answered; a dead node's actors count as lost."""
    stats = StageBook(alive=lambda: frozenset({"n1", "n2"}))  # StageStats's body, without Ray
    stats.ready("a1", 10.0, "n1", "avx2", "id1")
    stats.ready("a2", 11.0, "n2", "amx", "id2")
    stats.ready("a3", 12.0, "n2", "amx", "id2")  # id2's process restarted on the same node
    stats.ready("a4", 13.0, "n1", "avx2", "id4")
    stats.restarted("id4")  # it crashed on n1 (alive): charged, and lost there
    stats.report(ActorReport("a1", StageTimes(), 30, "n1"))
    stats.report(ActorReport("a2", StageTimes(), 20, "n2"))
    stats.report(ActorReport("a2", StageTimes(), 25, "n2"))  # reports replace each other
    nodes = {n.node: n for n in stats.nodes({"n1"}, started_at=9.0)}
    assert (nodes["n1"].cpu_class, nodes["n1"].actors_started, nodes["n1"].rows_answered) == ("avx2", 2, 30)
    assert (nodes["n1"].alive, nodes["n1"].actors_lost, nodes["n1"].first_ready_s) == (True, 1, 1.0)
    assert stats.restart_count() == 1
    assert (nodes["n2"].cpu_class, nodes["n2"].actors_started, nodes["n2"].rows_answered) == ("amx", 2, 25)
    assert (nodes["n2"].alive, nodes["n2"].actors_lost) == (False, 2)
