"""Useful FLOPs of a BERT-family encoder: what a window of real tokens costs, counted from the graph."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MATMUL_OPS = {"MatMul", "Gemm", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
              "QLinearMatMul", "Attention", "QAttention", "FusedMatMul"}


@dataclass(frozen=True)
class FlopModel:
    """Useful FLOPs of a BERT-family encoder on a window of n real (non-padding) tokens:

        2 * P * n  +  4 * L * A * n**2

    P is the number of weights that take part in a matrix multiply (every MatMul/Gemm weight of the
    graph: Q, K, V, attention output, both FFN layers, the QA head; embeddings are lookups, not
    matmuls), each costing one multiply and one add per token. The second term is attention:
    per layer Q @ K^T and softmax(QK^T) @ V each cost n * n * A multiply-adds, A being the attention
    width (heads x head size, the hidden size for BERT). Softmax, GELU, LayerNorm and quantization
    are left out: they are a few per cent and not what a matmul peak measures. Padding tokens are
    never counted, so a system that computes padding pays for it in GFLOP/s.
    """

    matmul_params: int
    layers: int
    attention_width: int

    def flops(self, lengths: np.ndarray) -> float:
        n = np.asarray(lengths, dtype=np.float64)
        return float((2.0 * self.matmul_params * n + 4.0 * self.layers * self.attention_width * n * n).sum())


def flop_model(model_file: Path) -> FlopModel:
    """P counted from the graph's matmul weights; L and A from config.json beside it, else from the graph
    (Softmax/Attention nodes, the first matmul weight's input width)."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    params, first_width = 0, None
    for node in graph.node:
        if node.op_type in MATMUL_OPS:
            for name in node.input:
                if len(shapes.get(name, ())) == 2:
                    params += math.prod(shapes[name])
                    first_width = first_width or shapes[name][0]
    config_file = model_file.parent / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    layers = config.get("num_hidden_layers") or sum(n.op_type in ("Softmax", "Attention", "QAttention")
                                                   for n in graph.node)
    return FlopModel(params, int(layers), int(config.get("hidden_size") or first_width or 0))
