"""What ``--precision auto`` decides from, for one model directory, and its choice for a set of nodes.

The model card's measurements (``auto_precision``: the model's own card, else the default model's), the model's
own agreement record (never the default model's: it is about this model), and the fallback where nothing is
measured; ``auto_choice`` applies the rule (``pipeline.precision.choose``) to them. The driver asks it for the
cluster's nodes (jobs/choose.py), the in-process API for this machine's CPU (pipeline/api.py), the model card for
each measured class (models/card.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .backends import graph_as_is, graph_file, legacy_as_is, servable_variants
from .model_dir import DEFAULT_MODEL, find_model_file, load_spec
from .precision import (
    AUTO,
    BATCH_DEPENDENT,
    VARIANT_NAMES,
    ClassMeasurements,
    ModelRecord,
    NodeCpu,
    PrecisionChoice,
    Variant,
    choose,
    parse_record,
    parse_table,
    renamed,
)
from .shapes import compiled_bytes, static_memory_error, with_shapes

# --precision auto's measurements for a model whose card has none: the default model's (pipeline/precision.py)
DEFAULT_CARD = DEFAULT_MODEL / "card.json"


def auto_table(model_dir: str) -> dict[str, ClassMeasurements]:
    """The auto_precision measurements of the model's own card, else the default model's."""
    d = Path(model_dir)
    for card in (d / "card.json" if d.is_dir() else d.parent / "card.json", DEFAULT_CARD):
        if card.exists():
            data = json.loads(card.read_text())
            table = parse_table(data)
            if table and data.get("variant_names", 1) < VARIANT_NAMES:
                table = renamed(table, Variant("onnxruntime", "fp32"), legacy_as_is(card.parent))
            if table:
                return table
    return {}


def model_record(model_dir: str) -> ModelRecord | None:
    """The model's own agreement record (its card's, never the default model's: it is about this model)."""
    d = Path(model_dir)
    card = d / "card.json" if d.is_dir() else d.parent / "card.json"
    return parse_record(json.loads(card.read_text())) if card.exists() else None


def fallback_variant(model_dir: str, backend: str, servable: frozenset[Variant]) -> Variant:
    """What auto serves without measurements: the graph as it is, unless its answers depend on batch-mates and
    the directory has a float graph too (then that, in the same runtime where it can)."""
    as_is = graph_as_is(model_dir, backend)
    if as_is.precision not in BATCH_DEPENDENT:
        return as_is
    return next((v for v in (Variant(as_is.backend, "fp32"), Variant("openvino", "fp32"),
                             Variant("onnxruntime", "fp32")) if v in servable), as_is)


def auto_choice(model_dir: str, backend: str, nodes: Sequence[NodeCpu], shapes: str = AUTO,
                rows_per_cpu: float | None = None) -> PrecisionChoice:
    """What auto serves ``model_dir`` as on ``nodes`` (with ``backend`` forced or "auto"), its shapes decided
    as ``shapes`` asks for a job of ``rows_per_cpu`` (pipeline/shapes.py)."""
    servable = servable_variants(model_dir, backend)
    spec = load_spec(find_model_file(model_dir))
    choice = choose(auto_table(model_dir), nodes, servable, fallback_variant(model_dir, backend, servable),
                    spec.shape, model_record(model_dir))
    return decide_shapes(model_dir, choice, shapes, nodes, rows_per_cpu)


def decide_shapes(model_dir: str, choice: PrecisionChoice, shapes: str, nodes: Sequence[NodeCpu],
                  rows_per_cpu: float | None = None) -> PrecisionChoice:
    """``choice`` with its variant's shapes decided for ``nodes`` (``shapes``: auto, dynamic or static)."""
    from .served import fixed_seq_len

    v = choice.variant
    graph = graph_file(model_dir, v.backend, v.precision)
    if v.backend != "openvino":  # nothing to read: ONNX Runtime's shapes are dynamic (with_shapes says why)
        return with_shapes(choice, shapes, graph, 0, False, nodes, rows_per_cpu)
    spec = load_spec(graph)
    fixed = fixed_seq_len(graph, spec.input_names) is not None
    return with_shapes(choice, shapes, graph, spec.windows.max_seq_len, fixed, nodes, rows_per_cpu)


def static_shapes_bytes(model_dir: str, variant: Variant) -> int | None:
    """For a variant with static shapes: about what one session's compiled shapes hold at most
    (pipeline.shapes.compiled_bytes); None for any other variant."""
    if variant.backend != "openvino" or variant.shapes != "static":
        return None
    graph = graph_file(model_dir, variant.backend, variant.precision)
    return compiled_bytes(graph, variant.precision, load_spec(graph).windows.max_seq_len)


def static_memory_check(model_dir: str, variant: Variant, nodes: Sequence[NodeCpu], cpus_per_actor: int) -> str | None:
    """For a variant with static shapes: why its compiled shapes would not fit an actor's memory on ``nodes``
    (pipeline.shapes.static_memory_error), else None."""
    need = static_shapes_bytes(model_dir, variant)
    return None if need is None else static_memory_error(need, nodes, cpus_per_actor)
