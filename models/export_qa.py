"""Export a trained QA checkpoint (from models.train_qa) into a model directory the job serves.

Writes ``model.onnx`` (int8: ONNX Runtime BERT graph fusion, then dynamic int8 quantization of the
weights: the variant served by default), ``model-fp32.onnx`` (optional, --fp32), the tokenizer,
config.json, qa_spec.json, and the weights in bf16 safetensors (a warm start for more training).
Dynamic batch and sequence axes throughout. The graphs go through models.convert's export path, the one users'
checkpoints take, with its logit checks: fp32 ONNX against torch, the fused and int8 graphs against fp32 ONNX.

    python -m models.export_qa --weights ~/.cache/qa-train/minilm/checkpoint.pt --dst models/minilm-squad
    python -m models.export_qa --weights models/minilm-squad/weights-bf16.safetensors --dst /tmp/m --fp32

Needs the ``train`` extra (torch, transformers, onnx).
"""

from __future__ import annotations

import argparse
import json
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

    from models.convert import ConvertOptions, export_checked, load_bert_qa, write_json, write_tokenizer

    base = a.base or default_base()
    dst = Path(a.dst)
    dst.mkdir(parents=True, exist_ok=True)
    weights, record = load_weights(a.weights)
    config = {**json.loads((Path(base) / "config.json").read_text()), "architectures": ["BertForQuestionAnswering"]}
    exported = load_bert_qa(config, weights, a.weights)
    report = export_checked(exported, dst / "model.onnx", ConvertOptions(optimize=True, quantize="int8"), a.weights,
                            keep_fused=dst / "model-fp32.onnx" if a.fp32 else None)
    write_tokenizer(Path(base), dst)
    write_json(dst / "config.json", exported.config)
    lowercase = record.get("train_config", {}).get("lowercase", True)  # as training cut its windows
    write_json(dst / "qa_spec.json", {"name": a.name, **SEQ_DEFAULTS, "lowercase": lowercase})
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in weights.items()},
              str(dst / "weights-bf16.safetensors"))
    (dst / "training.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({"wrote": str(dst), **report}, indent=2))


if __name__ == "__main__":
    main()
