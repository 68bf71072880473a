"""One OpenVINO compiled model for a QA graph: the same interface and name rules as session.QASession.

Serves OpenVINO IR (model.xml + model.bin; e.g. Open Model Zoo's BERT-large SQuAD models, whose int8 variant
runs only here) and also plain ONNX files. Input and output roles are resolved by session.py's tables, so a
graph is accepted or refused the same way by both backends. ``openvino`` is a core dependency
(``--precision auto`` serves it where it is fastest), imported only when a session is made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .backends import BACKENDS, OPENVINO_INT8_PRECISIONS, OPENVINO_PRECISION_HINTS
from .cpu import seq_multiple
from .extras import require
from .session import INPUT_ROLES, OUTPUT_ROLES, ModelLoadError, resolve_inputs, resolve_outputs, run_in_chunks
from .shapes import STATIC_SEQ_MULTIPLE


def _openvino():
    return require("openvino", BACKENDS["openvino"].extra, "the OpenVINO backend (--backend openvino, --precision bf16, IR models)")


def compile_config(threads: int, precision: str = "fp32") -> dict:
    """CPU plugin settings for one answering actor.

    Threads are what the actor was given, with no pinning (several actors share a node's cores and pinning would
    stack them on the same ones). Precision is f32 unless bf16 is asked for: left alone, OpenVINO runs bf16 on
    CPUs with AMX/AVX512-BF16, and answers would then depend on which node an actor lands on. With "bf16" (and
    "int8-bf16", for the int8 IR) the float ops run in bfloat16 where the CPU has it and in f32 elsewhere;
    int8 IRs keep their int8 ops either way.
    """
    if precision not in OPENVINO_PRECISION_HINTS:
        raise ValueError(f"precision must be one of {sorted(OPENVINO_PRECISION_HINTS)}, got {precision!r}")
    return {
        "INFERENCE_NUM_THREADS": max(1, threads),
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": False,
        "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION_HINTS[precision],
    }


def split_fused_projections(model) -> int:
    """Rewrites ``x -> MatMul(W) -> Add(b) -> Split(last axis, n)`` as n MatMul + Add, one per output, in place;
    returns how many it rewrote.

    ONNX Runtime's fused Attention (our exports' ``model-fp32.onnx``) reaches OpenVINO as one query-key-value
    projection split three ways: the Split runs a reference kernel, and in an NNCF int8 IR the dequantizing
    multiplies behind it cannot fold into the projection. Three projections compute the same numbers (the same
    logits in f32 on the default model and BERT-base) and each becomes one FullyConnected with its
    dequantization fused, which made calls faster on AMX (docs/log/, "Batches padded to whole AMX tiles,
    attention projections split"). Graphs without the pattern (an int8 IR, whose weights are not plain
    constants) are left as they are.
    """
    ops = _openvino().opset13
    rewritten = 0
    for split in [op for op in model.get_ordered_ops() if op.get_type_name() == "Split"]:
        add = split.input_value(0).get_node()
        if add.get_type_name() != "Add":
            continue
        matmul, bias = (add.input_value(i).get_node() for i in (0, 1))
        if matmul.get_type_name() != "MatMul":
            matmul, bias = bias, matmul
        weights, axis = matmul.input_value(1).get_node(), split.input_value(1).get_node()
        rank = split.get_output_partial_shape(0).rank
        if (matmul.get_type_name() != "MatMul" or any(matmul.get_attributes().values())  # transposes
                or not all(n.get_type_name() == "Constant" for n in (bias, weights, axis)) or not rank.is_static
                or int(axis.get_data().reshape(-1)[0]) not in (-1, rank.get_length() - 1)):
            continue
        n = split.get_output_size()
        w, b = weights.get_data(), bias.get_data()
        if w.shape[-1] % n or b.shape[-1] != w.shape[-1]:
            continue
        x = matmul.input_value(0)
        for i, (w_i, b_i) in enumerate(zip(np.split(w, n, axis=-1), np.split(b, n, axis=-1))):
            part = ops.add(ops.matmul(x, ops.constant(np.ascontiguousarray(w_i)), False, False),
                           ops.constant(np.ascontiguousarray(b_i)))
            for target in list(split.output(i).get_target_inputs()):
                target.replace_source_output(part.output(0))
        rewritten += 1
    if rewritten:
        model.validate_nodes_and_infer_types()
    return rewritten


def transpose_weights(model) -> int:
    """Stores each ``MatMul(x, W)`` weight constant transposed (``MatMul(x, W.T, transpose_b=True)``), in place;
    returns how many it rewrote.

    The CPU plugin keeps fully connected weights as [out, in]: given ONNX's [in, out] it adds a Transpose whose
    folded f32 result each compiled model keeps beside its own packed copy. Stored transposed, a compiled model
    holds only the packed copy, which is what makes one compiled model per batch shape affordable (static shapes).
    The same products are computed.
    """
    ops = _openvino().opset13
    rewritten = 0
    for matmul in [op for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"]:
        weights = matmul.input_value(1).get_node()
        if weights.get_type_name() != "Constant" or any(matmul.get_attributes().values()):
            continue
        w = weights.get_data()
        if w.ndim != 2:
            continue
        product = ops.matmul(matmul.input_value(0), ops.constant(np.ascontiguousarray(w.T)), False, True)
        product.set_friendly_name(matmul.get_friendly_name())
        for target in list(matmul.output(0).get_target_inputs()):
            target.replace_source_output(product.output(0))
        rewritten += 1
    if rewritten:
        model.validate_nodes_and_infer_types()
    return rewritten


def _port_name(port, wanted: set[str]) -> str:
    """A port's name, preferring one of ``wanted`` (ports can carry several names, e.g. from the IR's history)."""
    names = port.get_names()
    return next((n for n in sorted(names) if n in wanted), None) or port.get_any_name()


def _static(dim) -> int | None:
    return dim.get_length() if dim.is_static else None


class OpenVinoQASession:
    """Runs start/end logits for batches of windows on OpenVINO: int arrays [batch, seq] in, float32 out.

    ``static_shapes`` (pipeline/shapes.py): a model compiled per batch shape, on its first batch of that shape,
    instead of one for every shape; lengths step by ``STATIC_SEQ_MULTIPLE`` at least, and the Answerer cuts
    batches to one row count per length, so the compiled models stay few.
    """

    def __init__(self, model_file: str | Path, threads: int = 1,
                 input_names: dict[str, str] | None = None, output_names: dict[str, str] | None = None,
                 precision: str = "fp32", static_shapes: bool = False):
        ov = _openvino()
        self.model_file = Path(model_file)
        core = ov.Core()
        try:
            model = core.read_model(str(self.model_file))
        except Exception as exc:  # openvino raises RuntimeError subclasses without a file in the message
            raise ModelLoadError(f"{self.model_file}: not a loadable OpenVINO IR or ONNX model ({exc})") from exc
        self.split_projections = split_fused_projections(model)
        wanted_in = {n for names in INPUT_ROLES.values() for n in names} | set((input_names or {}).values())
        graph_inputs = {_port_name(p, wanted_in): p for p in model.inputs}
        self.inputs: dict[str, str] = resolve_inputs(self.model_file, list(graph_inputs), input_names)
        dtypes = {ov.Type.i64: np.int64, ov.Type.i32: np.int32}
        self.dtypes = {}
        for role, name in self.inputs.items():
            element = graph_inputs[name].get_element_type()
            if element not in dtypes:
                raise ModelLoadError(f"{self.model_file}: input {name!r} has type {element}; expected i64 or i32")
            self.dtypes[role] = dtypes[element]
        shape = graph_inputs[self.inputs["input_ids"]].get_partial_shape()
        self.fixed_batch = _static(shape[0]) if shape.rank.is_static and len(shape) > 0 else None
        self.fixed_seq_len = _static(shape[1]) if shape.rank.is_static and len(shape) > 1 else None

        wanted_out = {n for names in OUTPUT_ROLES.values() for n in names} | set((output_names or {}).values())
        graph_outputs = {_port_name(p, wanted_out): p for p in model.outputs}
        self.outputs = resolve_outputs(self.model_file, list(graph_outputs), output_names)
        self._core, self._config = core, compile_config(threads, precision)
        # Static shapes: one compiled model per batch shape, compiled when first met (``_compiled_for``); the
        # Answerer then cuts batches to canonical shapes only (``Answerer.logits``), so their number stays bounded.
        self.static_shapes = bool(static_shapes) and not (self.fixed_batch or self.fixed_seq_len)
        self._shapes: dict[tuple[int, int], tuple] = {}
        if self.static_shapes:
            transpose_weights(model)
            self._model = model
            capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            wanted_bf16 = self._config["INFERENCE_PRECISION_HINT"] == "bf16"
            self.precision = "bf16" if wanted_bf16 and "BF16" in capabilities else "f32"
        else:
            compiled = self._compile(model)
            self._request = compiled.create_infer_request()
            self._out_ports = [compiled.outputs[list(graph_outputs).index(n)] for n in self.outputs]
            # What this CPU granted: "bf16", or "f32" where it has no bfloat16 matmuls.
            self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self._output_index = [list(graph_outputs).index(n) for n in self.outputs]
        # Batch lengths padded up to a multiple of this where the matmuls run on AMX tiles (bf16, or the int8 IR;
        # pipeline.cpu), 1 elsewhere: f32 matmuls run on AVX-512 and padding there only adds tokens.
        on_tiles = self.precision == "bf16" or precision in OPENVINO_INT8_PRECISIONS
        self.seq_multiple = seq_multiple() if on_tiles and not self.fixed_seq_len else 1
        if self.static_shapes:  # one compiled model per length: lengths in steps, so a job meets a few
            self.seq_multiple = max(self.seq_multiple, STATIC_SEQ_MULTIPLE)

    def _compile(self, model):
        try:
            return self._core.compile_model(model, "CPU", self._config)
        except Exception as exc:
            raise ModelLoadError(f"{self.model_file}: OpenVINO cannot compile it for CPU ({exc})") from exc

    def _compiled_for(self, batch: int, seq: int) -> tuple:
        """(infer request, output ports) of the model compiled for [batch, seq], compiled on first use."""
        if (batch, seq) not in self._shapes:
            model = self._model.clone()
            model.reshape({port: [batch, seq] for port in model.inputs})
            compiled = self._compile(model)
            self._shapes[batch, seq] = (compiled.create_infer_request(),
                                        [compiled.outputs[i] for i in self._output_index])
        return self._shapes[batch, seq]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray,
            token_type_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits float32 [batch, seq]. Splits the batch when the graph fixes its batch size."""
        feeds_all = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return run_in_chunks(self._infer, self.inputs, self.dtypes, self.fixed_batch, feeds_all)

    def _infer(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if self.static_shapes:
            request, ports = self._compiled_for(*next(iter(feed.values())).shape)
        else:
            request, ports = self._request, self._out_ports
        result = request.infer(feed)
        # Copies: the request reuses its output buffers on the next call.
        return np.array(result[ports[0]]), np.array(result[ports[1]])
