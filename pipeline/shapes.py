"""``--shapes``: whether OpenVINO compiles the graph once for every batch shape (dynamic) or once per batch shape
it meets (static), for a whole job.

A model compiled for one shape computes a call faster on AMX than the dynamic one (its element-wise ops fuse into
the kernels around them; docs/log/, "static shapes in whole jobs"), and a row the same whatever its batch-mates,
as the dynamic one does; but the two compute slightly different numbers, so a job serves one or the other for
every batch, and the choice is part of the variant (``Variant.shapes``): recorded in the job's identity, kept on
resume and refresh. Static batches have canonical shapes only (``pipeline.answer.cut_batches``: one row count per
length, lengths in steps of ``STATIC_SEQ_MULTIPLE``), so an actor holds at most one compiled model per length
step; each keeps its own packed copy of the weights (``bytes_per_shape``), and each is compiled on the first
batch of its shape.

``auto`` (the default) serves static shapes only on CPU classes whose whole jobs were measured faster with them
(``STATIC_CLASSES``), for bf16 (the variant measured), for a
job with at least ``STATIC_MIN_ROWS_PER_CPU`` rows to answer per CPU (a small job spends more compiling its shapes
than they save), and when an actor's compiled shapes take at most ``MEMORY_SHARE`` of the smallest node's physical
memory per CPU; otherwise dynamic, with the reason in the manifest. ``static`` and ``dynamic`` force it (static:
any OpenVINO variant of a graph of dynamic shape; ONNX Runtime has dynamic shapes only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from .precision import AUTO, NodeCpu, PrecisionChoice

SHAPES = ("dynamic", "static")
SHAPES_CHOICES = (AUTO, *SHAPES)
# Batch lengths step by at least this with static shapes (pipeline.openvino_session): one compiled model a step.
STATIC_SEQ_MULTIPLE = 16
# CPU classes whose whole jobs of many rows were measured faster with static shapes (docs/log/, "static shapes in
# whole jobs"); small jobs were not, hence STATIC_MIN_ROWS_PER_CPU.
STATIC_CLASSES: tuple[str, ...] = ("amx",)
STATIC_PRECISIONS = ("bf16",)  # the precisions auto serves with static shapes (measured; others: --shapes static)
MEMORY_SHARE = 0.25  # of a node's memory per CPU that one actor's compiled shapes may take, for auto
STATIC_MIN_ROWS_PER_CPU = 10_000  # rows to answer per CPU from which auto compiles shapes


def shape_count(max_seq_len: int) -> int:
    """Compiled models an actor may hold: one per length step (the row count follows from the length)."""
    return math.ceil(max_seq_len / STATIC_SEQ_MULTIPLE)


def bytes_per_shape(graph_bytes: int, precision: str) -> int:
    """An estimate of what one compiled shape holds: the packed weights, from the graph's size on disk (an f32
    graph's weights packed as bfloat16 take half its bytes; f32 all; an int8 IR's are unpacked to more)."""
    return {"bf16": graph_bytes // 2, "fp32": graph_bytes}.get(precision, 4 * graph_bytes)


def with_shapes(choice: PrecisionChoice, requested: str, graph: Path, max_seq_len: int, fixed: bool,
                nodes: Sequence[NodeCpu], rows_per_cpu: float | None = None) -> PrecisionChoice:
    """``choice`` with its variant's shapes decided (``requested``: auto, dynamic or static; ``rows_per_cpu``: the
    job's rows to answer over the cluster's CPUs, None where unknown), the reason added."""
    if requested not in SHAPES_CHOICES:
        raise ValueError(f"shapes must be one of {SHAPES_CHOICES}, got {requested!r}")
    v = choice.variant
    if v.backend != "openvino" and requested != "static":  # nothing to say: ONNX Runtime's shapes are dynamic
        return replace(choice, variant=replace(v, shapes="dynamic"))
    shapes, why = _decide(requested, v.backend, v.precision, graph, max_seq_len, fixed, nodes, rows_per_cpu)
    return replace(choice, variant=replace(v, shapes=shapes), reason=f"{choice.reason}; {shapes} shapes: {why}")


def _decide(requested: str, backend: str, precision: str, graph: Path, max_seq_len: int, fixed: bool,
            nodes: Sequence[NodeCpu], rows_per_cpu: float | None) -> tuple[str, str]:
    if backend != "openvino":
        return "dynamic", "ONNX Runtime has dynamic shapes only"
    if fixed:
        return "dynamic", "the graph fixes its own shape"
    if requested != AUTO:
        return requested, "--shapes on the command line"
    classes = sorted({n.cpu_class for n in nodes})
    if precision not in STATIC_PRECISIONS:
        return "dynamic", f"auto serves static shapes at {', '.join(STATIC_PRECISIONS)} only (--shapes static)"
    if not classes or any(c not in STATIC_CLASSES for c in classes):
        slower = ", ".join(c for c in classes if c not in STATIC_CLASSES)
        return "dynamic", (f"not measured faster in whole jobs on CPU class {slower}" if classes else "no node")
    if rows_per_cpu is None or rows_per_cpu < STATIC_MIN_ROWS_PER_CPU:
        rows = "rows per CPU unknown" if rows_per_cpu is None else f"{rows_per_cpu:,.0f} rows per CPU"
        return "dynamic", (f"{rows}, fewer than the {STATIC_MIN_ROWS_PER_CPU:,} that pay for compiling a model "
                           "per shape")
    need = compiled_bytes(graph, precision, max_seq_len)
    per_cpu = smallest_memory_per_cpu(nodes)
    if per_cpu is None:
        return "dynamic", "the nodes' memory is unknown"
    if need > MEMORY_SHARE * per_cpu:
        return "dynamic", (f"an actor's compiled shapes (about {need / 2**30:.1f} GiB) would take more than "
                           f"{MEMORY_SHARE:.0%} of a node's {per_cpu / 2**30:.1f} GiB per CPU")
    return "static", (f"CPU class {', '.join(classes)}; an actor's compiled shapes (about {need / 2**30:.1f} GiB) "
                      f"within {MEMORY_SHARE:.0%} of the smallest node's {per_cpu / 2**30:.1f} GiB per CPU")


def compiled_bytes(graph: Path, precision: str, max_seq_len: int) -> int:
    """An estimate of what an actor's compiled shapes hold at most: one packed copy of the weights per shape."""
    return shape_count(max_seq_len) * bytes_per_shape(graph.stat().st_size + _bin_bytes(graph), precision)


def static_memory_error(need: int, nodes: Sequence[NodeCpu], cpus_per_actor: int) -> str | None:
    """Why forced static shapes cannot run on ``nodes``: an actor's compiled shapes (``need`` bytes) would take more
    than the memory of the CPUs it holds on the smallest node (a node's physical memory over its CPUs, times
    ``cpus_per_actor``), so actors would be killed for memory mid-job; None where they fit or memory is unknown."""
    per_cpu, cpus = smallest_memory_per_cpu(nodes), max(1, cpus_per_actor)
    if per_cpu is None or need <= per_cpu * cpus:
        return None
    return (f"--shapes static: an actor's compiled shapes (about {need / 2**30:.1f} GiB, a copy of the weights "
            f"per batch shape) would not fit its {per_cpu * cpus / 2**30:.1f} GiB ({cpus} CPU(s) of the "
            f"smallest node's {per_cpu / 2**30:.1f} GiB per CPU); use --shapes auto or dynamic, or more "
            "CPUs per actor (--cpus-per-actor)")


def smallest_memory_per_cpu(nodes: Sequence[NodeCpu]) -> int | None:
    """The smallest physical memory per CPU among the nodes that report it; None where none does."""
    return min((n.memory_per_cpu for n in nodes if n.memory_per_cpu), default=None)


def _bin_bytes(graph: Path) -> int:
    weights = graph.with_suffix(".bin")
    return weights.stat().st_size if graph.suffix == ".xml" and weights.exists() else 0
