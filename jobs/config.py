"""The job's configuration, and the command-line flags made from it.

``JobConfig`` is the one place for every setting's default and help text: ``add_flags`` turns its fields
(and those of the settings dataclasses it nests) into argparse flags, ``from_args`` turns parsed flags back
into a validated config. ``jobs.answer``, ``jobs.evaluate`` and the benchmarks (benchmarks/, not installed) build their flags here.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from pathlib import Path

from pipeline.backends import AUTO, BACKEND_CHOICES, BACKENDS, PRECISION_CHOICES, resolve_backend
from pipeline.commit import MODES
from pipeline.config import Columns, DecodeSettings, WindowOverrides

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "minilm-squad"


def default_model() -> str:
    return os.environ.get("QA_MODEL") or str(DEFAULT_MODEL)


def flag(help: str, *, name: str | None = None, choices: tuple | None = None, required: bool = False,
         prefix: str = "", suffix: str = "") -> dict:
    """Field metadata for ``add_flags``: the flag is ``--<name>`` (default: the field's name with dashes).
    On a nested settings field, ``prefix``/``suffix`` name its members' flags (``--id-column``)."""
    return {"flag": {"help": help, "name": name, "choices": choices, "required": required,
                     "prefix": prefix, "suffix": suffix}}


@dataclass(frozen=True)
class JobConfig:
    """Everything a run needs; validated here, printed into the manifest."""

    input: str = field(metadata=flag(
        "Parquet file, directory, glob, s3:// URI, or iceberg://CATALOG/NAMESPACE.TABLE", required=True))
    output: str = field(metadata=flag("output directory, s3:// URI, or iceberg://CATALOG/NAMESPACE.TABLE",
                                      required=True))
    input_format: str | None = field(default=None, metadata=flag(
        "read --input as this format (pipeline.formats: parquet, iceberg, ...) instead of telling it from the URI"))
    output_format: str | None = field(default=None, metadata=flag(
        "write --output as this format instead of telling it from the URI"))
    where: str | None = field(default=None, metadata=flag(
        "iceberg:// input: a pyiceberg row filter, e.g. \"lang = 'en' and day >= '2024-01-01'\""))
    select: str | None = field(default=None, metadata=flag(
        "iceberg:// input: comma-separated columns to read (the id, question and context columns always are)"))
    model: str = field(default_factory=default_model, metadata=flag(
        "model directory, a graph file inside one, or a registry name (models/registry.py)"))
    columns: Columns = field(default_factory=Columns, metadata=flag("input columns", suffix="-column"))
    decode: DecodeSettings = field(default_factory=DecodeSettings, metadata=flag("span decoding"))
    windows: WindowOverrides = field(default_factory=WindowOverrides, metadata=flag("window settings"))
    concurrency: int | None = field(default=None, metadata=flag(
        "a fixed pool of N answering actors (default: a pool that grows and shrinks between --min-actors and "
        "--max-actors)"))
    min_actors: int = field(default=1, metadata=flag(
        "fewest answering actors: the job waits (up to --wait-for-workers) for CPUs for this many before it starts"))
    max_actors: int | None = field(default=None, metadata=flag(
        "most answering actors (default: the cluster's autoscaling bound in CPUs / CPUs per actor; without "
        "one, the read units: the pool grows onto every node that joins)"))
    wait_for_workers_s: float = field(default=600.0, metadata=flag(
        "seconds to wait for worker CPUs for --min-actors actors before failing", name="wait-for-workers"))
    cpus_per_actor: int | None = field(default=None, metadata=flag(
        "CPUs (= runtime threads) per actor (default: 1; 4 for graphs of 256 MB and more)"))
    rows_per_unit: int = field(default=1024, metadata=flag("rows per read unit: one actor call, one output file"))
    batch_tokens: int | None = field(default=None, metadata=flag(
        "tokens (padding included) per inference call (default: the backend's, ONNX Runtime 512, OpenVINO 2048; "
        "BENCHMARKS.md: token budget)"))
    address: str | None = field(default=None, metadata=flag("Ray cluster address (default: RAY_ADDRESS, else local)"))
    backend: str = field(default=AUTO, metadata=flag(
        "auto: OpenVINO for model.xml, ONNX Runtime for model.onnx", choices=BACKEND_CHOICES))
    precision: str = field(default="auto", metadata=flag(
        "auto: per job, the fastest variant within 0.5 SQuAD F1 of fp32 on the CPU classes of the cluster's nodes, "
        "from the model card's measurements (README: Precision); fp32: the float graph (model-fp32.onnx where "
        "model.onnx is int8); bf16: OpenVINO runs the float graph with bfloat16 matmuls on CPUs that have them "
        "(AMX, AVX512-BF16), f32 elsewhere; int8: OpenVINO serves the directory's NNCF int8 IR (model-int8.xml); "
        "int8-bf16: that IR with bfloat16 for its float ops (as bf16); int8-dynamic: ONNX Runtime serves the "
        "dynamic int8 model.onnx (our exports'; called fp32 before); int8-static: a statically quantized "
        "model.onnx; int8-7bit: ONNX Runtime serves model-int8-7bit.onnx", choices=PRECISION_CHOICES))
    mode: str = field(default="error", metadata=flag(
        "when the output exists: fail (error), replace it (overwrite), finish an interrupted run (resume), or "
        "answer only the rows whose question or context changed and keep every other committed answer "
        "(refresh: the nightly mode; a full run where nothing is committed yet)",
        choices=MODES))
    skip_bad_files: bool = field(default=False, metadata=flag(
        "skip unreadable input files (listed in the manifest) instead of failing"))
    questions: str | None = field(default=None, metadata=flag(
        "fan-out: Parquet of (question_id, question) asked of every input row, whose id and context columns "
        "are then read as documents"))
    wide: bool = field(default=False, metadata=flag(
        "with --questions: one output row per document, answer_<question_id>/score_<question_id>"))
    progress_every_s: float = field(default=30.0, metadata=flag("seconds between progress lines",
                                                                 name="progress-every"))
    verbose: bool = field(default=False, metadata=flag("show Ray's own log lines and warnings"))

    def tokens_per_call(self, backend: str) -> int:
        """--batch-tokens, else the serving backend's own default (pipeline.backends.BACKENDS)."""
        return self.batch_tokens or BACKENDS[backend].batch_tokens

    def __post_init__(self) -> None:
        for name in ("concurrency", "cpus_per_actor"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.min_actors < 1 or (self.max_actors is not None and self.max_actors < self.min_actors):
            raise ValueError(f"need 1 <= --min-actors <= --max-actors, got {self.min_actors} and {self.max_actors}")
        if self.concurrency is not None and (self.max_actors is not None or self.min_actors != 1):
            raise ValueError("--concurrency (a fixed pool) excludes --min-actors and --max-actors")
        if self.wait_for_workers_s < 0:
            raise ValueError(f"--wait-for-workers must be >= 0 seconds, got {self.wait_for_workers_s}")
        if self.rows_per_unit < 1 or (self.batch_tokens is not None and self.batch_tokens < 1):
            raise ValueError("--rows-per-unit and --batch-tokens must be >= 1")
        if self.wide and not self.questions:
            raise ValueError("--wide needs --questions")
        if self.progress_every_s <= 0:
            raise ValueError("--progress-every must be > 0 seconds")
        resolve_backend(self.backend, self.precision)  # raises on a bad pair, e.g. bf16 with onnxruntime
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}")
        from pipeline.formats import format_names

        for role, name in (("input", self.input_format), ("output", self.output_format)):
            if name is not None and name not in format_names():
                raise ValueError(f"--{role}-format must be one of {format_names()}, got {name!r}")
        if len({self.columns.id, self.columns.question, self.columns.context}) != 3:
            raise ValueError(f"id, question and context columns must differ: {self.columns}")


# ------------------------------------------------------------------------------------------- flags


def _base_type(hint) -> type:
    """int for ``int | None``; the type itself otherwise."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (base,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return base
    return hint


def _default(f: Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def _flags(cls, prefix: str = "", suffix: str = "", dest: str = ""):
    """(dest, flag name, field, its base type) of every leaf setting of ``cls``, nested settings flattened."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = f.metadata.get("flag", {})
        kind = _base_type(hints[f.name])
        if is_dataclass(kind):
            yield from _flags(kind, meta.get("prefix", ""), meta.get("suffix", ""), f"{dest}{f.name}__")
        else:
            name = meta.get("name") or f"{prefix}{f.name.replace('_', '-')}{suffix}"
            yield f"{dest}{f.name}", name, f, kind


def _top_level(dest: str) -> str:
    return dest.split("__", 1)[0]


def _selected(cls, only: tuple[str, ...] | None, skip: tuple[str, ...]):
    for dest, name, f, kind in _flags(cls):
        top = _top_level(dest)
        if (only is None or top in only or dest in only) and top not in skip:
            yield dest, name, f, kind


def add_flags(parser: argparse.ArgumentParser, cls=JobConfig, only: tuple[str, ...] | None = None,
              skip: tuple[str, ...] = ()) -> None:
    """Add a flag per setting of ``cls`` with the field's default and help text: only the fields named in
    ``only`` (top-level, or nested as ``decode__max_answer_len``), if given, and none in ``skip``."""
    for dest, name, f, kind in _selected(cls, only, skip):
        meta = f.metadata.get("flag", {})
        help_text = meta.get("help") or f.metadata.get("help", "")
        default = _default(f)
        if kind is bool:
            parser.add_argument(f"--{name}", dest=dest, action="store_true", help=help_text)
            continue
        if default is not None and not meta.get("required"):
            help_text += " (default: %(default)s)"
        choices = meta.get("choices")
        parser.add_argument(f"--{name}", dest=dest, type=kind, default=default, choices=choices,
                            metavar=None if choices else name.upper().replace("-", "_"),
                            required=bool(meta.get("required")), help=help_text)


def from_args(args: argparse.Namespace, cls=JobConfig, only: tuple[str, ...] | None = None,
              skip: tuple[str, ...] = (), **given):
    """``cls`` from the flags ``add_flags`` added (the same ``only`` and ``skip``) and ``given`` values; other
    fields keep their defaults. Raises ValueError from the config's own validation."""
    values: dict = {}
    nested: dict[str, dict] = {}
    for dest, _, _, _ in _selected(cls, only, skip):
        if _top_level(dest) in given:
            continue
        top, _, member = dest.partition("__")
        if member:
            nested.setdefault(top, {})[member] = getattr(args, dest)
        else:
            values[top] = getattr(args, dest)
    hints = typing.get_type_hints(cls)
    for top, members in nested.items():
        values[top] = _base_type(hints[top])(**members)  # every nested setting here is one level deep
    return cls(**values, **given)
