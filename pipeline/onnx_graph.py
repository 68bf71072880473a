"""What an ONNX graph declares, read from its protobuf without loading it: its inputs' shapes and its op types.

The onnx package is not a core dependency, and loading a graph parses every weight; here weights are skipped by
their length, so a graph of any size costs a few reads of its header fields. Enough to resolve a served model
without an inference session (``pipeline.served``) and to tell an ONNX Runtime int8 graph from a float one
(``pipeline.backends``).
"""

from __future__ import annotations

import mmap
from functools import lru_cache
from pathlib import Path

# Ops of ONNX Runtime's dynamic quantization (quantize_dynamic, and what its graph optimizer fuses them into)
DYNAMIC_INT8_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                              "QAttention", "DynamicQuantizeLSTM"})
# Ops of a statically quantized graph (QDQ, or QOperator form)
STATIC_INT8_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QGemm", "QLinearConv",
                             "QLinearAdd", "QEmbedLayerNormalization"})


def quantization(model_file: Path) -> str | None:
    """"dynamic" or "static" for an int8 graph (by the ops it holds), None for a float graph."""
    ops = op_types(Path(model_file))
    if ops & DYNAMIC_INT8_OPS or "MatMulInteger" in ops:
        return "dynamic"
    if ops & STATIC_INT8_OPS:
        return "static"
    return None


def op_types(model_file: Path) -> frozenset[str]:
    stat = Path(model_file).stat()
    return _op_types(str(model_file), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _op_types(path: str, size: int, mtime_ns: int) -> frozenset[str]:
    def read(buf):
        graph = _field(buf, 0, len(buf), 7)  # ModelProto.graph
        if graph is None:
            raise ValueError("no graph in the protobuf")
        ops = set()
        for number, start, end in _fields(buf, *graph):
            if number == 1:  # GraphProto.node: NodeProto, op_type is field 4
                op = _field(buf, start, end, 4)
                if op is not None:
                    ops.add(bytes(buf[op[0]:op[1]]).decode())
        return frozenset(ops)

    return _read(Path(path), read)


def _read(model_file: Path, read):
    from .session import ModelLoadError

    try:
        with open(model_file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return read(buf)
    except (ValueError, IndexError, UnicodeDecodeError, OSError) as exc:
        raise ModelLoadError(f"{model_file}: not a loadable ONNX model ({exc})") from exc


def input_shapes(model_file: Path) -> dict[str, list[int | str | None]]:
    """An ONNX graph's inputs (initializers excluded) and their dimensions: an int, a symbolic name, or None."""
    return _read(Path(model_file), _graph_inputs)


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
