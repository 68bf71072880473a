"""Export a trained QA checkpoint (from models.train_qa) into a model directory the job serves.

Writes ``model.onnx`` (int8: ONNX Runtime BERT graph fusion, then dynamic int8 quantization of the
weights: the variant served by default), ``model-fp32.onnx`` (optional, --fp32), the tokenizer,
config.json, qa_spec.json, and the weights in bf16 safetensors (a warm start for more training).
Dynamic batch and sequence axes throughout.

    python -m models.export_qa --weights ~/.cache/qa-train/minilm/checkpoint.pt --dst models/minilm-squad
    python -m models.export_qa --weights models/minilm-squad/weights-bf16.safetensors --dst /tmp/m --fp32

Needs the ``train`` extra (torch, transformers, onnx).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from models.train_qa import default_base
from pipeline.extras import exits_on_missing_extra, require

WHAT = "models.export_qa"

SEQ_DEFAULTS = {"max_seq_len": 384, "doc_stride": 128, "max_query_len": 64}


def load_weights(path: str) -> tuple[dict, dict]:
    """Weights (fp32) and the training record: step and epoch when exported from a checkpoint."""
    import torch
    from safetensors.torch import load_file

    if path.endswith(".safetensors"):
        record = Path(path).with_name("training.json")
        return {k: v.float() for k, v in load_file(path).items()}, (
            json.loads(record.read_text()) if record.exists() else {})
    state = torch.load(path, map_location="cpu", weights_only=False)
    progress = Path(path).with_name("progress.json")
    record = json.loads(progress.read_text()) if progress.exists() else {}
    record["step"] = state["step"]
    train_cfg = Path(path).with_name("train_config.json")
    if train_cfg.exists():
        record["train_config"] = json.loads(train_cfg.read_text())
    return state["model"], record


def export_onnx(base: str, weights: dict, onnx_path: Path) -> None:
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    # Eager attention: ONNX Runtime's BERT fusion recognises its graph, not SDPA's (measured: +42% int8
    # throughput, -40% actor memory; BENCHMARKS.md).
    model = BertForQuestionAnswering(BertConfig.from_pretrained(base, attn_implementation="eager"))
    model.load_state_dict(weights)
    model.eval()

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.start_logits, out.end_logits

    ids = torch.randint(1, model.config.vocab_size, (2, 48))  # any ids in the vocabulary trace the same graph
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(
        Wrapped(model), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(onnx_path),
        input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["start_logits", "end_logits"],
        dynamic_axes={n: axes for n in ("input_ids", "attention_mask", "token_type_ids", "start_logits", "end_logits")},
        opset_version=17, dynamo=False,
    )


def optimize_and_quantize(fp32: Path, int8: Path, num_heads: int, hidden: int, keep_fused: Path | None) -> None:
    """ORT BERT fusion, then int8 (the converter's); ``keep_fused`` keeps the fused fp32 graph (the fair fp32
    variant to serve and compare)."""
    from models.convert import optimize_onnx, quantize_int8

    with tempfile.TemporaryDirectory() as tmp:
        fused = Path(tmp) / "fused.onnx"
        optimize_onnx(fp32, fused, num_heads, hidden)
        quantize_int8(fused, int8)
        if keep_fused:
            shutil.copy(fused, keep_fused)


def write_tokenizer(base: str, dst: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(base) / "tokenizer.json"))
    tok.no_padding()  # the base pads and truncates to 128; the job sets both per batch
    tok.no_truncation()
    tok.save(str(dst / "tokenizer.json"))
    shutil.copy(Path(base) / "vocab.txt", dst / "vocab.txt")


@exits_on_missing_extra
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="checkpoint.pt or weights .safetensors from train_qa")
    p.add_argument("--dst", required=True)
    p.add_argument("--base", default=None, help="base encoder dir with config/tokenizer (default: MiniLM-L6)")
    p.add_argument("--fp32", action="store_true", help="also keep the fused fp32 graph as model-fp32.onnx")
    p.add_argument("--name", default="minilm-l6-h384-squad1.1")
    a = p.parse_args(argv)
    for module in ("torch", "transformers", "safetensors", "onnx"):
        require(module, "train", WHAT)
    import torch
    from safetensors.torch import save_file

    base = a.base or default_base()
    dst = Path(a.dst)
    dst.mkdir(parents=True, exist_ok=True)
    weights, record = load_weights(a.weights)
    cfg = json.loads((Path(base) / "config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model-fp32.onnx"
        export_onnx(base, weights, fp32)
        optimize_and_quantize(fp32, dst / "model.onnx", cfg["num_attention_heads"], cfg["hidden_size"],
                              dst / "model-fp32.onnx" if a.fp32 else None)
    write_tokenizer(base, dst)
    (dst / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertForQuestionAnswering"]}, indent=2))
    (dst / "qa_spec.json").write_text(json.dumps({"name": a.name, **SEQ_DEFAULTS, "lowercase": True}, indent=2))
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in weights.items()},
              str(dst / "weights-bf16.safetensors"))
    (dst / "training.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
