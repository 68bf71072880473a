"""SQuAD files and the official v1.1 metric (normalize, exact match, bag-of-tokens F1)."""

from __future__ import annotations

import gzip
import json
import re
import string
from collections import Counter
from pathlib import Path

import pyarrow as pa

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace (official order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def load_squad(path: str | Path) -> list[dict]:
    """The articles of a SQuAD JSON file (``.json`` or ``.json.gz``)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)["data"]


def questions(articles: list[dict], limit: int | None = None) -> list[dict]:
    """Questions in file order: id, question, context, title, gold answer texts."""
    out = []
    for article in articles:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                out.append({"id": qa["id"], "question": qa["question"], "context": para["context"],
                            "title": article.get("title", ""), "answers": [a["text"] for a in qa["answers"]]})
                if limit is not None and len(out) >= limit:
                    return out
    return out


def to_table(items: list[dict]) -> pa.Table:
    """The job's input table for these questions (gold answers stay out of it)."""
    return pa.table({k: [q[k] for q in items] for k in ("id", "question", "context", "title")})


def predictions(answered: pa.Table) -> dict[str, str]:
    """{id: answer} from the job's output columns; a row with no answer (an error) predicts ""."""
    return {i: (a or "") for i, a in zip(answered.column("id").to_pylist(), answered.column("answer").to_pylist())}


def score(items: list[dict], predictions: dict[str, str]) -> dict:
    """Official v1.1 scoring: best over the gold answers, averaged over every question, x100.
    A question with no prediction scores 0, as in the official script."""
    em = f1_sum = 0.0
    missing = 0
    for q in items:
        if q["id"] not in predictions:
            missing += 1
            continue
        pred = predictions[q["id"]]
        golds = q["answers"] or [""]
        em += max(exact_match(pred, g) for g in golds)
        f1_sum += max(f1(pred, g) for g in golds)
    n = len(items)
    return {"exact_match": 100.0 * em / n if n else 0.0, "f1": 100.0 * f1_sum / n if n else 0.0,
            "count": n, "unanswered": missing}
