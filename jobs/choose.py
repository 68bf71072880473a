"""The driver's third step: the variant ``--precision auto`` serves, for the CPUs of the cluster's nodes.

One choice per job (``pipeline.precision.choose``, from the model card's measurements), or, on a resume, a check
that every node computes the interrupted run's variant as it was computed. A forced ``--precision`` was resolved
at plan time and passes through. ``--shapes static`` (forced) is checked against the nodes' memory here, where
they are known: auto keeps a margin of its own (pipeline/shapes.py), a forced choice is refused only where an
actor's compiled shapes would not fit the memory of its CPUs at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from jobs.plan import JobPlan, settle
from jobs.pool import actor_threads
from pipeline.auto import (  # noqa: F401
    DEFAULT_CARD,
    auto_choice,
    auto_table,
    fallback_variant,
    model_record,
    static_memory_check,
)
from pipeline.precision import AUTO, NodeCpu, runnable


class PrecisionChoiceError(ValueError):
    """A resume whose recorded variant the cluster cannot compute as it was computed, or forced static shapes
    whose compiled models would not fit an actor's memory."""


def choose_variant(job: JobPlan, nodes: Sequence[NodeCpu], cpus: int | None = None,
                   largest_node_cpus: int | None = None) -> JobPlan:
    """``job`` with its model resolved for ``nodes`` (``cpus``: the CPUs its actors will have, where known;
    ``largest_node_cpus``: the most one node has): auto's choice, or a resumed choice checked; forced static shapes
    checked against the memory of the CPUs an actor will hold, as the pool lays actors out (jobs.pool)."""
    job = _choose(job, nodes, cpus)
    cfg = job.config
    if cfg.shapes == "static" and job.served is not None:
        threads = actor_threads(cpus or 1, largest_node_cpus, cfg.concurrency, cfg.cpus_per_actor,
                                job.served.graph_bytes)
        if error := static_memory_check(job.model_dir, job.served.variant, nodes, threads):
            raise PrecisionChoiceError(error)
    return job


def _choose(job: JobPlan, nodes: Sequence[NodeCpu], cpus: int | None) -> JobPlan:
    cfg = job.config
    if job.served is not None and job.refresh is not None and job.served.choice.requested == AUTO \
            and not runnable(job.served.variant, nodes):
        job = replace(job, served=None)  # the committed run's variant, kept by refresh, is not computed here alike
    if job.served is None:
        rows = job.rows_in * (job.questions.num_rows if job.questions is not None else 1)  # questions to answer
        return settle(job, auto_choice(job.model_dir, cfg.backend, nodes, cfg.shapes, rows / cpus if cpus else None))
    if job.served.choice.requested == AUTO and job.pending and not runnable(job.served.variant, nodes):
        lacking = sorted({n.cpu_class for n in nodes if not n.bf16})
        raise PrecisionChoiceError(
            f"output {cfg.output}: the interrupted run of this job answered with {job.served.variant}, and "
            f"nodes of this cluster (CPU class {', '.join(lacking)}) have no bfloat16 matmuls, so their answers "
            "would differ; resume on nodes with bfloat16 matmuls (AMX, AVX512-BF16), or start again with "
            "--mode overwrite")
    return job
