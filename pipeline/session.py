"""One ONNX Runtime session for a QA graph, with its inputs and outputs read from the graph.

Accepted input names (by role): input_ids | input_ids:0; attention_mask | input_mask;
token_type_ids | segment_ids (optional: DistilBERT-style graphs have none). Outputs:
start_logits/end_logits by name, else the graph's two outputs in that order. A model
directory's qa_spec.json may name them explicitly ("inputs"/"outputs": {role: graph name}).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.cpu import KernelOptions, kernel_options

INPUT_ROLES = {
    "input_ids": ("input_ids", "input_ids:0", "ids", "input_word_ids"),
    "attention_mask": ("attention_mask", "input_mask", "attention_mask:0", "input_mask:0"),
    "token_type_ids": ("token_type_ids", "segment_ids", "token_type_ids:0", "segment_ids:0", "input_type_ids"),
}
# output_s/output_e: Open Model Zoo BERT IRs.
OUTPUT_ROLES = {"start_logits": ("start_logits", "output_start_logits", "output_s"),
                "end_logits": ("end_logits", "output_end_logits", "output_e")}
# The session config entry behind KernelOptions.exact_u8u8 (ONNX Runtime's x64 exact int8 kernels).
EXACT_U8U8_KEY = "session.x64quantprecision"
# Whether idle intra-op pool threads busy-wait for the next op; the job turns it off (session_options).
ALLOW_SPINNING_KEY = "session.intra_op.allow_spinning"
_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


class ModelLoadError(ValueError):
    """The model file cannot serve as an extractive QA graph; the message names the file."""


def session_options(threads: int, kernels: KernelOptions | None = None) -> ort.SessionOptions:
    """Threads pinned to what the actor was given: ONNX Runtime ignores OMP_NUM_THREADS and,
    left alone, takes every core in every actor so that actors fight.

    ``kernels``: the int8 kernel options; by default those pipeline.cpu chooses for this CPU (read once
    per process). Given ones override that choice, to measure what the exact kernels cost.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No busy-waiting between batches: the actor tokenizes and decodes on the same cores.
    opts.add_session_config_entry(ALLOW_SPINNING_KEY, "0")
    # x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake) multiply u8 x s8 with a 16-bit saturating
    # pair sum: int8 graphs then give different, worse answers there than on VNNI/AMX CPUs (docs/log/,
    # "int8 on a CPU without VNNI"). There ONNX Runtime is asked for its exact u8 x u8 kernels, which give the
    # model card's answers. Only there: on VNNI/AMX CPUs, whose fast kernel is already exact, the option only
    # costs throughput (a slower kernel in place of VNNI/AMX), so pipeline.cpu leaves it off on those.
    if (kernel_options() if kernels is None else kernels).exact_u8u8:
        opts.add_session_config_entry(EXACT_U8U8_KEY, "1")
    return opts


def asks_exact_u8u8(opts: ort.SessionOptions) -> bool:
    """Whether these session options ask for the exact u8 x u8 int8 kernels."""
    try:
        return opts.get_session_config_entry(EXACT_U8U8_KEY) == "1"
    except RuntimeError:  # ONNX Runtime's answer for an entry never set
        return False


def resolve_inputs(model_file: Path, graph_inputs: list[str],
                   input_names: dict[str, str] | None = None) -> dict[str, str]:
    """Role -> graph input name, by the names in INPUT_ROLES or those given (qa_spec.json "inputs").

    Shared by every backend so that a graph is accepted or refused the same way whatever runs it.
    """
    inputs: dict[str, str] = {}
    for role, candidates in INPUT_ROLES.items():
        name = (input_names or {}).get(role) or next((c for c in candidates if c in graph_inputs), None)
        if name is not None:
            if name not in graph_inputs:
                raise ModelLoadError(f"{model_file}: input {name!r} for {role} is not in the graph "
                                     f"(inputs: {sorted(graph_inputs)})")
            inputs[role] = name
    if "input_ids" not in inputs or "attention_mask" not in inputs:
        raise ModelLoadError(
            f"{model_file}: cannot find token-id and attention-mask inputs among {sorted(graph_inputs)}; "
            f"expected one of {INPUT_ROLES['input_ids']} and one of {INPUT_ROLES['attention_mask']}, "
            "or name them in qa_spec.json under \"inputs\""
        )
    unknown = set(graph_inputs) - set(inputs.values())
    if unknown:
        raise ModelLoadError(f"{model_file}: graph inputs {sorted(unknown)} have no known role; "
                             "name them in qa_spec.json under \"inputs\"")
    return inputs


def resolve_outputs(model_file: Path, graph_outputs: list[str],
                    output_names: dict[str, str] | None = None) -> list[str]:
    """[start name, end name]: by the names in OUTPUT_ROLES or those given, else the graph's two outputs in order."""
    out_names = dict(output_names or {})
    for role, candidates in OUTPUT_ROLES.items():
        out_names.setdefault(role, next((c for c in candidates if c in graph_outputs), None))
    if None in out_names.values():
        if len(graph_outputs) != 2:
            raise ModelLoadError(f"{model_file}: expected outputs start_logits/end_logits or exactly two "
                                 f"outputs, found {graph_outputs}")
        out_names = {"start_logits": graph_outputs[0], "end_logits": graph_outputs[1]}
    return [out_names["start_logits"], out_names["end_logits"]]


def run_in_chunks(infer: Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]],
                  inputs: dict[str, str], dtypes: dict[str, type], fixed_batch: int | None,
                  feeds_all: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Feeds ``infer`` (graph-name feed -> start, end) chunks of a batch; logits float32 [batch, seq].

    Splits the batch when the graph fixes its batch size, padding a short last chunk with empty rows.
    """
    n_all = len(feeds_all["input_ids"])
    step = fixed_batch or n_all
    starts, ends = [], []
    for b0 in range(0, n_all, max(1, step)):
        chunk = {role: feeds_all[role][b0 : b0 + step] for role in inputs}
        n = len(chunk["input_ids"])
        if fixed_batch and n < fixed_batch:
            chunk = {r: np.concatenate([a, np.zeros((fixed_batch - n, *a.shape[1:]), a.dtype)])
                     for r, a in chunk.items()}
        s, e = infer({inputs[r]: np.ascontiguousarray(a, dtype=dtypes[r]) for r, a in chunk.items()})
        starts.append(s.reshape(s.shape[0], -1)[:n])
        ends.append(e.reshape(e.shape[0], -1)[:n])
    return np.concatenate(starts).astype(np.float32, copy=False), np.concatenate(ends).astype(np.float32, copy=False)


class QASession:
    """Runs start/end logits for batches of windows: int arrays [batch, seq] in, float32 out."""

    def __init__(self, model_file: str | Path, threads: int = 1,
                 input_names: dict[str, str] | None = None, output_names: dict[str, str] | None = None,
                 kernels: KernelOptions | None = None):
        self.model_file = Path(model_file)
        try:
            self._session = ort.InferenceSession(
                str(self.model_file), sess_options=self._options(threads, kernels),
                providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelLoadError(f"{self.model_file}: not a loadable ONNX model ({exc})") from exc
        graph_inputs = {i.name: i for i in self._session.get_inputs()}
        self.inputs: dict[str, str] = resolve_inputs(self.model_file, list(graph_inputs), input_names)
        self.dtypes = {role: _DTYPES.get(graph_inputs[name].type) for role, name in self.inputs.items()}
        for role, dtype in self.dtypes.items():
            if dtype is None:
                raise ModelLoadError(f"{self.model_file}: input {self.inputs[role]!r} has type "
                                     f"{graph_inputs[self.inputs[role]].type}; expected int64 or int32")
        shape = graph_inputs[self.inputs["input_ids"]].shape
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.fixed_seq_len = shape[1] if len(shape) > 1 and isinstance(shape[1], int) else None
        self.seq_multiple = 1  # batch lengths as they come (pipeline.cpu: only OpenVINO's are padded)
        self.static_shapes = False  # one session for every batch shape (pipeline/shapes.py: OpenVINO only)
        self.outputs = resolve_outputs(self.model_file, [o.name for o in self._session.get_outputs()], output_names)

    def _options(self, threads: int, kernels: KernelOptions | None) -> ort.SessionOptions:
        """The options the session opens with (session_options); a subclass may change them first."""
        return session_options(threads, kernels)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray,
            token_type_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits float32 [batch, seq]. Splits the batch when the graph fixes its batch size."""
        feeds_all = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return run_in_chunks(lambda feed: tuple(self._session.run(self.outputs, feed)),
                             self.inputs, self.dtypes, self.fixed_batch, feeds_all)
