"""make_windows tokenizes each distinct context once; its windows must be exactly those of encoding every
(question, context) pair with `tokenizers`' own pair truncation (the reference below, make_windows as it was),
for BERT-style and RoBERTa-style tokenizers, on SQuAD dev and on texts built to hit the edges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from pipeline.config import WindowSettings
from pipeline.model_dir import load_spec
from pipeline.squad import load_squad
from pipeline.squad import questions as squad_questions
from pipeline.windows import Windows, load_tokenizer, make_windows, pad_id

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared/data/squad/dev-v1.1.json"


def pair_windows(tok: Tokenizer, questions: list[str], contexts: list[str], settings: WindowSettings,
                 pad_to: int | None = None) -> tuple[Windows, dict[int, str]]:
    """Every pair encoded by `tokenizers` with only_second truncation and overflow, per question length."""
    errors: dict[int, str] = {}
    q_enc = tok.encode_batch(questions, add_special_tokens=False)
    questions = list(questions)
    q_len = [len(e.ids) for e in q_enc]
    for i in [i for i, n in enumerate(q_len) if n > settings.max_query_len]:
        questions[i] = questions[i][: q_enc[i].offsets[settings.max_query_len - 1][1]]
        q_len[i] = len(tok.encode(questions[i], add_special_tokens=False).ids)
    specials = tok.num_special_tokens_to_add(True)
    encodings, rows = [], []
    for n in sorted(set(q_len)):
        idx = [i for i, m in enumerate(q_len) if m == n]
        if n == 0:
            errors.update((i, "question has no tokens") for i in idx)
            continue
        room = settings.max_seq_len - n - specials
        tok.enable_truncation(settings.max_seq_len, stride=max(0, room - settings.doc_stride),
                              strategy="only_second")
        for i, enc in zip(idx, tok.encode_batch([(questions[i], contexts[i]) for i in idx])):
            encodings.extend([enc, *enc.overflowing])
            rows.extend([i] * (1 + len(enc.overflowing)))
    tok.no_truncation()
    windows = window_arrays(encodings, np.asarray(rows, dtype=np.int64), pad_id(tok), pad_to)
    has_ctx = np.zeros(len(questions), dtype=bool)
    np.logical_or.at(has_ctx, windows.row, windows.context_mask.any(axis=1))
    for i in sorted(set(windows.row.tolist()) - set(np.flatnonzero(has_ctx).tolist())):
        errors[i] = "context has no tokens"
    return windows.take(np.flatnonzero(has_ctx[windows.row])), errors


def window_arrays(encodings: list, row: np.ndarray, pad: int, pad_to: int | None) -> Windows:
    """The encodings' fields copied window by window."""
    lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
    n, width = len(encodings), pad_to or int(lengths.max())
    ids, types, mask = np.full((n, width), pad, np.int64), np.zeros((n, width), np.int64), np.zeros((n, width), np.int64)
    offsets, context = np.zeros((n, width, 2), np.int32), np.zeros((n, width), bool)
    for k, e in enumerate(encodings):
        m = lengths[k]
        ids[k, :m], types[k, :m], mask[k, :m], offsets[k, :m] = e.ids, e.type_ids, 1, e.offsets
        context[k, :m] = [s == 1 for s in e.sequence_ids]
    return Windows(ids, types, mask, offsets, context, row, lengths)


def assert_same(tok, questions, contexts, settings, pad_to=None):
    got, got_errors = make_windows(tok, questions, contexts, settings, pad_to)
    want, want_errors = pair_windows(tok, questions, contexts, settings, pad_to)
    assert got_errors == want_errors
    assert len(got) == len(want)
    for name in ("row", "lengths", "input_ids", "token_type_ids", "attention_mask", "context_mask", "offsets"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape, name
        bad = np.flatnonzero((a != b).reshape(len(a), -1).any(axis=1))
        assert not len(bad), f"{name} differs in {len(bad)} windows, first of question {want.row[bad[0]]}"
    return got


def roberta_style(texts: list[str]) -> Tokenizer:
    """A byte-level BPE with RoBERTa's post-processor (4 special tokens, offsets trimmed of spaces)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "<pad>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")), trim_offsets=True)
    tok.encode_special_tokens = True
    return tok


EDGE_CONTEXT = ("The Rhine [SEP] flows through Basel, Strasbourg and Köln; naïve cafés line it. " * 40).strip()
EDGE_QUESTIONS = [
    "Which city?",
    "what " * 90 + "is it?",  # longer than max_query_len: cut
    "?",  # one token
    "Où est le café ?",
    "[SEP] [CLS] which river",
]
EDGE_CONTEXTS = [EDGE_CONTEXT, EDGE_CONTEXT, EDGE_CONTEXT[:50], "   \t  ", EDGE_CONTEXT[:700]]


@pytest.mark.parametrize("settings", [WindowSettings(), WindowSettings(max_seq_len=64, doc_stride=16,
                                                                        max_query_len=20),
                                      WindowSettings(max_seq_len=48, doc_stride=200, max_query_len=8)],
                         ids=["run_squad", "many-windows", "stride-past-room"])
def test_edges_match_pair_encoding(settings, tmp_path):
    from tests.tiny_models import write_tokenizer_json, write_vocab

    for tok in (load_tokenizer(write_vocab(tmp_path), True), load_tokenizer(write_tokenizer_json(tmp_path), True),
                roberta_style([EDGE_CONTEXT] * 5)):
        got = assert_same(tok, EDGE_QUESTIONS, EDGE_CONTEXTS, settings)
        assert np.bincount(got.row)[0] > 1  # the long context really was cut into several windows
        assert_same(tok, EDGE_QUESTIONS, EDGE_CONTEXTS, settings, pad_to=settings.max_seq_len)


@pytest.mark.skipif(not DEV.exists(), reason="needs ../shared/data/squad")
def test_squad_dev_matches_pair_encoding():
    """The first 3000 dev questions (612 contexts) as the job cuts them, and again with short windows."""
    items = squad_questions(load_squad(DEV), limit=3000)
    questions, contexts = [q["question"] for q in items], [q["context"] for q in items]
    spec = load_spec(REPO / "models/minilm-squad")
    tok = load_tokenizer(spec.tokenizer_file, spec.lowercase)
    got = assert_same(tok, questions, contexts, spec.windows)
    assert len(got) > len(items)  # some contexts need two windows
    short = WindowSettings(max_seq_len=128, doc_stride=48, max_query_len=32)
    assert np.bincount(assert_same(tok, questions[:600], contexts[:600], short).row).max() >= 4
    assert_same(roberta_style(contexts[:400]), questions[:600], contexts[:600], short)
