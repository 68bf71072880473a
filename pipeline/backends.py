"""Which runtime serves a model, at which precision, from which graph file: the one table of backends.

Cheap to import (no runtime is imported until a session is made), so the command line takes its choices
from here; ``resolve_backend`` is the one check of a backend x precision pair. A job's served model is resolved
from these rules in ``pipeline.served``.

Precisions, and the graph each reads from a model directory (``graph_file``):

A precision names what runs. Whether an ONNX graph is int8 is read from the ops it holds
(``pipeline.onnx_graph.quantization``), so a name is never put on a graph that computes otherwise.

- fp32: a float graph in f32: the directory's ``model.onnx`` when it is a float graph, else its
  ``model-fp32.onnx`` (our exports keep the float graph there beside ONNX Runtime's int8 ``model.onnx``); a
  directory with neither refuses fp32 rather than serve int8 under that name. OpenVINO reads ``model-fp32.onnx``
  first: it cannot read ONNX Runtime's int8 ops.
- int8-dynamic: ONNX Runtime only; the directory's ``model.onnx`` when it is ONNX Runtime's dynamic int8 graph
  (``quantize_dynamic``: int8 weights, activation scales per batch tensor), as our exports' is.
  Records and cards written before the name existed call it ``onnxruntime fp32`` ("the graph as it is"); they
  are read as this (``legacy_as_is``).
- int8-static: ONNX Runtime only; ``model.onnx`` when it is a statically quantized graph (QDQ or QOperator ops).
- bf16: OpenVINO only; the fp32 graph with bfloat16 matmuls where the CPU has them, f32 elsewhere.
- int8: OpenVINO only; ``model-int8.xml``, the NNCF post-training int8 IR that ``python -m models.convert``
  writes (``--quantize int8``, or ``--openvino-int8 DIR`` for an existing directory); what is not quantized
  (softmax, layer norms, GELU, the attention products) runs in f32.
- int8-bf16: OpenVINO only; the same IR, with what is not quantized in bfloat16 where the CPU has bfloat16
  matmuls (on AMX the fastest variant on BERT-base-sized models: models/README.md). ONNX Runtime's int8
  graphs are int8-dynamic, int8-static and int8-7bit.
- int8-7bit: ONNX Runtime only; ``model-int8-7bit.onnx``, dynamic int8 like our ``model.onnx`` with weights in
  -64..64 (``models.convert --quantize int8`` writes it, ``--int8-7bit DIR`` adds it). With 7-bit weights the
  fast u8 x s8 kernel cannot saturate on CPUs without VNNI, so it runs there instead of the exact u8 x u8
  kernels the 8-bit graph needs (pipeline/cpu.py): faster, and exact on every CPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path

from .cpu import KernelOptions
from .model_dir import FP32_GRAPH, ModelDirError, find_model_file, load_spec
from .onnx_graph import quantization
from .precision import (
    AUTO,  # one word for "chosen for you": the backend by the graph, the precision per job
    BF16_PRECISIONS,
    Variant,
)


@dataclass(frozen=True)
class Backend:
    """One runtime: the graph files it reads, the precisions it computes, and how to install it."""

    name: str
    label: str  # as its makers write it, for messages
    suffixes: tuple[str, ...]  # graph files it can read
    precisions: tuple[str, ...]
    extra: str | None  # the pyproject extra that installs it (pipeline.extras); None for a core dependency
    # Tokens (padding included) per inference call, when --batch-tokens is not given: ONNX Runtime is fastest
    # on small batches that keep activations in cache, OpenVINO on larger ones (docs/log/: token budget).
    batch_tokens: int


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("onnxruntime", "ONNX Runtime", (".onnx",), ("fp32", "int8-dynamic", "int8-static", "int8-7bit"), None,
            512),
    Backend("openvino", "OpenVINO", (".onnx", ".xml"), ("fp32", "bf16", "int8", "int8-bf16"), "openvino", 2048),
)}
# --backend auto: OpenVINO for an IR (model.xml), ONNX Runtime for ONNX, or as qa_spec.json's "backend" says
BACKEND_CHOICES = (AUTO, *BACKENDS)
# fp32: a float graph; bf16: bfloat16 matmuls where the CPU has them; int8: the directory's NNCF int8 IR;
# int8-bf16: that IR with bfloat16 for the rest; int8-dynamic / int8-static: ONNX Runtime's int8 model.onnx;
# int8-7bit: its dynamic int8 graph with 7-bit weights (see the module docstring).
PRECISIONS = ("fp32", "bf16", "int8", "int8-bf16", "int8-dynamic", "int8-static", "int8-7bit")
ORT_INT8_PRECISIONS = {"dynamic": "int8-dynamic", "static": "int8-static"}  # by pipeline.onnx_graph.quantization
# auto (the default): one of the above per job, chosen from the CPUs of the cluster's nodes (pipeline/precision.py)
PRECISION_CHOICES = (AUTO, *PRECISIONS)
# OpenVINO's INFERENCE_PRECISION_HINT per precision: always explicit, because left alone OpenVINO runs bf16 on
# CPUs with AMX/AVX512-BF16 and answers would then depend on which node an actor lands on. int8: the IR's
# quantized ops run in int8, the rest (softmax, layer norms, GELU) in f32 on every CPU; int8-bf16: in bf16.
OPENVINO_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32", "int8-bf16": "bf16"}
assert {p for p, hint in OPENVINO_PRECISION_HINTS.items() if hint == "bf16"} == set(BF16_PRECISIONS)
OPENVINO_INT8_PRECISIONS = ("int8", "int8-bf16")  # read the NNCF int8 IR
OPENVINO_INT8_GRAPH = "model-int8.xml"  # with model-int8.bin; written by models.convert (NNCF)
INT8_7BIT_GRAPH = "model-int8-7bit.onnx"  # written by models.convert (onnxruntime's quantize_dynamic, reduce_range)
# The int8 kernels for a graph with 7-bit weights on any CPU: the fast one, which cannot saturate there.
SEVEN_BIT_KERNELS = KernelOptions(False, "7-bit weights: the fast u8 x s8 kernel cannot saturate")


def resolve_backend(backend: str, precision: str) -> str:
    """Checks the pair once; returns the backend, which a precision may decide (bf16 and the int8 IR's
    precisions run only on OpenVINO, int8-7bit only on ONNX Runtime).

    Still "auto" when the graph file decides (see ``runtime_for``).
    """
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {PRECISION_CHOICES}, got {precision!r}")
    if precision == AUTO:  # chosen per job (pipeline/precision.py), among this backend's variants
        return backend
    able = [b for b in BACKENDS.values() if precision in b.precisions]
    if backend == AUTO:
        return able[0].name if len(able) == 1 else AUTO
    if backend not in [b.name for b in able]:
        hint = (f"; {BACKENDS[backend].label} serves its int8 graph (our exports' model.onnx) at --precision "
                "int8-dynamic, and its 7-bit one at --precision int8-7bit"
                ) if precision == "int8" and backend == "onnxruntime" else ""
        raise ValueError(f"precision {precision} runs on the {' or '.join(b.label for b in able)} backend; "
                         f"{BACKENDS[backend].label} computes these graphs in their own precision "
                         f"(drop --backend {backend}, or --precision {precision}){hint}")
    return backend


def graph_file(model: str | Path, backend: str, precision: str = "fp32") -> Path:
    """The graph a backend reads at a precision from a model directory (or the graph file given).

    OpenVINO reads a directory's ``model-fp32.onnx`` when it has one: our exports' ``model.onnx`` is ONNX
    Runtime's int8 graph (com.microsoft QAttention and friends), which OpenVINO cannot read; the fp32 graph
    beside it is the same model. At int8 it reads the directory's ``model-int8.xml``. A directory without the
    graph a precision names refuses it rather than serve another graph under that name; so does a graph file
    given whose ops say otherwise.
    """
    d = Path(model)
    if precision == "int8-7bit" and d.is_dir():
        if not (d / INT8_7BIT_GRAPH).exists():
            raise ModelDirError(
                f"{d}: no {INT8_7BIT_GRAPH} (int8 with 7-bit weights) for --precision int8-7bit; make it with "
                f"python -m models.convert --int8-7bit {d}, or serve the directory's graph as it is with "
                "--precision auto")
        return d / INT8_7BIT_GRAPH
    if backend == "openvino" and d.is_dir():
        if precision in OPENVINO_INT8_PRECISIONS:
            if not (d / OPENVINO_INT8_GRAPH).exists():
                raise ModelDirError(
                    f"{d}: no {OPENVINO_INT8_GRAPH} (the OpenVINO int8 IR) for --precision {precision}; make it with "
                    f"python -m models.convert --openvino-int8 {d} (needs pip install nncf), or serve the "
                    "directory's graph as it is with --precision auto")
            return find_model_file(d / OPENVINO_INT8_GRAPH)  # checks its .bin
        if (d / FP32_GRAPH).exists():
            return d / FP32_GRAPH
    main = find_model_file(d)
    if main.suffix != ".onnx" or precision in OPENVINO_INT8_PRECISIONS or precision == "int8-7bit":
        return main  # an IR; or a graph file given for the OpenVINO IR's or the 7-bit precisions: as it is
    kind = quantization(main)
    named = ORT_INT8_PRECISIONS.get(kind, "fp32")
    if precision in ("fp32", "bf16") and kind is not None:
        if d.is_dir() and (d / FP32_GRAPH).exists():
            return d / FP32_GRAPH
        raise ModelDirError(f"{main} is ONNX Runtime {kind} int8 (its ops say so) and {d} has no {FP32_GRAPH}: "
                            f"serve it as it is with --precision {named}, or export the float graph beside it")
    if precision in ORT_INT8_PRECISIONS.values() and precision != named:
        raise ModelDirError(f"{main} is {'a float graph' if kind is None else f'{kind} int8'}, not {precision}: "
                            f"serve it with --precision {named}")
    return main


def servable_variants(model: str | Path, backend: str = AUTO) -> frozenset[Variant]:
    """The (backend, precision) pairs a model directory has graphs for, as ``--precision auto`` may choose them
    (``--backend`` narrows them to one runtime). A graph file given is served only as it is.

    ONNX Runtime's fp32 needs a float graph (a float ``model.onnx``, or ``model-fp32.onnx``), its int8
    precisions the int8 graph that ``model.onnx`` is. OpenVINO's fp32 and bf16 need ``model-fp32.onnx`` or an IR,
    as the converter writes them: auto does not move a directory that has only a float ``model.onnx`` (a user's
    export) to another runtime on the default model's measurements. OpenVINO's int8 and int8-bf16 need
    ``model-int8.xml``. Nothing OpenVINO unless it is installed.
    """
    d = Path(model)
    if not d.is_dir():
        return frozenset()
    main = find_model_file(d)
    kind = quantization(main) if main.suffix == ".onnx" else None
    found = set()
    if main.suffix == ".onnx":
        if kind is not None:
            found.add(Variant("onnxruntime", ORT_INT8_PRECISIONS[kind]))
        if kind is None or (d / FP32_GRAPH).exists():
            found.add(Variant("onnxruntime", "fp32"))
    if (d / INT8_7BIT_GRAPH).exists():
        found.add(Variant("onnxruntime", "int8-7bit"))
    if importlib.util.find_spec("openvino") is not None:
        if main.suffix == ".xml" or (d / FP32_GRAPH).exists():
            found |= {Variant("openvino", "fp32"), Variant("openvino", "bf16")}
        if (d / OPENVINO_INT8_GRAPH).exists():
            found |= {Variant("openvino", p) for p in OPENVINO_INT8_PRECISIONS}
    return frozenset(v for v in found if backend in (AUTO, v.backend))


def graph_as_is(model: str | Path, backend: str = AUTO) -> Variant:
    """The variant that serves a model's own graph in its own arithmetic: what ``--precision auto`` falls back
    to without measurements (and what the job served before auto existed)."""
    model_file = find_model_file(model)
    runtime = runtime_for(model_file, load_spec(model_file).spec, resolve_backend(backend, "fp32"))
    kind = quantization(model_file) if model_file.suffix == ".onnx" and runtime == "onnxruntime" else None
    return Variant(runtime, ORT_INT8_PRECISIONS[kind] if kind else "fp32")


def legacy_as_is(model: str | Path) -> Variant:
    """What ``onnxruntime fp32`` meant in records and cards written before precisions named what runs: ONNX
    Runtime serving the directory's graph as it is."""
    return graph_as_is(model, "onnxruntime")


def runtime_for(model_file: Path, spec: dict, backend: str) -> str:
    """The backend that serves ``model_file``: as resolved, else qa_spec.json's, else by the file's suffix."""
    if backend != AUTO:
        return backend
    return spec.get("backend") or ("openvino" if model_file.suffix == ".xml" else "onnxruntime")


def open_session(model_file: Path, backend: str, threads: int, input_names: dict[str, str],
                 output_names: dict[str, str], precision: str = "fp32", shapes: str = "dynamic"):
    """A session of ``backend`` (a name in BACKENDS): ``run(ids, mask, types) -> (start, end)``, ``fixed_seq_len``,
    ``seq_multiple`` (the multiple batch lengths are padded up to), ``static_shapes``."""
    if backend == "openvino":
        from .openvino_session import OpenVinoQASession

        return OpenVinoQASession(model_file, threads, input_names, output_names, precision, shapes == "static")
    from .session import QASession

    return QASession(model_file, threads, input_names, output_names, kernels=kernels_for(model_file))


def kernels_for(model_file: Path) -> KernelOptions | None:
    """ONNX Runtime's int8 kernel options for a graph: the fast kernel for the 7-bit graph, however it was asked
    for (``--precision int8-7bit``, or the file itself as ``--model``); None leaves the choice to pipeline.cpu."""
    return SEVEN_BIT_KERNELS if Path(model_file).name == INT8_7BIT_GRAPH else None


def load_model(model_dir: str | Path, threads: int = 1, overrides: dict | None = None,
               backend: str = AUTO, precision: str | None = None, shapes: str = "dynamic"):
    """(spec, session) for a model directory (or a graph file inside one), for tools and tests that answer
    in-process: the variant ``backend``/``precision`` name (no precision: the graph as it is) with ``shapes``
    (pipeline/shapes.py), resolved and opened as a job's actors do (``pipeline.served``)."""
    from .served import open_variant, variant_for

    variant = graph_as_is(model_dir, backend) if precision is None else variant_for(str(model_dir), backend, precision)
    return open_variant(str(model_dir), replace(variant, shapes=shapes), threads, overrides)
