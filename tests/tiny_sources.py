"""Tiny random-weight QA checkpoints in the formats users bring, with their quirks, for the converter tests.

- a Hugging Face BertForQuestionAnswering with pruned heads (per-layer head counts), via save_pretrained;
- a TF1 checkpoint with Google BERT run_squad.py variable names (plus the optimizer slots and global_step a
  training checkpoint carries), bert_config.json and vocab.txt; and a reference forward pass written in
  TensorFlow ops after Google's modeling.py (tanh GELU, -10000 attention mask), as the source framework's logits.

Frameworks are imported inside the functions: callers importorskip them first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tiny_models import vocab_tokens, write_tokenizer_json, write_vocab

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def hf_bert_qa(directory: Path, pruned_heads: dict[int, list[int]] | None = None, max_pos: int = 512,
               seed: int = 0) -> Path:
    """save_pretrained of a tiny BertForQuestionAnswering, heads pruned per layer when given (transformers < 5).

    initializer_range 0.2 (not 0.02) so logits are O(1) and a 1e-4 bound means something.
    """
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab_tokens()), max_position_embeddings=max_pos, initializer_range=0.2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **TINY)
    model = BertForQuestionAnswering(config).eval()
    with torch.no_grad():  # LayerNorm starts at identity; move it so the conversion of gamma/beta is tested
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    if pruned_heads:
        model.prune_heads(pruned_heads)
    model.save_pretrained(str(directory))
    write_tokenizer_json(directory)
    return directory


def hf_logits(directory: Path, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The source framework's logits: transformers itself, loading the saved checkpoint."""
    import torch
    from transformers import AutoModelForQuestionAnswering

    model = AutoModelForQuestionAnswering.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return out.start_logits.numpy(), out.end_logits.numpy()


def google_bert_variables(max_pos: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
    """Random variables named as BERT's modeling.py and run_squad.py create them."""
    rng = np.random.default_rng(seed)
    h, inter = TINY["hidden_size"], TINY["intermediate_size"]

    def r(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def ln(prefix: str) -> dict[str, np.ndarray]:
        return {prefix + "/gamma": 1 + r(h, scale=0.1), prefix + "/beta": r(h, scale=0.1)}

    v = {
        "bert/embeddings/word_embeddings": r(len(vocab_tokens()), h),
        "bert/embeddings/token_type_embeddings": r(2, h),
        "bert/embeddings/position_embeddings": r(max_pos, h),
        **ln("bert/embeddings/LayerNorm"),
        "bert/pooler/dense/kernel": r(h, h), "bert/pooler/dense/bias": r(h),
        "cls/squad/output_weights": r(2, h, scale=0.5), "cls/squad/output_bias": r(2, scale=0.1),
    }
    for i in range(TINY["num_hidden_layers"]):
        p = f"bert/encoder/layer_{i}/"
        for name, n_in, n_out in (("attention/self/query", h, h), ("attention/self/key", h, h),
                                  ("attention/self/value", h, h), ("attention/output/dense", h, h),
                                  ("intermediate/dense", h, inter), ("output/dense", inter, h)):
            v[p + name + "/kernel"] = r(n_in, n_out)
            v[p + name + "/bias"] = r(n_out, scale=0.1)
        v.update(ln(p + "attention/output/LayerNorm"))
        v.update(ln(p + "output/LayerNorm"))
    return v


def write_tf1_checkpoint(directory: Path, variables: dict[str, np.ndarray], max_pos: int = 512,
                         step: int = 7388) -> Path:
    """model.ckpt-STEP.{index,data-*} + checkpoint, bert_config.json, vocab.txt: a run_squad.py output dir.

    Written with a TF1 name-based Saver (tf.compat.v1), so keys are the variable names, as in BERT's checkpoints.
    """
    import tensorflow as tf

    directory.mkdir(parents=True, exist_ok=True)
    extras = {"global_step": np.int64(step)}
    for k in list(variables)[:3]:  # training checkpoints carry Adam slots; the converter must ignore them
        extras[k + "/adam_m"] = np.zeros_like(variables[k])
        extras[k + "/adam_v"] = np.zeros_like(variables[k])
    graph = tf.Graph()
    with graph.as_default():
        tf_vars = [tf.compat.v1.Variable(value, name=name) for name, value in {**variables, **extras}.items()]
        saver = tf.compat.v1.train.Saver(tf_vars)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(directory / "model.ckpt"), global_step=step)
    config = {**TINY, "vocab_size": len(vocab_tokens()), "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
              "attention_probs_dropout_prob": 0.1, "max_position_embeddings": max_pos, "type_vocab_size": 2,
              "initializer_range": 0.02}
    (directory / "bert_config.json").write_text(json.dumps(config, indent=2))
    write_vocab(directory)
    return directory


def tf_bert_squad_logits(variables: dict[str, np.ndarray], feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Start/end logits [batch, seq] as BERT's modeling.py + run_squad.py compute them, in TensorFlow ops."""
    import tensorflow as tf

    v = {k: tf.constant(x) for k, x in variables.items()}
    ids, mask, types = feeds["input_ids"], feeds["attention_mask"], feeds["token_type_ids"]
    b, n = ids.shape
    h, nh = TINY["hidden_size"], TINY["num_attention_heads"]
    hd = h // nh

    def dense(x, p):
        return tf.matmul(x, v[p + "/kernel"]) + v[p + "/bias"]

    def layer_norm(x, p):
        mean, var = tf.nn.moments(x, [-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(var + 1e-12) * v[p + "/gamma"] + v[p + "/beta"]

    def gelu(x):  # modeling.py's gelu: the tanh approximation
        return x * 0.5 * (1.0 + tf.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * tf.pow(x, 3))))

    def split(t):
        return tf.transpose(tf.reshape(t, [b, n, nh, hd]), [0, 2, 1, 3])

    x = (tf.gather(v["bert/embeddings/word_embeddings"], ids) + tf.gather(v["bert/embeddings/token_type_embeddings"],
         types) + v["bert/embeddings/position_embeddings"][:n])
    x = layer_norm(x, "bert/embeddings/LayerNorm")
    adder = (1.0 - tf.cast(mask[:, None, None, :], tf.float32)) * -10000.0
    for i in range(TINY["num_hidden_layers"]):
        p = f"bert/encoder/layer_{i}/"
        q, k, val = (split(dense(x, p + "attention/self/" + s)) for s in ("query", "key", "value"))
        probs = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) / np.sqrt(hd) + adder)
        ctx = tf.reshape(tf.transpose(tf.matmul(probs, val), [0, 2, 1, 3]), [b, n, h])
        x = layer_norm(dense(ctx, p + "attention/output/dense") + x, p + "attention/output/LayerNorm")
        x = layer_norm(dense(gelu(dense(x, p + "intermediate/dense")), p + "output/dense") + x,
                       p + "output/LayerNorm")
    logits = tf.matmul(tf.reshape(x, [b * n, h]), v["cls/squad/output_weights"], transpose_b=True)
    logits = tf.transpose(tf.reshape(logits + v["cls/squad/output_bias"], [b, n, 2]), [2, 0, 1])
    return logits[0].numpy(), logits[1].numpy()
