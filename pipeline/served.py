"""The model a job serves, resolved once on the driver into one value: ``ServedModel``.

Which graph file, which backend, which precision, the spec (windows, tokenizer, the graph's input names) and the
hashes of the files the answers depend on. Resolving opens no inference session: the one thing a spec needs from
the graph, a sequence length it fixes, is read from the graph's declared inputs (the ONNX protobuf's input list,
or an OpenVINO IR read without compiling). The actors receive this value and open exactly its graph, after
checking that the files still hash as planned (``ServedModel.open``), so a model directory changed between
planning and answering is refused instead of served.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import onnx_graph
from .backends import BACKENDS, graph_file, open_session, resolve_backend, runtime_for
from .model_dir import SPEC_FILE, ModelDirError, ModelSpec, file_sha256, load_spec
from .precision import PrecisionChoice, Variant
from .records import ModelHashes


class ModelChangedError(ModelDirError):
    """A model file changed after the job planned it."""


@dataclass(frozen=True)
class ServedModel:
    """One variant of one model directory, as a job serves it."""

    directory: str  # as resolved (a directory, or a graph file inside one)
    choice: PrecisionChoice  # the variant, how it was asked for, and why
    spec: ModelSpec  # spec.model_file is the graph served
    hashes: ModelHashes
    batch_tokens: int  # tokens per inference call (padding included)

    @property
    def variant(self) -> Variant:
        return self.choice.variant

    @property
    def graph(self) -> Path:
        return self.spec.model_file

    @property
    def graph_bytes(self) -> int:
        """The graph's size on disk (an OpenVINO IR keeps its weights in the .bin beside it)."""
        files = [self.graph, self.graph.with_suffix(".bin")]
        return sum(f.stat().st_size for f in files if f.exists())

    def identity(self) -> dict:
        """What the manifest records to say which model answered."""
        return {**self.spec.identity(hashes=self.hashes), "variant": str(self.variant)}

    def check_unchanged(self) -> None:
        """Raise ModelChangedError if a file the answers depend on no longer hashes as planned."""
        now = model_hashes(self.spec)
        for name, planned in vars(self.hashes).items():
            found = getattr(now, name)
            if found != planned:
                what = name.removesuffix("_sha256")
                raise ModelChangedError(
                    f"model {self.directory}: its {what} file changed after the job planned it (sha256 {found}, "
                    f"planned {planned}); the job serves one model throughout: run it again")

    def open(self, threads: int):
        """A session on exactly this graph (ONNX Runtime or OpenVINO), after checking its files."""
        self.check_unchanged()
        v = self.variant
        return open_session(self.graph, v.backend, threads, self.spec.input_names, self.spec.output_names,
                            v.precision, v.shapes)


def model_hashes(spec: ModelSpec) -> ModelHashes:
    graph = spec.model_file
    spec_file = spec.directory / SPEC_FILE
    return ModelHashes(file_sha256(graph),
                       file_sha256(graph.with_suffix(".bin")) if graph.suffix == ".xml" else None,
                       file_sha256(spec.tokenizer_file),
                       file_sha256(spec_file) if spec_file.exists() else None)


def resolve(directory: str, choice: PrecisionChoice, overrides: dict | None = None,
            batch_tokens: int | None = None) -> ServedModel:
    """``choice``'s variant of the model at ``directory``: its graph, spec and hashes. No session is opened."""
    v = choice.variant
    model_file = graph_file(directory, v.backend, v.precision)
    probe = load_spec(model_file, overrides=overrides)
    spec = load_spec(model_file, fixed_seq_len=fixed_seq_len(model_file, probe.input_names), overrides=overrides)
    return ServedModel(str(directory), choice, spec, model_hashes(spec), batch_tokens or BACKENDS[v.backend].batch_tokens)


def variant_for(directory: str, backend: str, precision: str) -> Variant:
    """The variant a forced ``--backend``/``--precision`` pair names for a model directory."""
    resolved = resolve_backend(backend, precision)
    spec = load_spec(directory)  # the directory's files first: a missing tokenizer is named before the graph is read
    model_file = graph_file(directory, resolved, precision)
    return Variant(runtime_for(model_file, spec.spec, resolved), precision)


def serve(directory: str, backend: str = "auto", precision: str = "fp32", overrides: dict | None = None,
          batch_tokens: int | None = None) -> ServedModel:
    """The model a forced ``backend``/``precision`` pair serves from a directory (tools and tests)."""
    variant = variant_for(str(directory), backend, precision)
    return resolve(str(directory), PrecisionChoice(variant, precision, "asked for"), overrides, batch_tokens)


def open_variant(directory: str, variant: Variant, threads: int = 1, overrides: dict | None = None):
    """(spec, session) for a variant of a model directory: tools and tests that answer in-process."""
    served = resolve(directory, PrecisionChoice(variant, variant.precision, "asked for"), overrides)
    return served.spec, served.open(threads)


# ------------------------------------------------------------------------------ the graph's declared inputs


def fixed_seq_len(model_file: Path, input_names: dict[str, str] | None = None) -> int | None:
    """The sequence length the graph fixes on its token-id input, if any, read without a session."""
    from .session import resolve_inputs

    shapes = _xml_input_shapes(model_file) if model_file.suffix == ".xml" else onnx_graph.input_shapes(model_file)
    ids = resolve_inputs(model_file, list(shapes), input_names)["input_ids"]
    dims = shapes[ids]
    return dims[1] if len(dims) > 1 and isinstance(dims[1], int) and dims[1] > 0 else None


def _xml_input_shapes(model_file: Path) -> dict[str, list[int | None]]:
    """An OpenVINO model's inputs and their dimensions (None: dynamic), from ``read_model``: nothing compiled."""
    from .openvino_session import INPUT_ROLES, _openvino, _port_name, _static

    model = _openvino().Core().read_model(str(model_file))
    wanted = {n for names in INPUT_ROLES.values() for n in names}
    out = {}
    for port in model.inputs:
        shape = port.get_partial_shape()
        out[_port_name(port, wanted)] = [_static(d) for d in shape] if shape.rank.is_static else []
    return out
