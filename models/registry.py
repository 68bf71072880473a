"""The models our users already have, by name: what each needs to answer as its card says, and where it lives.

``resolve_model(name_or_path, root)`` turns ``--model`` into a model directory: an existing path is returned as
is; a registry name resolves to ``root/<slug>`` (e.g. models/zoo/Intel--dynamic_tinybert), and when the weights
are not there the error says where to get them, where to put them and the exact conversion command. No weights
are downloaded here: users fetch them (licences, hubs and registries differ) and convert once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.backends import BACKENDS
from pipeline.config import WindowSettings

FORMATS = ("openvino-ir", "hf-pytorch", "tf1-checkpoint", "onnx")
DEFAULT_ROOT = Path("models/zoo")


class ModelNotFoundError(FileNotFoundError):
    """A --model that is neither a directory nor a registry name, or a registry model not yet installed."""


@dataclass(frozen=True)
class ZooModel:
    """One seed model: its windows and casing (from its card), expected SQuAD v1.1 dev scores, and provenance."""

    name: str
    source_format: str  # one of FORMATS
    backend: str  # one of BACKENDS: which session runs the converted directory
    max_seq_len: int
    doc_stride: int
    max_query_len: int
    lowercase: bool
    card_f1: float | None  # SQuAD v1.1 dev, as the model card states; None where the card gives none
    card_em: float | None
    weights: str  # where the user gets the weights, and what the downloaded directory must hold
    convert_requires: str  # the pip line for the conversion tools
    fixed_shape: tuple[int, int] | None = None  # (batch, seq) the graph fixes, if it does
    notes: str = ""

    def __post_init__(self) -> None:
        if self.source_format not in FORMATS:
            raise ValueError(f"{self.name}: source_format {self.source_format!r} not in {FORMATS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"{self.name}: backend {self.backend!r} not in {tuple(BACKENDS)}")
        WindowSettings(self.max_seq_len, self.doc_stride, self.max_query_len)  # raises on impossible windows
        for score in (self.card_f1, self.card_em):
            if score is not None and not 0 < score <= 100:
                raise ValueError(f"{self.name}: card score {score} is not a percentage")
        if self.fixed_shape and self.fixed_shape[1] != self.max_seq_len:
            raise ValueError(f"{self.name}: fixed shape {self.fixed_shape} disagrees with max_seq_len "
                             f"{self.max_seq_len}")

    @property
    def slug(self) -> str:
        """Directory name under the zoo root: '/' of hub names becomes '--' (as in the Hugging Face cache)."""
        return self.name.replace("/", "--")

    def qa_spec(self) -> dict:
        """qa_spec.json for the converted directory (keys of pipeline/model_dir.py)."""
        return {
            "name": self.name, "max_seq_len": self.max_seq_len, "doc_stride": self.doc_stride,
            "max_query_len": self.max_query_len, "lowercase": self.lowercase,
            "card": {"squad_v1.1_dev_f1": self.card_f1, "squad_v1.1_dev_em": self.card_em,
                     "source_format": self.source_format, "backend": self.backend},
        }

    def convert_command(self, root: Path = DEFAULT_ROOT, source: str = "SRC") -> str:
        return f"python -m models.convert {source} {root / self.slug} --spec {self.name}"


_OMZ = ("Open Model Zoo: `pip install openvino-dev && omz_downloader --name {omz}` gives intel/{omz}/{precision}/"
        "{omz}.xml + .bin; copy the vocab.txt that Open Model Zoo ships for it "
        "(models/intel/{omz}/vocab.txt in the open_model_zoo repository) into that {precision}/ directory")

MODELS: tuple[ZooModel, ...] = (
    ZooModel(
        name="bert-large-uncased-whole-word-masking-squad-fp32-0001", source_format="openvino-ir",
        backend="openvino", max_seq_len=384, doc_stride=128, max_query_len=64, lowercase=True,
        card_f1=93.21, card_em=87.20, fixed_shape=(1, 384),
        weights=_OMZ.format(omz="bert-large-uncased-whole-word-masking-squad-fp32-0001", precision="FP32"),
        convert_requires="pip install openvino",
        notes="IR of a Hugging Face PyTorch checkpoint; inputs input_ids/attention_mask/token_type_ids fixed "
              "[1, 384], outputs output_s/output_e",
    ),
    ZooModel(
        name="bert-large-uncased-whole-word-masking-squad-int8-0001", source_format="openvino-ir",
        backend="openvino", max_seq_len=384, doc_stride=128, max_query_len=64, lowercase=True,
        card_f1=92.60, card_em=86.36, fixed_shape=(1, 384),
        weights=_OMZ.format(omz="bert-large-uncased-whole-word-masking-squad-int8-0001", precision="FP32-INT8"),
        convert_requires="pip install openvino",
        notes="int8 (NNCF quantization-aware) IR: runs only on OpenVINO",
    ),
    ZooModel(
        name="madlag/bert-base-uncased-squad1.1-block-sparse-0.07-v1", source_format="hf-pytorch",
        backend="onnxruntime", max_seq_len=384, doc_stride=128, max_query_len=64, lowercase=True,
        card_f1=81.36, card_em=71.88,
        weights="Hugging Face Hub: `huggingface-cli download madlag/bert-base-uncased-squad1.1-block-sparse-0.07-v1 "
                "--local-dir SRC` (config.json, pytorch_model.bin, vocab.txt/tokenizer.json)",
        convert_requires="pip install torch 'transformers>=4.44,<5' onnx",
        notes="106 of 144 heads pruned, per-layer head counts (config pruned_heads): transformers 5 ignores "
              "them, so convert with transformers 4",
    ),
    ZooModel(
        name="nvidia/bert_tf_ckpt_base_qa_squad11_amp_128", source_format="tf1-checkpoint",
        backend="onnxruntime", max_seq_len=128, doc_stride=64, max_query_len=64, lowercase=True,
        card_f1=None, card_em=None,
        weights="NVIDIA NGC catalog model nvidia/bert_tf_ckpt_base_qa_squad11_amp_128, version 19.03.1 (1.23 GB, "
                "https://catalog.ngc.nvidia.com/orgs/nvidia/models/bert_tf_ckpt_base_qa_squad11_amp_128): unzip to SRC "
                "holding bert_config.json, vocab.txt and model.ckpt-N.index/.data-*",
        convert_requires="pip install torch transformers tensorflow-cpu onnx",
        notes="TF1 checkpoint with Google BERT variable names; fine-tuned at sequence length 128. Google's gelu "
              "is the tanh form (exported as such). Measure F1/EM with jobs.evaluate: no card figure recorded",
    ),
    ZooModel(
        name="Intel/dynamic_tinybert", source_format="hf-pytorch",
        backend="onnxruntime", max_seq_len=384, doc_stride=128, max_query_len=64, lowercase=True,
        card_f1=88.71, card_em=None,
        weights="Hugging Face Hub: `huggingface-cli download Intel/dynamic_tinybert --local-dir SRC`",
        convert_requires="pip install torch transformers onnx",
        notes="6 layers x 768 hidden",
    ),
)
REGISTRY: dict[str, ZooModel] = {m.name: m for m in MODELS}


def get_entry(name: str) -> ZooModel:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelNotFoundError(f"{name!r} is not a registry name; known: {sorted(REGISTRY)}") from None


def installed_files(directory: Path, backend: str) -> list[str]:
    """The files a servable directory still lacks (empty when complete)."""
    graph = ["model.xml", "model.bin"] if backend == "openvino" else ["model.onnx"]
    missing = [f for f in graph if not (directory / f).exists()]
    if not (directory / "tokenizer.json").exists() and not (directory / "vocab.txt").exists():
        missing.append("tokenizer.json or vocab.txt")
    return missing


def resolve_model(name_or_path: str, root: Path = DEFAULT_ROOT) -> Path:
    """A model directory for ``--model``: an existing path as is, a registry name as root/<slug>.

    Raises ModelNotFoundError saying how to install a registry model that is not there yet.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    entry = REGISTRY.get(name_or_path)
    if entry is None:
        raise ModelNotFoundError(f"model {name_or_path!r}: directory {path} does not exist and it is not a "
                                 f"registry name; known names: {sorted(REGISTRY)}")
    directory = Path(root) / entry.slug
    missing = installed_files(directory, entry.backend)
    if missing:
        raise ModelNotFoundError(
            f"model {entry.name!r} is not installed: {directory} lacks {', '.join(missing)}.\n"
            f"1. Get the weights (not downloaded by this tool): {entry.weights}.\n"
            f"2. Install the conversion tools: {entry.convert_requires}\n"
            f"3. Convert into {directory}: {entry.convert_command(Path(root))}\n"
            f"   (SRC is the directory from step 1.)"
        )
    return directory
