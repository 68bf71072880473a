"""``--precision auto``: one variant (backend, precision) for a whole job, from measurements kept as data.

A model directory can be served several ways: ONNX Runtime with its dynamic int8 ``model.onnx`` or its float
graph, OpenVINO with the float graph at f32 or with bfloat16 matmuls, or OpenVINO with the NNCF int8 IR. Which is
fastest depends on the CPU (VNNI, AMX, BF16), and whether a variant answers as fp32 does is a measurement, not a
rule. So the choice is data: per CPU class (``pipeline.cpu``), each variant's F1 on the default model's SQuAD dev
questions and its questions/s, in the ``auto_precision`` table of a model card (``card.json``;
``models/README.md`` says how it was measured); and per model, its own agreement record (``ModelRecord``, made by
``models/agreement.py`` and by ``models.convert --quantize int8``). The rule, applied to that data:

1. A variant is eligible when the directory has its graph (``servable``), every node can compute it (bf16 and
   int8-bf16 need bfloat16 matmuls on every node: one node without them rules both out for all, so answers never
   depend on where an actor lands), and the model answers as its fp32 does in it: with the model's own record,
   its F1 within ``F1_TOLERANCE`` of the model's fp32 F1 where the record's sample has gold answers (else an
   agreement F1 with the fp32 answers of at least ``AGREEMENT_F1``), and no answer that changed between two
   batchings of the same rows; without a record, its F1 on the default model within ``F1_TOLERANCE`` of that
   class's fp32 F1 and a precision whose answers do not depend on batch-mates (``BATCH_DEPENDENT``: ONNX
   Runtime's dynamic int8, whose activation scales are taken per batch tensor).
2. One choice for the job: among variants eligible on every measured class present, the one whose worst
   node class loses least against that class's own fastest eligible variant (max of the min of speed
   ratios). Worst ratios within ``SPEED_NOISE`` of the best count as equal, as two runs of one variant on one
   machine differ that much: among those, the best sum of ratios over the classes wins (a variant as fast on
   one class and clearly faster on another), then the table's order. Without this, a mixed cluster's choice
   could flip between two near-equal variants on a re-measurement. A class without measurements takes what
   the measured classes choose, if it can compute it.
3. No measured class present, or nothing common: the ``fallback`` the caller gives (the graph as it is, or the
   float graph beside a dynamic int8 one).

Speed ranks differ with the model's size (a variant fastest on the small default model may not be on a
BERT-base-sized one: models/README.md has the measured rows), so a row may also hold speeds measured on models of
other shapes (``ShapeSpeeds``: random weights, speed only). The ranking uses the speeds of the measured shape
nearest the served model's (``ModelShape.distance``), where the row has speeds there for every eligible variant.

Pure: the caller gives the table, the nodes' CPUs, the variants the directory can serve and the model's record.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .cpu import cpu_class, has_bf16_matmuls, local_flags
from .model_dir import ModelShape

AUTO = "auto"
# A card says "variant_names": 2 once its ONNX Runtime variants are named by what runs (pipeline/backends.py);
# before, "onnxruntime fp32" was the directory's graph as it is, whatever its arithmetic.
VARIANT_NAMES = 2
F1_TOLERANCE = 0.5  # points of SQuAD F1 below fp32 a variant may lose and still be chosen
SPEED_NOISE = 0.05  # worst speed ratios this close count as equal (rule 2)
# Precisions that compute in bfloat16 where the CPU has bfloat16 matmuls, and in f32 where it has not (OpenVINO's
# hint): answers would depend on the node, so every node must have them (pipeline.backends maps them to hints).
BF16_PRECISIONS = ("bf16", "int8-bf16")
# Precisions whose graphs quantize activations with one scale per batch tensor (ONNX Runtime's dynamic int8): a
# row's answer depends on the rows batched with it, so auto never serves them unless nothing else can be served.
BATCH_DEPENDENT = ("int8-dynamic", "int8-7bit")
# A model's own agreement record (models/agreement.py) without gold answers: the agreement F1 against the model's
# fp32 answers a variant must reach.
AGREEMENT_F1 = 97.0


@dataclass(frozen=True, order=True)
class Variant:
    backend: str  # a name in pipeline.backends.BACKENDS
    precision: str  # a name in pipeline.backends.PRECISIONS
    shapes: str = "dynamic"  # or "static": a compiled model per batch shape (pipeline/shapes.py; OpenVINO only)

    def __str__(self) -> str:
        return f"{self.backend} {self.precision}" + (" static shapes" if self.shapes == "static" else "")

    def to_json(self) -> dict:
        """As identities and records write it: ``shapes`` only when static, so that the records of dynamic
        variants keep the form (and the hash) written before static shapes existed."""
        return {"backend": self.backend, "precision": self.precision,
                **({"shapes": self.shapes} if self.shapes != "dynamic" else {})}


@dataclass(frozen=True)
class Measured:
    """One variant on one CPU class: F1 on the default model's dev questions, and its speed."""

    variant: Variant
    f1: float
    questions_per_s: float


@dataclass(frozen=True)
class ShapeSpeeds:
    """Each variant's speed on a model of another shape (random weights: no F1) on one CPU class, in windows/s
    of fixed batches (models.fixed_batches): only ratios between the variants count."""

    shape: ModelShape
    windows_per_s: tuple[tuple[Variant, float], ...]
    source: str = ""


@dataclass(frozen=True)
class ClassMeasurements:
    """A card's row for one CPU class."""

    cpu_class: str
    fp32_f1: float
    variants: tuple[Measured, ...]
    source: str = ""  # where, how and when it was measured
    shape: ModelShape | None = None  # of the model ``variants`` were measured on
    other_shapes: tuple[ShapeSpeeds, ...] = ()

    def speeds_for(self, shape: ModelShape | None) -> tuple[ModelShape | None, dict[Variant, float]]:
        """The speeds to rank by for a model of ``shape``: those of the nearest measured shape (the default
        model's when the shape is unknown or the row has no others)."""
        own = (self.shape, {m.variant: m.questions_per_s for m in self.variants})
        if shape is None or self.shape is None:
            return own
        candidates = [own, *((s.shape, dict(s.windows_per_s)) for s in self.other_shapes)]
        return min(candidates, key=lambda c: c[0].distance(shape))


@dataclass(frozen=True)
class NodeCpu:
    """What the choice needs to know of a node."""

    node_id: str
    cpu_class: str
    bf16: bool  # bfloat16 matmuls (AMX or AVX-512 BF16)
    memory_per_cpu: int | None = None  # bytes: the node's physical memory over its CPUs (None: unknown)

    @classmethod
    def from_flags(cls, node_id: str, flags: Iterable[str], memory_per_cpu: int | None = None) -> NodeCpu:
        flags = frozenset(flags)
        return cls(node_id, cpu_class(flags), has_bf16_matmuls(flags), memory_per_cpu)

    @classmethod
    def here(cls) -> NodeCpu:
        """This machine's CPU (a job with nothing left to answer chooses for the driver's)."""
        return cls.from_flags("local", local_flags(), memory_bytes() // max(1, os.cpu_count() or 1))


def memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class PrecisionChoice:
    """The variant a job runs, and why; recorded in the manifest and the job's identity."""

    variant: Variant
    requested: str  # "auto", or the precision forced on the command line
    reason: str
    cpu_classes: tuple[str, ...] = ()  # of the nodes it was chosen for

    def identity(self) -> dict:
        """What answers depend on: the variant, not how it was asked for (a forced int8 resumes auto's int8)."""
        return self.variant.to_json()

    def as_dict(self) -> dict:
        return {**self.identity(), "requested": self.requested, "reason": self.reason,
                "cpu_classes": list(self.cpu_classes)}


@dataclass(frozen=True)
class Agreement:
    """One variant against the model's own fp32, on the record's sample (models/agreement.py)."""

    variant: Variant
    agree_f1: float  # the variant's answers scored against fp32's
    f1: float | None  # against gold answers, where the sample has them
    batch_changes: int  # answers that changed between two batchings of the same rows


@dataclass(frozen=True)
class ModelRecord:
    """A model's own agreement record (its card's ``agreement``): which variants answer its questions as its fp32
    does. With it, eligibility comes from the model itself instead of from the default model's F1."""

    reference: Variant
    variants: tuple[Agreement, ...]
    cpu_class: str
    questions: int
    source: str = ""

    def verdicts(self) -> dict[Variant, str | None]:
        """Per measured variant: None when it is eligible for this model, else why not."""
        ref = next((a for a in self.variants if a.variant == self.reference), None)
        out: dict[Variant, str | None] = {}
        for a in self.variants:
            if a.batch_changes:
                out[a.variant] = f"{a.batch_changes} of {self.questions} answers changed with the batching"
            elif a.f1 is not None and ref is not None and ref.f1 is not None:
                out[a.variant] = (None if a.f1 >= ref.f1 - F1_TOLERANCE else
                                  f"F1 {a.f1:.2f} against this model's fp32 {ref.f1:.2f}")
            else:
                out[a.variant] = (None if a.agree_f1 >= AGREEMENT_F1 else
                                  f"agreement F1 {a.agree_f1:.2f} with this model's fp32 answers (< {AGREEMENT_F1})")
        return out


def parse_record(card: Mapping) -> ModelRecord | None:
    """The card's ``agreement`` record, or None; raises ValueError on a malformed one."""
    record = card.get("agreement")
    if not record:
        return None
    try:
        return ModelRecord(Variant(**record["reference"]), tuple(
            Agreement(Variant(v["backend"], v["precision"]), float(v["agree_f1"]),
                      None if v.get("f1") is None else float(v["f1"]), int(v["batch_changes"]))
            for v in record["variants"]), record["cpu_class"], int(record["sample"]["questions"]),
            record.get("source", ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed agreement record in the model card: {exc!r}") from exc


def parse_table(card: Mapping) -> dict[str, ClassMeasurements]:
    """The ``auto_precision`` table of a card (``{}`` when it has none); raises ValueError on a malformed one."""
    table = card.get("auto_precision") or {}

    def shape(d: Mapping | None) -> ModelShape | None:
        return ModelShape(int(d["layers"]), int(d["hidden"])) if d else None

    try:
        return {name: ClassMeasurements(
            name, float(row["fp32_f1"]),
            tuple(Measured(Variant(v["backend"], v["precision"]), float(v["f1"]), float(v["questions_per_s"]))
                  for v in row["variants"]),
            row.get("source", ""), shape(row.get("shape")),
            tuple(ShapeSpeeds(shape(other["shape"]),
                              tuple((Variant(v["backend"], v["precision"]), float(v["windows_per_s"])) for v in other["variants"]),
                              other.get("source", "")) for other in row.get("other_shapes", ())),
        ) for name, row in table.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed auto_precision table in the model card: {exc!r}") from exc


def renamed(table: Mapping[str, ClassMeasurements], old: Variant, new: Variant) -> dict[str, ClassMeasurements]:
    """``table`` with variant ``old`` called ``new`` (a card written before a variant's name changed)."""
    from dataclasses import replace

    def name(v: Variant) -> Variant:
        return new if v == old else v

    return {c: replace(row, variants=tuple(replace(m, variant=name(m.variant)) for m in row.variants),
                       other_shapes=tuple(replace(o, windows_per_s=tuple((name(v), w) for v, w in o.windows_per_s))
                                          for o in row.other_shapes))
            for c, row in table.items()}


def runnable(variant: Variant, nodes: Sequence[NodeCpu]) -> bool:
    """Whether every node computes ``variant`` as measured: bf16 and int8-bf16 need bfloat16 matmuls on all."""
    return variant.precision not in BF16_PRECISIONS or all(n.bf16 for n in nodes)


def eligibility(record: ModelRecord | None, servable: Iterable[Variant]) -> dict[Variant, str | None]:
    """Per servable variant: None when the model may be served so, else why not: its own record's verdict where
    it has one (a variant the record did not measure is not eligible), else only whether answers depend on
    batch-mates (the class table's F1 decides the rest)."""
    verdicts = record.verdicts() if record else {}
    out = {}
    for v in servable:
        if record is not None:
            out[v] = verdicts.get(v, "not in this model's agreement record")
        else:
            out[v] = "answers depend on batch-mates (per-batch activation scales)" \
                if v.precision in BATCH_DEPENDENT else None
    return out


def choose(table: Mapping[str, ClassMeasurements], nodes: Sequence[NodeCpu], servable: Iterable[Variant],
           fallback: Variant, shape: ModelShape | None = None, record: ModelRecord | None = None) -> PrecisionChoice:
    """The one variant for a job on ``nodes`` serving a model of ``shape`` (None: unknown), with the model's own
    agreement ``record`` if it has one; the module docstring has the rule."""
    servable = frozenset(servable)
    classes = tuple(sorted({n.cpu_class for n in nodes}))
    allowed = eligibility(record, servable)
    basis = (f"eligibility from this model's agreement record ({record.questions} questions, CPU class "
             f"{record.cpu_class})" if record else "no agreement record for this model (python -m models.agreement "
             "makes one): eligibility from the default model's F1")
    ruled_out = "; ".join(f"{v} ruled out: {why}" for v, why in sorted(allowed.items()) if why)
    tail = f" ({basis}{'; ' + ruled_out if ruled_out else ''})"
    measured = [table[c] for c in classes if c in table]
    if not measured:
        return PrecisionChoice(fallback, AUTO, f"no measurements for CPU class {', '.join(classes) or '?'}: "
                                               f"{_as_is(fallback)}{tail}", classes)
    speeds: list[dict[Variant, float]] = []
    ranked_on: list[ModelShape | None] = []
    for row in measured:
        eligible = {m.variant: m.questions_per_s for m in row.variants
                    if (record is not None or m.f1 >= row.fp32_f1 - F1_TOLERANCE) and m.variant in servable
                    and allowed.get(m.variant) is None and runnable(m.variant, nodes)}
        at, there = row.speeds_for(shape)
        if eligible.keys() <= there.keys():
            eligible = {v: there[v] for v in eligible}
        else:  # the nearest shape lacks some eligible variant: rank on the default model's speeds
            at = row.shape
        speeds.append(eligible)
        ranked_on.append(at)
    order = [m.variant for m in measured[0].variants]
    common = [v for v in order if all(v in s for s in speeds)]
    if not common:
        return PrecisionChoice(fallback, AUTO, "no eligible variant measured on every CPU class "
                                               f"({', '.join(classes)}) that this model can be served in: "
                                               f"{_as_is(fallback)}{tail}", classes)

    def ratios(v: Variant) -> list[float]:
        return [s[v] / max(s.values()) for s in speeds]

    floor = max(min(ratios(v)) for v in common) - SPEED_NOISE
    best = max((v for v in common if min(ratios(v)) >= floor),
               key=lambda v: (sum(ratios(v)), -order.index(v)))
    unmeasured = [c for c in classes if c not in table]
    detail = "; ".join(f"{row.cpu_class}: {s[best]:.1f} {'q/s' if at == row.shape else f'windows/s on a {at} model'}, "
                       f"F1 {_f1(row, best):.2f} against fp32's {row.fp32_f1:.2f}"
                       for row, s, at in zip(measured, speeds, ranked_on, strict=True))
    note = f"; unmeasured class {', '.join(unmeasured)} runs it too" if unmeasured else ""
    bf16_out = any(m.variant.precision in BF16_PRECISIONS for row in measured for m in row.variants) and \
        not runnable(Variant("openvino", "bf16"), nodes)
    why = " (bf16 ruled out: a node has no bfloat16 matmuls)" if bf16_out else ""
    rule = "fastest eligible variant" if record else f"fastest within {F1_TOLERANCE} F1 of fp32"
    return PrecisionChoice(best, AUTO, f"{rule} on every node's CPU class{why}: {detail}{note}{tail}", classes)


def _as_is(fallback: Variant) -> str:
    return f"{fallback}, the graph as it is" if fallback.precision not in BATCH_DEPENDENT else \
        f"{fallback}, the graph as it is (the only graph this model has; its answers depend on batch-mates)"


def _f1(row: ClassMeasurements, variant: Variant) -> float:
    return next(m.f1 for m in row.variants if m.variant == variant)
