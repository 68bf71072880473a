"""Tiny random-weight BERT QA graphs written with the `onnx` package, and a WordPiece vocabulary.

Real ONNX Runtime sessions over real graphs, small enough to build in a test: 2 layers,
hidden 32, fixed seed. Options reproduce the quirks of the models users bring: input names,
no token-type input, a fixed [1, N] shape, int32 inputs, unnamed outputs, per-layer head counts.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WORDS = ["the", "what", "who", "when", "where", "which", "how", "is", "was", "are", "of", "in", "on", "at", "to", "a", "an", "and", "or", "by", "for", "from", "with", "city", "river", "france", "paris", "cafe", "naive", "year", "born", "king", "queen", "war", "first", "last", "name", "one", "two", "three"]


def vocab_tokens() -> list[str]:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *WORDS]


def write_vocab(directory: Path) -> Path:
    path = directory / "vocab.txt"
    path.write_text("\n".join(vocab_tokens()) + "\n", encoding="utf-8")
    return path


def write_tokenizer_json(directory: Path, lowercase: bool = True) -> Path:
    """The same vocabulary as a `tokenizers` tokenizer.json (BERT normalizer and template)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = {t: i for i, t in enumerate(vocab_tokens())}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    # Like real exports (MiniLM's pads to 128): the loader must clear these.
    tok.enable_truncation(128)
    tok.enable_padding(length=128)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def bert_qa_graph(
    vocab_size: int, hidden: int = 32, layers: int = 2, heads: list[int] | None = None, head_dim: int = 8,
    intermediate: int = 64, max_pos: int = 512, seed: int = 0,
    input_names: tuple[str, str, str | None] = ("input_ids", "attention_mask", "token_type_ids"),
    output_names: tuple[str, str] = ("start_logits", "end_logits"),
    fixed_shape: tuple[int, int] | None = None, int32_inputs: bool = False,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A post-LN BERT encoder with a QA head; returns the model and its weights by name.

    ``heads`` gives the heads of each layer (pruned models differ per layer); each head is
    ``head_dim`` wide, so a layer's attention width is heads * head_dim.
    """
    rng = np.random.default_rng(seed)
    heads = heads or [hidden // head_dim] * layers
    weights: dict[str, np.ndarray] = {}
    nodes: list = []

    def w(name: str, *shape: int, scale: float = 0.2) -> str:
        weights[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
        return name

    def const(name: str, value) -> str:
        weights[name] = np.asarray(value)
        return name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def layer_norm(x: str, prefix: str) -> str:
        weights[prefix + ".gamma"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
        weights[prefix + ".beta"] = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
        return node("LayerNormalization", [x, prefix + ".gamma", prefix + ".beta"], prefix + ".out",
                    axis=-1, epsilon=1e-12)

    def dense(x: str, prefix: str, n_in: int, n_out: int) -> str:
        y = node("MatMul", [x, w(prefix + ".weight", n_in, n_out)], prefix + ".mm")
        return node("Add", [y, w(prefix + ".bias", n_out, scale=0.1)], prefix + ".out")

    ids_name, mask_name, types_name = input_names
    in_type = TensorProto.INT32 if int32_inputs else TensorProto.INT64
    shape = list(fixed_shape) if fixed_shape else ["batch", "sequence"]
    graph_inputs = [helper.make_tensor_value_info(n, in_type, shape) for n in input_names if n]

    ids = node("Cast", [ids_name], "ids64", to=TensorProto.INT64)
    x = node("Gather", [w("word_embeddings", vocab_size, hidden, scale=1.0), ids], "word_emb")
    seq_len = node("Gather", [node("Shape", [ids], "ids_shape"), const("one_idx", np.int64(1))], "seq_len")
    positions = node("Range", [const("zero", np.int64(0)), seq_len, const("one", np.int64(1))], "positions")
    x = node("Add", [x, node("Gather", [w("position_embeddings", max_pos, hidden, scale=1.0), positions],
                             "pos_emb")], "emb_sum1")
    if types_name:
        types = node("Cast", [types_name], "types64", to=TensorProto.INT64)
        x = node("Add", [x, node("Gather", [w("token_type_embeddings", 2, hidden, scale=1.0), types],
                                 "type_emb")], "emb_sum2")
    x = layer_norm(x, "emb_ln")
    mask = node("Cast", [mask_name], "mask_f", to=TensorProto.FLOAT)
    mask = node("Mul", [node("Sub", [const("f_one", np.float32(1)), mask], "mask_inv"),
                        const("f_neg", np.float32(-10000.0))], "mask_add")
    mask = node("Unsqueeze", [mask, const("mask_axes", np.array([1, 2], dtype=np.int64))], "mask_4d")

    for li, nh in enumerate(heads):
        p = f"layer{li}"
        width = nh * head_dim
        split = const(p + ".split_shape", np.array([0, 0, nh, head_dim], dtype=np.int64))
        q = node("Transpose", [node("Reshape", [dense(x, p + ".q", hidden, width), split], p + ".q4")],
                 p + ".qt", perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [dense(x, p + ".k", hidden, width), split], p + ".k4")],
                 p + ".kt", perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [dense(x, p + ".v", hidden, width), split], p + ".v4")],
                 p + ".vt", perm=[0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [q, k], p + ".qk"),
                              const(p + ".scale", np.float32(1 / np.sqrt(head_dim)))], p + ".scaled")
        probs = node("Softmax", [node("Add", [scores, mask], p + ".masked")], p + ".probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], p + ".ctx")], p + ".ctxt", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, const(p + ".merge_shape", np.array([0, 0, width], dtype=np.int64))],
                   p + ".ctx3")
        x = layer_norm(node("Add", [dense(ctx, p + ".attn_out", width, hidden), x], p + ".res1"), p + ".ln1")
        h = dense(x, p + ".ffn1", hidden, intermediate)
        gelu = node("Mul", [node("Mul", [h, const(p + ".half", np.float32(0.5))], p + ".h_half"),
                            node("Add", [const(p + ".f1", np.float32(1)),
                                         node("Erf", [node("Div", [h, const(p + ".sqrt2", np.float32(np.sqrt(2)))],
                                                           p + ".h_div")], p + ".erf")], p + ".erf1")],
                    p + ".gelu")
        x = layer_norm(node("Add", [dense(gelu, p + ".ffn2", intermediate, hidden), x], p + ".res2"), p + ".ln2")

    logits = dense(x, "qa", hidden, 2)
    nodes.append(helper.make_node("Split", [logits, const("split2", np.array([1, 1], dtype=np.int64))],
                                  ["start3", "end3"], axis=-1, name="qa_split"))
    sq = const("sq_axes", np.array([-1], dtype=np.int64))
    nodes.append(helper.make_node("Squeeze", ["start3", sq], [output_names[0]], name="sq_start"))
    nodes.append(helper.make_node("Squeeze", ["end3", sq], [output_names[1]], name="sq_end"))
    graph = helper.make_graph(
        nodes, "tiny_bert_qa", graph_inputs,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in output_names],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, weights


def write_model_dir(directory: Path, tokenizer: str = "json", spec: dict | None = None, **graph_options) -> Path:
    """A complete model directory: model.onnx, tokenizer.json or vocab.txt, and qa_spec.json if given."""
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer == "json":
        write_tokenizer_json(directory)
    else:
        write_vocab(directory)
    model, _ = bert_qa_graph(len(vocab_tokens()), **graph_options)
    onnx.save(model, str(directory / "model.onnx"))
    if spec:
        (directory / "qa_spec.json").write_text(json.dumps(spec))
    return directory
