"""A model directory: the files that answer questions, and what cannot be read from them.

Layout (any `optimum`-style export already fits)::

    MODEL_DIR/
      model.onnx            the graph (the only weights file loaded at answer time)
      tokenizer.json        a Hugging Face `tokenizers` file, or vocab.txt for a BERT WordPiece vocab
      config.json           optional Hugging Face config (max_position_embeddings caps max_seq_len)
      tokenizer_config.json optional; do_lower_case is read when only vocab.txt is present
      qa_spec.json          optional; what cannot be discovered, e.g.
                            {"max_seq_len": 128, "doc_stride": 64, "max_query_len": 64,
                             "lowercase": true, "inputs": {"input_ids": "ids", ...}}

Window sizes come from, in order: qa_spec.json, a fixed sequence length in the graph, the
defaults (384/128/64) capped by config.json's max_position_embeddings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import WindowSettings

SPEC_FILE = "qa_spec.json"
_REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = _REPO / "models" / "minilm-squad"  # the model trained here (models/README.md)
MODEL_ZOO = Path(os.environ.get("QA_MODEL_ZOO", _REPO / "models" / "zoo"))  # where registry names resolve


def default_model() -> str:
    """The model a job serves without --model: ``QA_MODEL``, else the default model."""
    return os.environ.get("QA_MODEL") or str(DEFAULT_MODEL)
_SPEC_KEYS = {"max_seq_len", "doc_stride", "max_query_len", "lowercase", "inputs", "outputs", "name", "card",
              "backend"}


class ModelDirError(ValueError):
    """A model directory is missing a file or holds a bad one; the message names it."""


@dataclass(frozen=True)
class ModelShape:
    """Encoder layers x hidden width: what decides which variant is fastest, for a model with no measurements."""

    layers: int
    hidden: int

    def distance(self, other: ModelShape) -> float:
        """How far apart in matmul work per token (layers x hidden^2), as a ratio: 0 for the same size."""
        return abs(math.log((self.layers * self.hidden ** 2) / (other.layers * other.hidden ** 2)))

    def __str__(self) -> str:
        return f"{self.layers} x {self.hidden}"



@dataclass(frozen=True)
class ModelSpec:
    directory: Path
    model_file: Path
    tokenizer_file: Path  # tokenizer.json or vocab.txt
    lowercase: bool | None  # None: as tokenizer.json defines
    windows: WindowSettings
    input_names: dict[str, str] = field(default_factory=dict)  # role -> graph name overrides
    output_names: dict[str, str] = field(default_factory=dict)
    spec: dict = field(default_factory=dict)
    shape: ModelShape | None = None  # from config.json; None where it has none (e.g. an Open Model Zoo IR)

    def identity(self, hashes=None) -> dict:
        """What the manifest records to say which model answered; ``hashes`` (pipeline.records.ModelHashes):
        the files' hashes when already known, else read here."""
        if hashes is None:
            from .served import model_hashes

            hashes = model_hashes(self)
        return {
            "directory": str(self.directory),
            "model_file": str(self.model_file),
            "sha256": hashes.graph_sha256,
            # An OpenVINO IR keeps its weights beside the .xml: a changed .bin is a different model.
            "weights_sha256": hashes.weights_sha256,
            "tokenizer_file": str(self.tokenizer_file),
            "tokenizer_sha256": hashes.tokenizer_sha256,
            "spec_sha256": hashes.spec_sha256,
            "lowercase": self.lowercase,
            "windows": vars(self.windows),
        }


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ModelDirError(f"{path}: expected a JSON object")
    return value


def _vocab_is_lowercase(vocab: Path) -> bool:
    """An uncased WordPiece vocab has no upper-case letters outside its [SPECIAL] tokens."""
    with open(vocab, encoding="utf-8") as f:
        return not any(t[:1] != "[" and t != t.lower() for t in f.read().split("\n"))


MODEL_SUFFIXES = (".onnx", ".xml")


def find_model_file(directory: str | Path) -> Path:
    """model.onnx, else the directory's only .onnx file, else an OpenVINO IR model.xml (+ model.bin).

    A path to a graph file inside a model directory (``models/minilm-squad/model-fp32.onnx``) picks that
    variant; the tokenizer and spec still come from its directory.
    """
    d = Path(directory)
    if d.is_file() and d.suffix in MODEL_SUFFIXES:
        if d.suffix == ".xml" and not d.with_suffix(".bin").exists():
            raise ModelDirError(f"{d} (OpenVINO IR) has no {d.with_suffix('.bin').name} beside it")
        return d
    if not d.is_dir():
        raise ModelDirError(f"model directory {d} does not exist")
    if (d / "model.onnx").exists():
        return d / "model.onnx"
    onnx_files = sorted(d.glob("*.onnx"))
    if len(onnx_files) == 1:
        return onnx_files[0]
    if not onnx_files and (d / "model.xml").exists():
        if not (d / "model.bin").exists():
            raise ModelDirError(f"{d}: model.xml (OpenVINO IR) has no model.bin beside it")
        return d / "model.xml"
    found = ", ".join(p.name for p in onnx_files) or "none"
    raise ModelDirError(f"{d}: expected model.onnx or an OpenVINO model.xml + model.bin (found .onnx files: {found})")


FP32_GRAPH = "model-fp32.onnx"


def load_spec(directory: str | Path, fixed_seq_len: int | None = None, overrides: dict | None = None) -> ModelSpec:
    """Read and validate a model directory.

    ``fixed_seq_len`` is the sequence length the graph itself fixes, if any (see session.py);
    ``overrides`` (e.g. from the command line) win over every file.
    """
    model_file = find_model_file(directory)
    d = model_file.parent

    spec = _read_json(d / SPEC_FILE) if (d / SPEC_FILE).exists() else {}
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ModelDirError(f"{d / SPEC_FILE}: unknown keys {sorted(unknown)}; valid keys are {sorted(_SPEC_KEYS)}")
    spec = {**spec, **(overrides or {})}
    hf_config = _read_json(d / "config.json") if (d / "config.json").exists() else {}

    if (d / "tokenizer.json").exists():
        tokenizer_file, lowercase = d / "tokenizer.json", spec.get("lowercase")
    elif (d / "vocab.txt").exists():
        tokenizer_file = d / "vocab.txt"
        tok_cfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").exists() else {}
        lowercase = spec.get("lowercase", tok_cfg.get("do_lower_case"))
        if lowercase is None:
            lowercase = _vocab_is_lowercase(tokenizer_file)
    else:
        raise ModelDirError(f"{d}: expected tokenizer.json or vocab.txt beside {model_file.name}")

    defaults = WindowSettings()
    max_seq_len = spec.get("max_seq_len") or fixed_seq_len or defaults.max_seq_len
    if fixed_seq_len and max_seq_len != fixed_seq_len:
        raise ModelDirError(
            f"{model_file}: the graph fixes sequence length {fixed_seq_len} but max_seq_len is {max_seq_len}"
        )
    max_pos = hf_config.get("max_position_embeddings")
    if isinstance(max_pos, int) and max_seq_len > max_pos:
        if "max_seq_len" in spec:
            raise ModelDirError(f"{d}: max_seq_len {max_seq_len} exceeds max_position_embeddings {max_pos}")
        max_seq_len = max_pos
    try:
        windows = WindowSettings(
            max_seq_len=int(max_seq_len),
            doc_stride=int(spec.get("doc_stride", min(defaults.doc_stride, max_seq_len // 2))),
            max_query_len=int(spec.get("max_query_len", min(defaults.max_query_len, max_seq_len // 2))),
        )
    except ValueError as exc:
        raise ModelDirError(f"{d}: {exc}") from exc
    return ModelSpec(
        directory=d.resolve(),
        model_file=model_file.resolve(),
        tokenizer_file=tokenizer_file.resolve(),
        lowercase=lowercase,
        windows=windows,
        input_names=dict(spec.get("inputs", {})),
        output_names=dict(spec.get("outputs", {})),
        spec=spec,
        shape=_shape(hf_config),
    )


def _shape(hf_config: dict) -> ModelShape | None:
    layers, hidden = hf_config.get("num_hidden_layers"), hf_config.get("hidden_size")
    valid = isinstance(layers, int) and isinstance(hidden, int) and layers > 0 and hidden > 0
    return ModelShape(layers, hidden) if valid else None
