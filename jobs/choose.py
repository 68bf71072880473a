"""The driver's third step: the variant ``--precision auto`` serves, for the CPUs of the cluster's nodes.

One choice per job (``pipeline.precision.choose``, from the model card's measurements), or, on a resume, a check
that every node computes the interrupted run's variant as it was computed. A forced ``--precision`` was resolved
at plan time and passes through.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from jobs.config import REPO
from jobs.plan import JobPlan, settle
from pipeline.backends import graph_as_is, legacy_as_is, servable_variants
from pipeline.model_dir import find_model_file, load_spec
from pipeline.precision import (
    AUTO,
    BATCH_DEPENDENT,
    VARIANT_NAMES,
    ClassMeasurements,
    ModelRecord,
    NodeCpu,
    Variant,
    choose,
    parse_record,
    parse_table,
    renamed,
    runnable,
)

# --precision auto's measurements for a model whose card has none: the default model's (pipeline/precision.py)
DEFAULT_CARD = REPO / "models" / "minilm-squad" / "card.json"


class PrecisionChoiceError(ValueError):
    """A resume whose recorded variant the cluster cannot compute as it was computed."""


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


def choose_variant(job: JobPlan, nodes: Sequence[NodeCpu]) -> JobPlan:
    """``job`` with its model resolved for ``nodes``: auto's choice, or a resumed choice checked."""
    cfg = job.config
    if job.served is not None and job.refresh is not None and job.served.choice.requested == AUTO \
            and not runnable(job.served.variant, nodes):
        job = replace(job, served=None)  # the committed run's variant, kept by refresh, is not computed here alike
    if job.served is None:
        shape = load_spec(find_model_file(job.model_dir)).shape  # the same for every variant of a directory
        servable = servable_variants(job.model_dir, cfg.backend)
        choice = choose(auto_table(job.model_dir), nodes, servable,
                        fallback_variant(job.model_dir, cfg.backend, servable), shape, model_record(job.model_dir))
        return settle(job, choice)
    if job.served.choice.requested == AUTO and job.pending and not runnable(job.served.variant, nodes):
        lacking = sorted({n.cpu_class for n in nodes if not n.bf16})
        raise PrecisionChoiceError(
            f"output {cfg.output}: the interrupted run of this job answered with {job.served.variant}, and "
            f"nodes of this cluster (CPU class {', '.join(lacking)}) have no bfloat16 matmuls, so their answers "
            "would differ; resume on nodes with bfloat16 matmuls (AMX, AVX512-BF16), or start again with "
            "--mode overwrite")
    return job
