"""The answering actors' pool: how many actors, with how many CPUs each, and Ray Data's settings for it.

The pool is an autoscaling one (Ray Data's ``ActorPoolStrategy(min_size, max_size, initial_size)``): it starts with
an actor per free CPU, grows onto nodes that join mid-run and shrinks when units run out. Its maximum is
``--max-actors``, else the cluster's autoscaling bound (the sum over worker groups of maxReplicas x CPUs, from the
cluster config Ray's autoscaler keeps in the GCS, which Ray Data reads for the same purpose) in actors, else (a
cluster with no autoscaler) the pass's pieces: more actors than pieces would have nothing to do, and Ray Data adds
an actor only when a CPU is free. ``--concurrency N`` keeps a fixed pool of N.

Ray Data adds actors only while the pool's utilization (tasks in flight per actor slot) reaches its upscaling
threshold, which by default lies above what one task in flight per actor can reach: the threshold is set to one
task per actor here (``UPSCALING_THRESHOLD``), or the pool would never grow. Nor does the pool shrink on
utilization (``DOWNSCALING_THRESHOLD``): Ray Data's default drops an actor whenever half the pool is idle, which
a pool of two is for a moment each time an actor starts (before its first task), and the actor it then starts
again loads the model again; the pool shrinks once the pass has no units left (Ray Data's "consumed all inputs").
"""

from __future__ import annotations

from dataclasses import dataclass

LARGE_MODEL_BYTES = 256 * 2**20
UPSCALING_THRESHOLD = 1.0  # Ray Data's default is out of reach with one task in flight per actor
DOWNSCALING_THRESHOLD = -1.0  # never on utilization (module docstring)


@dataclass(frozen=True)
class Capacity:
    """The cluster's CPUs as the driver sees them: what is alive now, and what an autoscaler may add."""

    cpus: int  # CPUs of the alive nodes now (the head's 0 included)
    largest_node_cpus: int
    nodes: int  # alive nodes, the head included
    bound_cpus: int | None = None  # the autoscaler's bound on the cluster's CPUs; None: no autoscaler (or none told)


@dataclass(frozen=True)
class ActorLayout:
    """The answering pool: between ``min_actors`` and ``actors`` (its maximum), starting at ``initial_actors``."""

    actors: int  # the most actors at once
    cpus_per_actor: int
    cluster_cpus: int  # when the job started answering
    min_actors: int = 1
    initial_actors: int = 1
    max_from: str = "--concurrency"  # what set the maximum: --concurrency, --max-actors, autoscaling bound, pieces


def actor_layout(cluster_cpus: int, concurrency: int | None, cpus_per_actor: int | None,
                 model_bytes: int) -> tuple[int, int]:
    """(actors, CPUs per actor) for what the user left unset.

    One single-threaded actor per CPU by default: ONNX Runtime's threads meet at every op, and an op
    waits for the slowest, so two threads on two cores lose to two actors whenever anything else runs
    (docs/log/: actors and threads has the measurement).
    Graphs of 256 MB and more (BERT-large fp32) get 4 CPUs per actor instead: every actor holds its own
    copy, and their big matmuls keep four threads busy.
    """
    if cpus_per_actor is None:
        if concurrency is not None:
            cpus_per_actor = max(1, cluster_cpus // concurrency)
        else:
            cpus_per_actor = min(cluster_cpus, 4) if model_bytes >= LARGE_MODEL_BYTES else 1
    if concurrency is None:
        concurrency = max(1, cluster_cpus // cpus_per_actor)
    return concurrency, cpus_per_actor


def actor_threads(cluster_cpus: int, largest_node_cpus: int | None, concurrency: int | None,
                  cpus_per_actor: int | None, model_bytes: int) -> int:
    """The CPUs (runtime threads) each answering actor gets: ``actor_layout``'s, and where the user set neither
    the actor count nor the CPUs per actor, never more than the largest node has (an actor runs on one node;
    None: node sizes unknown)."""
    threads = actor_layout(cluster_cpus, concurrency, cpus_per_actor, model_bytes)[1]
    if concurrency is None and cpus_per_actor is None and largest_node_cpus is not None:
        threads = max(1, min(threads, largest_node_cpus))
    return threads


def pool_layout(capacity: Capacity, min_actors: int, max_actors: int | None, concurrency: int | None,
                cpus_per_actor: int | None, model_bytes: int, pieces: int) -> ActorLayout:
    """The answering pool for a cluster of ``capacity`` and a first pass of ``pieces`` pieces (module docstring:
    where its maximum comes from). Default CPUs per actor as ``actor_layout``, never more than the largest node
    has (an actor runs on one node)."""
    threads = actor_threads(capacity.cpus, capacity.largest_node_cpus, concurrency, cpus_per_actor, model_bytes)
    if concurrency is not None:
        return ActorLayout(concurrency, threads, capacity.cpus, concurrency, concurrency, "--concurrency")
    if max_actors is not None:
        most, source = max_actors, "--max-actors"
    elif capacity.bound_cpus is not None:
        most, source = max(min_actors, capacity.bound_cpus // threads), "autoscaling bound"
    else:
        most, source = max(min_actors, pieces), "pieces"
    initial = min(max(min_actors, capacity.cpus // threads), most)
    return ActorLayout(most, threads, capacity.cpus, min_actors, initial, source)


def pool_strategy(layout: ActorLayout, pieces: int, tasks_per_actor: int):
    """Ray Data's compute strategy for a pass of ``pieces`` pieces, ``tasks_per_actor`` in flight on each
    actor: fixed, or autoscaling (no bound above the pieces: an actor without a piece idles)."""
    import ray

    low, start, high = (min(n, pieces) for n in (layout.min_actors, layout.initial_actors, layout.actors))
    if low == high:
        return ray.data.ActorPoolStrategy(size=high, max_tasks_in_flight_per_actor=tasks_per_actor)
    return ray.data.ActorPoolStrategy(min_size=low, max_size=high, initial_size=start,
                                      max_tasks_in_flight_per_actor=tasks_per_actor)


def data_context() -> None:
    """Ray Data's settings for the job's passes (module docstring; jobs/execute.py for the errored blocks)."""
    import dataclasses

    import ray

    ctx = ray.data.DataContext.get_current()
    # No preserve_order: output files are named by read unit, so completion order changes nothing.
    ctx.enable_progress_bars = False  # headless nightly logs: no per-batch bars
    ctx.max_errored_blocks = -1  # a piece that crashed its actor 3 times leaves the pass, not the job (above)
    ctx.autoscaling_config = dataclasses.replace(ctx.autoscaling_config,
                                                 actor_pool_util_upscaling_threshold=UPSCALING_THRESHOLD,
                                                 actor_pool_util_downscaling_threshold=DOWNSCALING_THRESHOLD)
