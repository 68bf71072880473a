"""The records a job writes and reads back: its identity and its manifest, typed, versioned, JSON in one place.

``JobIdentity`` is what staged and committed answers depend on (input, model, variant, settings): a resume
compares it with what the output recorded, and an Iceberg commit carries its hash. ``IDENTITY_VERSION`` says
which form a release writes. A release can render its identity in the forms earlier releases wrote
(``as_version``), so that a resume across an upgrade, or a re-run of a job an earlier release committed, is
recognised as the same job instead of refused (folders) or appended again (tables). A form it cannot render
(a newer release's) is reported as such, in one line.

``Manifest`` is the committed run: which files (or which table snapshot), how many rows, and what the run did.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .config import Columns, DecodeSettings, WindowSettings
from .precision import Variant

IDENTITY_VERSION = 2  # 1: the flat dict of releases before typed identities (no "version" key)
MANIFEST_VERSION = 2


V1_DECODE = ("max_answer_len", "top_k")  # the decode settings version 1 recorded


class IdentityVersionError(ValueError):
    """An identity written by a release whose form this one cannot compare with its own."""


@dataclass(frozen=True)
class ModelHashes:
    """The files a served graph's answers depend on, by sha256 (None: the file is absent)."""

    graph_sha256: str
    weights_sha256: str | None  # an OpenVINO IR's .bin; None for ONNX
    tokenizer_sha256: str
    spec_sha256: str | None  # qa_spec.json


@dataclass(frozen=True)
class JobIdentity:
    """What a job's answers depend on; two runs with equal identities may share staged answers."""

    input: dict  # the source's own identity (pipeline.formats): {"format": ..., ...}
    model: ModelHashes
    variant: Variant
    columns: Columns
    decode: DecodeSettings
    windows: WindowSettings
    rows_per_unit: int
    questions: dict | None = None  # fan-out questions, column -> values
    wide: bool = False
    # --mode refresh: the committed output this run replaces (its sink's reference: a folder's run, a table's
    # snapshot); None for every other run. Written only when set, so that other jobs keep the form (and the hash)
    # earlier releases of this version wrote.
    replaces: dict | None = None

    def to_json(self) -> dict:
        return {"version": IDENTITY_VERSION, "input": self.input, "model": asdict(self.model),
                "variant": self.variant.to_json(), "columns": asdict(self.columns), "decode": asdict(self.decode),
                "windows": asdict(self.windows), "rows_per_unit": self.rows_per_unit,
                "questions": self.questions, "wide": self.wide,
                **({"replaces": self.replaces} if self.replaces is not None else {})}

    @classmethod
    def from_json(cls, d: dict) -> JobIdentity:
        version = identity_version(d)
        if version != IDENTITY_VERSION:
            raise IdentityVersionError(f"job identity version {version}, not {IDENTITY_VERSION}")
        return cls(d["input"], ModelHashes(**d["model"]), Variant(**d["variant"]), Columns(**d["columns"]),
                   DecodeSettings(**d["decode"]), WindowSettings(**d["windows"]), d["rows_per_unit"],
                   d.get("questions"), d.get("wide", False), d.get("replaces"))

    def as_version(self, version: int) -> dict | None:
        """This identity as release ``version`` wrote identities; None where that form cannot hold it."""
        if version == IDENTITY_VERSION:
            return self.to_json()
        if version == 1:
            return self._v1()
        return None

    def _v1(self) -> dict | None:
        if self.replaces is not None or self.variant.shapes != "dynamic":  # no version-1 job was either
            return None
        source = dict(self.input)
        kind = source.pop("format", None)
        if kind == "parquet":
            inputs = {"input_files": source["files"]}
        elif kind == "iceberg":
            inputs = {"input_table": source}
        else:  # formats added after version 1 have no version-1 form
            return None
        decode = asdict(self.decode)
        later = {k: v for k, v in decode.items() if k not in V1_DECODE}
        if any(v != getattr(DecodeSettings(), k) for k, v in later.items()):
            return None  # a setting version 1 did not have, set: no version-1 job had it
        return {"questions": self.questions, "wide": self.wide, **inputs, "columns": asdict(self.columns),
                "decode": {k: decode[k] for k in V1_DECODE}, "windows": asdict(self.windows),
                "model_sha256": self.model.graph_sha256, "weights_sha256": self.model.weights_sha256,
                "tokenizer_sha256": self.model.tokenizer_sha256, "spec_sha256": self.model.spec_sha256,
                "precision_choice": _v1_variant(self.variant), "rows_per_unit": self.rows_per_unit}

    def written(self) -> dict:
        """The form this run writes: the current one (tests may ask for an earlier release's, pipeline.faults)."""
        from .faults import written_identity_version

        form = self.as_version(written_identity_version(IDENTITY_VERSION))
        if form is None:
            raise IdentityVersionError("this job's identity has no form of the version QA_FAULT_IDENTITY_VERSION asks")
        return form

    def key(self, version: int = IDENTITY_VERSION) -> str | None:
        """The sha256 of this identity in release ``version``'s form (what an Iceberg snapshot carries)."""
        form = self.as_version(version)
        return None if form is None else json_key(form)

    def keys(self) -> dict[int, str]:
        """This identity's hash in every form it can be written in, by version."""
        return {v: k for v in range(1, IDENTITY_VERSION + 1) if (k := self.key(v)) is not None}

    def compare(self, recorded: dict) -> Comparison:
        """How a recorded identity (read from an output) relates to this one."""
        version = identity_version(recorded)
        form = self.as_version(version)
        if form is None:
            return Comparison(False, version, comparable=False)
        return Comparison(form == recorded, version)


@dataclass(frozen=True)
class Comparison:
    same: bool
    version: int  # of the recorded form
    comparable: bool = True

    def note(self, where: str) -> str | None:
        """One line for a recorded identity of another release; None for this release's."""
        if self.version == IDENTITY_VERSION:
            return None
        if not self.comparable:
            return (f"{where} was written by a qa-batch release with job identity version {self.version}; this "
                    f"release writes version {IDENTITY_VERSION} and cannot compare the two")
        return (f"note: {where} was written by an earlier qa-batch release (job identity version {self.version}, "
                f"now {IDENTITY_VERSION}); read in that form, it is " + ("this job" if self.same else "another job"))


def _v1_variant(variant: Variant) -> dict:
    """Version 1 named ONNX Runtime's int8 model.onnx "fp32" (the graph as it is; pipeline/backends.py)."""
    if variant.backend == "onnxruntime" and variant.precision in ("int8-dynamic", "int8-static"):
        return {"backend": variant.backend, "precision": "fp32"}
    return variant.to_json()


def identity_version(recorded: dict) -> int:
    return int(recorded.get("version", 1)) if isinstance(recorded, dict) else 0


def json_key(value: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """A committed run: what it published (``output_files``, or a table snapshot in ``commit``), its row counts,
    the identity of the job it committed, and what the run did. Written as ``_manifest.json`` by folder sinks;
    table sinks return it (their table's snapshot is the commit)."""

    job: dict  # the job identity, as written
    run: str
    rows_out: int
    errors: int
    output_files: list[dict]  # path, rows, unit, errors per published file
    commit: dict  # where it is committed: {"format": "parquet", "path": ...} or a table's snapshot
    config: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    precision: dict = field(default_factory=dict)  # the variant served, and why (pipeline/precision.py)
    batch_tokens: int | None = None
    input_files: list[str] = field(default_factory=list)
    skipped_bad_files: list[str] = field(default_factory=list)
    read_units: int = 0
    rows_in: int = 0
    rows_per_input_row: int = 1
    units_answered_now: int = 0
    rows_staged_before: int = 0
    errors_by_kind_this_run: dict = field(default_factory=dict)
    retries: dict = field(default_factory=dict)
    ray: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    durations_s: dict = field(default_factory=dict)
    questions_per_s: float = 0.0
    refresh: dict = field(default_factory=dict)  # --mode refresh: rows reused and answered, and why (pipeline/refresh.py)
    version: int = MANIFEST_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        """A manifest read back; one of version 1 (no ``version``, no ``commit``) reads with defaults."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values.setdefault("commit", {k: d[k] for k in ("table", "snapshot_id") if k in d})
        values.setdefault("version", 1)
        return cls(**values)

    def committed_to(self) -> str:
        """Where the commit is, for the run's last line."""
        c = self.commit
        if "snapshot_id" in c:
            return f"snapshot {c['snapshot_id']} of {c.get('table')}"
        if "table_version" in c:
            return f"version {c['table_version']} of {c.get('table')}"
        if "manifest" in c:
            return f"manifest {c['manifest']}"
        return f"{c.get('format', 'output')} {c.get('path') or c.get('table')}"


def recorded_variant(recorded: dict | None) -> Variant | None:
    """The variant a recorded identity (of any version this release reads) says served the job."""
    if not recorded:
        return None
    found = recorded.get("variant") if identity_version(recorded) >= 2 else recorded.get("precision_choice")
    return Variant(found["backend"], found["precision"], found.get("shapes", "dynamic")) if found else None
