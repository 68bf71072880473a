"""The model a job serves, resolved once on the driver into one value: ``ServedModel``.

Which graph file, which backend, which precision, the spec (windows, tokenizer, the graph's input names) and the
hashes of the files the answers depend on. Resolving opens no inference session: the one thing a spec needs from
the graph, a sequence length it fixes, is read from the graph's declared inputs (the ONNX protobuf's input list,
or an OpenVINO IR read without compiling). The actors receive this value and open exactly its graph, after
checking that the files still hash as planned (``ServedModel.open``), so a model directory changed between
planning and answering is refused instead of served.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

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
                            v.precision)


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
    model_file = graph_file(directory, resolved, precision)
    return Variant(runtime_for(model_file, load_spec(model_file).spec, resolved), precision)


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

    shapes = _xml_input_shapes(model_file) if model_file.suffix == ".xml" else onnx_input_shapes(model_file)
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


def onnx_input_shapes(model_file: Path) -> dict[str, list[int | str | None]]:
    """An ONNX graph's inputs (initializers excluded) and their dimensions: an int, a symbolic name, or None.

    Read from the protobuf's graph fields directly: the onnx package is not a core dependency, and loading a
    graph parses every weight; here weights are skipped by their length, so a graph of any size costs a few
    reads of its header fields.
    """
    from .session import ModelLoadError

    try:
        with open(model_file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _graph_inputs(buf)
    except (ValueError, IndexError, UnicodeDecodeError, OSError) as exc:
        raise ModelLoadError(f"{model_file}: not a loadable ONNX model ({exc})") from exc


def _graph_inputs(buf) -> dict[str, list[int | str | None]]:
    graph = _field(buf, 0, len(buf), 7)  # ModelProto.graph
    if graph is None:
        raise ValueError("no graph in the protobuf")
    inputs, initializers = [], set()
    for number, start, end in _fields(buf, *graph):
        if number == 11:  # GraphProto.input: ValueInfoProto
            inputs.append(_value_info(buf, start, end))
        elif number == 5:  # GraphProto.initializer: TensorProto, name is field 8
            name = _field(buf, start, end, 8)
            if name is not None:
                initializers.add(bytes(buf[name[0]:name[1]]).decode())
    return {name: dims for name, dims in inputs if name not in initializers}


def _value_info(buf, start: int, end: int) -> tuple[str, list]:
    name = _field(buf, start, end, 1)
    dims: list = []
    kind = _field(buf, start, end, 2)  # TypeProto
    tensor = _field(buf, *kind, 1) if kind else None  # TypeProto.tensor_type
    shape = _field(buf, *tensor, 2) if tensor else None  # TypeProto.Tensor.shape
    if shape:
        for number, s, e in _fields(buf, *shape):
            if number != 1:  # TensorShapeProto.dim
                continue
            value = None
            for n, vs, ve in _fields(buf, s, e):
                if n == 1:  # dim_value (a varint field: its bytes decoded again)
                    value, _ = _varint(buf, vs)
                elif n == 2:  # dim_param
                    value = bytes(buf[vs:ve]).decode()
            dims.append(value)
    return (bytes(buf[name[0]:name[1]]).decode() if name else ""), dims


def _varint(buf, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, start, end) of each field of a message; a varint field's span is its encoded bytes."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, j = _varint(buf, i)
            yield number, i, j
            i = j
        elif wire == 1:
            yield number, i, i + 8
            i += 8
        elif wire == 2:
            length, i = _varint(buf, i)
            yield number, i, i + length
            i += length
        elif wire == 5:
            yield number, i, i + 4
            i += 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        if i > end:
            raise ValueError("a field runs past its message")


def _field(buf, start: int, end: int, number: int) -> tuple[int, int] | None:
    """The span of the first field ``number`` of a message, else None."""
    return next(((s, e) for n, s, e in _fields(buf, start, end) if n == number), None)
