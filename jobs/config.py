"""The job's configuration, and the command-line flags made from it.

``JobConfig`` is the one place for every setting's default, help text and heading: ``add_flags`` turns its
fields (and those of the settings dataclasses it nests) into argparse flags grouped under GROUPS, ``from_args``
turns parsed flags back into a validated config. ``jobs.answer``, ``jobs.evaluate`` and the benchmarks
(benchmarks/, not installed) build their flags here; docs/reference/cli.md is generated from them (jobs.reference).
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from pathlib import Path

from pipeline.backends import AUTO, BACKEND_CHOICES, BACKENDS, PRECISION_CHOICES, resolve_backend
from pipeline.commit import MODES
from pipeline.config import Columns, DecodeSettings, WindowOverrides
from pipeline.model_dir import DEFAULT_MODEL, default_model  # noqa: F401 - where jobs and benchmarks import them
from pipeline.shapes import SHAPES_CHOICES

REPO = Path(__file__).resolve().parents[1]


# The headings of a command's --help, in this order: every JobConfig field names one (``flag(group=...)``).
GROUPS = ("input and output", "columns", "model and precision", "cluster", "tuning", "advanced")


def flag(help: str, *, group: str, name: str | None = None, choices: tuple | None = None, required: bool = False,
         metavar: str | None = None, shown_default: str | None = None, prefix: str = "", suffix: str = "",
         helps: dict[str, str] | None = None) -> dict:
    """Field metadata for ``add_flags``: the flag is ``--<name>`` (default: the field's name with dashes), under the
    heading ``group`` (one of GROUPS). ``metavar`` names its value (default: N for numbers, else the flag's name);
    ``shown_default`` is what help says the default is where the value itself depends on the machine. On a nested
    settings field, ``prefix``/``suffix`` name its members' flags (``--id-column``), ``metavar`` their values, and
    ``helps`` replaces members' help texts."""
    if group not in GROUPS:
        raise ValueError(f"group {group!r} is not one of {GROUPS}")
    return {"flag": {"help": help, "group": group, "name": name, "choices": choices, "required": required,
                     "metavar": metavar, "shown_default": shown_default, "prefix": prefix, "suffix": suffix,
                     "helps": helps or {}}}


IO, COLUMNS, MODEL, CLUSTER, TUNING, ADVANCED = GROUPS


@dataclass(frozen=True)
class JobConfig:
    """Everything a run needs; validated here, printed into the manifest."""

    input: str = field(metadata=flag(
        "Parquet (file, folder or glob; local or s3://), iceberg://CATALOG/NS.TABLE, or a Delta table's folder",
        group=IO, required=True))
    output: str = field(metadata=flag(
        "where the answers go: a folder (local or s3://), iceberg://CATALOG/NS.TABLE, or a Delta table's folder",
        group=IO, required=True))
    input_format: str | None = field(default=None, metadata=flag(
        "read --input as this format (parquet, iceberg, delta) instead of telling it from the URI", group=IO,
        metavar="FORMAT"))
    output_format: str | None = field(default=None, metadata=flag(
        "write --output as this format instead of telling it from the URI", group=IO, metavar="FORMAT"))
    where: str | None = field(default=None, metadata=flag(
        "lake-table input (Iceberg, Delta): read only the rows that match, e.g. \"lang = 'en'\"", group=IO,
        metavar="FILTER"))
    select: str | None = field(default=None, metadata=flag(
        "lake-table input: comma-separated columns to read (the id, question and context columns always are)",
        group=IO, metavar="COLUMNS"))
    model: str = field(default_factory=default_model, metadata=flag(
        "model directory, graph file, or models/registry.py name", group=MODEL,
        shown_default="$QA_MODEL or models/minilm-squad"))
    columns: Columns = field(default_factory=Columns, metadata=flag(
        "input columns", group=COLUMNS, suffix="-column", metavar="NAME"))
    decode: DecodeSettings = field(default_factory=DecodeSettings, metadata=flag(
        "span decoding", group=MODEL, helps={
            "top_k": "answers kept per question; more than 1 adds a top_answers column",
            "max_context_chars": "a row whose context is longer gets an error and no answer (default: no limit)"}))
    windows: WindowOverrides = field(default_factory=WindowOverrides, metadata=flag("window settings", group=ADVANCED))
    concurrency: int | None = field(default=None, metadata=flag(
        "a fixed pool of N answering actors (default: a pool between --min-actors and --max-actors)",
        group=CLUSTER))
    min_actors: int = field(default=1, metadata=flag(
        "fewest answering actors: the job waits for CPUs for this many before it starts", group=CLUSTER))
    max_actors: int | None = field(default=None, metadata=flag(
        "most answering actors (default: the cluster's autoscaling bound in CPUs, else one per read unit)",
        group=CLUSTER))
    wait_for_workers_s: float = field(default=600.0, metadata=flag(
        "seconds to wait for the CPUs of --min-actors actors before failing", group=CLUSTER,
        name="wait-for-workers", metavar="SECONDS"))
    cpus_per_actor: int | None = field(default=None, metadata=flag(
        "CPUs (runtime threads) per actor (default: 1; 4 for graphs of 256 MB and more)", group=TUNING))
    rows_per_unit: int = field(default=1024, metadata=flag(
        "rows per read unit: one actor call, one output file", group=TUNING))
    batch_tokens: int | None = field(default=None, metadata=flag(
        "tokens (padding included) per inference call (default: the backend's: ONNX Runtime 512, OpenVINO 2048)",
        group=TUNING))
    address: str | None = field(default=None, metadata=flag(
        "Ray cluster address (default: RAY_ADDRESS, else a local Ray)", group=CLUSTER))
    backend: str = field(default=AUTO, metadata=flag(
        "default auto: the one --precision needs, else OpenVINO for model.xml, ONNX Runtime for model.onnx",
        group=MODEL, choices=BACKEND_CHOICES))
    precision: str = field(default="auto", metadata=flag(
        "default auto: the nodes' fastest variant within 0.5 SQuAD F1 of fp32 (docs/concepts/precision.md)",
        group=MODEL, choices=PRECISION_CHOICES))
    shapes: str = field(default="auto", metadata=flag(
        "OpenVINO: static compiles a model per batch shape (faster on AMX, more memory)", group=TUNING,
        choices=SHAPES_CHOICES, metavar="MODE"))
    mode: str = field(default="error", metadata=flag(
        "if the output exists: error (the default), overwrite, resume (an interrupted run), refresh (changed rows)",
        group=IO, choices=MODES))
    skip_bad_files: bool = field(default=False, metadata=flag(
        "skip unreadable input files (the manifest lists them) instead of failing", group=IO))
    questions: str | None = field(default=None, metadata=flag(
        "fan-out: a Parquet file of (question_id, question), each asked of every input row's context", group=IO,
        metavar="PATH"))
    wide: bool = field(default=False, metadata=flag(
        "with --questions: one output row per input row, with answer_<question_id> and score_<question_id> columns",
        group=IO))
    progress_every_s: float = field(default=30.0, metadata=flag(
        "seconds between progress lines", group=ADVANCED, name="progress-every", metavar="SECONDS"))
    verbose: bool = field(default=False, metadata=flag("show Ray's own log lines and warnings", group=ADVANCED))

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


def _flags(cls, parent: dict | None = None, dest: str = ""):
    """(dest, flag name, field, its base type, its flag metadata) of every leaf setting of ``cls``, nested settings
    flattened: a member's metadata is its parent's (group, metavar), its own help, and the parent's ``helps``."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = f.metadata.get("flag", {})
        kind = _base_type(hints[f.name])
        if is_dataclass(kind):
            yield from _flags(kind, meta, f"{dest}{f.name}__")
        else:
            if parent is not None:
                help_text = parent["helps"].get(f.name) or meta.get("help") or f.metadata.get("help", "")
                meta = {**meta, "group": parent["group"], "metavar": meta.get("metavar") or parent["metavar"],
                        "help": help_text}
                name = meta.get("name") or f"{parent['prefix']}{f.name.replace('_', '-')}{parent['suffix']}"
            else:
                name = meta.get("name") or f.name.replace("_", "-")
            yield f"{dest}{f.name}", name, f, kind, meta


def _top_level(dest: str) -> str:
    return dest.split("__", 1)[0]


def _selected(cls, only: tuple[str, ...] | None, skip: tuple[str, ...]):
    for dest, name, f, kind, meta in _flags(cls):
        top = _top_level(dest)
        if (only is None or top in only or dest in only) and top not in skip:
            yield dest, name, f, kind, meta


def _group(parser: argparse.ArgumentParser, title: str | None):
    """The parser's argument group ``title`` (made on first use, so a command shows only the headings it has);
    the parser itself where a setting names none."""
    if not title:
        return parser
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def add_flags(parser: argparse.ArgumentParser, cls=JobConfig, only: tuple[str, ...] | None = None,
              skip: tuple[str, ...] = ()) -> None:
    """Add a flag per setting of ``cls`` with the field's default and help text, under its group's heading (in
    GROUPS order): only the fields named in ``only`` (top-level, or nested as ``decode__max_answer_len``), if
    given, and none in ``skip``."""
    def order(setting) -> tuple[int, bool]:  # sorted is stable: field order within each
        dest, meta = setting[0], setting[4]
        return GROUPS.index(meta["group"]) if meta.get("group") in GROUPS else len(GROUPS), "__" in dest

    selected = sorted(_selected(cls, only, skip), key=order)  # a group's own flags, then its nested settings'
    for dest, name, f, kind, meta in selected:
        group = _group(parser, meta.get("group"))
        help_text = meta.get("help", "")
        default = _default(f)
        if kind is bool:
            group.add_argument(f"--{name}", dest=dest, action="store_true", help=help_text)
            continue
        if meta.get("shown_default"):
            help_text += f" (default: {meta['shown_default']})"
        elif default is not None and not meta.get("required") and "default" not in help_text:
            help_text += " (default: %(default)s)"
        choices = meta.get("choices")
        metavar = None if choices else meta.get("metavar") or ("N" if kind is int else name.upper().replace("-", "_"))
        group.add_argument(f"--{name}", dest=dest, type=kind, default=default, choices=choices, metavar=metavar,
                           required=bool(meta.get("required")), help=help_text)


def from_args(args: argparse.Namespace, cls=JobConfig, only: tuple[str, ...] | None = None,
              skip: tuple[str, ...] = (), **given):
    """``cls`` from the flags ``add_flags`` added (the same ``only`` and ``skip``) and ``given`` values; other
    fields keep their defaults. Raises ValueError from the config's own validation."""
    values: dict = {}
    nested: dict[str, dict] = {}
    for dest, *_ in _selected(cls, only, skip):
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
