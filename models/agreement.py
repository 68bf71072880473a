"""Whether each variant of a model directory answers that model's questions as its own fp32 does: the per-model
record ``--precision auto`` reads (the ``agreement`` of the directory's ``card.json``).

    python -m models.agreement MODEL_DIR [--data FILE] [--questions N]

``models.convert --quantize int8`` writes the record itself. For every variant the directory can serve on this CPU
(bf16 ones only where the CPU has bfloat16 matmuls), a sample of questions is answered in-process twice, with two
token budgets, so that each row is batched with other rows and padded differently:

- ``agree_exact`` / ``agree_f1``: the variant's answers scored against the fp32 reference's (fp32 as the truth,
  SQuAD's exact match and F1); no labels needed.
- ``f1``: against the gold answers, where the sample has them (SQuAD JSON).
- ``batch_changes``: rows whose answer differs between the two budgets: a row's answer must not depend on its
  batch-mates. Dynamic int8 graphs quantize activations with one scale per batch tensor, so theirs do.

The sample: ``--data`` (SQuAD JSON, or Parquet with question and context columns), by default SQuAD v1.1 train
where ``models.train_qa`` reads it; ``--questions`` drawn at random (seeded). The rule auto applies to the record
is in ``pipeline/precision.py`` (``ModelRecord``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

AGREEMENT_QUESTIONS = 1000
AGREEMENT_SEED = 7  # not convert's calibration seed: another draw of the same file
BUDGETS = (512, 4096)  # tokens per inference call: two batchings of the same rows
RECORD_VERSION = 1


class NoReferenceError(ValueError):
    """The directory has no float graph to compare its variants with."""


def sample(path: Path, n: int, seed: int = AGREEMENT_SEED) -> list[dict]:
    """Up to ``n`` questions drawn from ``path``: id, question, context and (SQuAD JSON) the gold answers."""
    from models.convert import ConvertError
    from pipeline import squad

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = [c for c in ("question", "context") if c not in table.column_names]
        if missing:
            raise ConvertError(f"{path}: no column {missing[0]!r} (columns: {table.column_names})")
        ids = table.column("id").to_pylist() if "id" in table.column_names else list(range(table.num_rows))
        items = [{"id": str(i), "question": q, "context": c} for i, q, c in
                 zip(ids, table.column("question").to_pylist(), table.column("context").to_pylist())]
    elif path.name.endswith((".json", ".json.gz")):
        items = squad.questions(squad.load_squad(path))
    else:
        raise ConvertError(f"{path}: agreement data must be .parquet, .json or .json.gz")
    items = [r for r in items if isinstance(r["question"], str) and isinstance(r["context"], str)
             and r["question"].strip() and r["context"].strip()]
    if not items:
        raise ConvertError(f"{path}: no usable question")
    order = np.random.default_rng(seed).permutation(len(items))[:n]
    return [items[i] for i in sorted(order)]


def answers(model_dir: Path, variant, items: list[dict], budget: int) -> list[tuple]:
    """(answer, start, end) per item, answered in-process by ``variant`` at ``budget`` tokens per call."""
    from pipeline.answer import Answerer
    from pipeline.served import open_variant

    spec, session = open_variant(str(model_dir), variant)
    table = pa.table({"question": [r["question"] for r in items], "context": [r["context"] for r in items]})
    out = Answerer(spec, session, batch_tokens=budget)(table)
    return list(zip(out.column("answer").to_pylist(), out.column("answer_start").to_pylist(),
                    out.column("answer_end").to_pylist()))


def reference_variant(variants) -> object:
    """The fp32 reference: OpenVINO's fp32 where the directory serves it (what the cards' rows compare with),
    else ONNX Runtime's."""
    from pipeline.precision import Variant

    for v in (Variant("openvino", "fp32"), Variant("onnxruntime", "fp32")):
        if v in variants:
            return v
    raise NoReferenceError("no fp32 variant to compare with: the directory needs a float graph (model-fp32.onnx)")


def measure(model_dir: Path, data: Path, questions: int = AGREEMENT_QUESTIONS, source: str = "") -> dict:
    """The agreement record of every variant ``model_dir`` serves on this CPU (module docstring)."""
    from pipeline import squad
    from pipeline.backends import servable_variants
    from pipeline.cpu import cpu_class, has_bf16_matmuls, model_name
    from pipeline.precision import BF16_PRECISIONS

    items = sample(data, questions)
    gold = all(r.get("answers") for r in items)
    variants = sorted(v for v in servable_variants(model_dir)
                      if has_bf16_matmuls() or v.precision not in BF16_PRECISIONS)
    reference = reference_variant(variants)
    runs = {v: [answers(model_dir, v, items, b) for b in BUDGETS] for v in variants}
    ref = {r["id"]: a[0] or "" for r, a in zip(items, runs[reference][0], strict=True)}
    rows = []
    for v, (first, second) in runs.items():
        predictions = {r["id"]: a[0] or "" for r, a in zip(items, first, strict=True)}
        vs_ref = squad.score([{"id": r["id"], "answers": [ref[r["id"]]]} for r in items], predictions)
        rows.append({"backend": v.backend, "precision": v.precision, "agree_exact": round(vs_ref["exact_match"], 2),
                     "agree_f1": round(vs_ref["f1"], 2),
                     "f1": round(squad.score(items, predictions)["f1"], 2) if gold else None,
                     "batch_changes": sum(a != b for a, b in zip(first, second, strict=True))})
    return {"version": RECORD_VERSION, "cpu_class": cpu_class(),
            "reference": {"backend": reference.backend, "precision": reference.precision},
            "sample": {"data": str(data), "questions": len(items), "gold": gold, "budgets": list(BUDGETS)},
            "variants": rows,
            "source": (f"{model_name()} (CPU class {cpu_class()}), {time.strftime('%Y-%m-%d')}: "
                       f"{source or f'python -m models.agreement {model_dir} --data {data} --questions {questions}'}")}


def write(model_dir: Path, record: dict) -> Path:
    """The record into ``model_dir/card.json`` (created if absent), other keys kept."""
    path = Path(model_dir) / "card.json"
    card = json.loads(path.read_text()) if path.exists() else {}
    card["agreement"] = record
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


def default_data() -> Path:
    from models.train_qa import DEFAULT_TRAIN

    return DEFAULT_TRAIN


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.agreement", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--data", type=Path, help="SQuAD JSON or Parquet (question, context[, id]); default: SQuAD "
                                             "v1.1 train where models.train_qa reads it")
    p.add_argument("--questions", type=int, default=AGREEMENT_QUESTIONS,
                   help=f"questions to draw (default {AGREEMENT_QUESTIONS})")
    a = p.parse_args(argv)
    data = a.data or default_data()
    if not data.is_file():
        p.error(f"{data}: agreement data not found; give --data FILE")
    try:
        record = measure(a.model_dir, data, a.questions)
    except NoReferenceError as exc:
        p.error(f"{a.model_dir}: {exc}")
    path = write(a.model_dir, record)
    print(json.dumps(record, indent=1))
    print(f"wrote the agreement record into {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
