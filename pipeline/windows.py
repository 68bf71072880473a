"""Questions and contexts -> overlapping model windows, with character offsets into each context.

Built on `tokenizers`' own truncation with overflow: only the context is cut, and each next window
starts ``overlap`` tokens before the previous one ended. We expose BERT run_squad's ``doc_stride``
(the step between window starts), so the overlap handed to `tokenizers` is
``room - doc_stride`` where ``room`` is the number of context tokens a window holds for that
question. That makes the windows exactly run_squad's: starts 0, doc_stride, 2*doc_stride, ...
until a window reaches the end of the context.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from .config import WindowSettings


@dataclass(frozen=True)
class Windows:
    """Windows of many questions, right-padded to the longest one (or the model's fixed length).

    input_ids, token_type_ids, attention_mask: int64 [W, L]
    offsets: int32 [W, L, 2], character spans into the window's context (0, 0 off the context)
    context_mask: bool [W, L], True where a token belongs to the context (an answer may only go there)
    row: int64 [W], the question each window belongs to (index into the questions given)
    lengths: int64 [W], tokens in each window before padding
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    attention_mask: np.ndarray
    offsets: np.ndarray
    context_mask: np.ndarray
    row: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.row)

    def take(self, index: np.ndarray, width: int | None = None) -> Windows:
        """Some windows, optionally cut to ``width`` columns (padding is on the right)."""
        w = slice(None, width)
        return Windows(self.input_ids[index, w], self.token_type_ids[index, w], self.attention_mask[index, w],
                       self.offsets[index, w], self.context_mask[index, w], self.row[index], self.lengths[index])


def load_tokenizer(tokenizer_file: str | Path, lowercase: bool | None) -> Tokenizer:
    """A `tokenizers` Tokenizer with padding and truncation cleared (we set both per batch).

    From vocab.txt we build BERT's WordPiece pipeline; ``lowercase`` also strips accents there,
    as BERT's uncased tokenizer does. For tokenizer.json, ``lowercase`` (when not None) replaces
    the normalizer with BERT's: use it only for BERT-family vocabularies.
    """
    path = Path(tokenizer_file)
    if path.name == "vocab.txt":
        tok = Tokenizer(WordPiece.from_file(str(path), unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=bool(lowercase))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        if cls_id is None or sep_id is None:
            raise ValueError(f"{path}: vocabulary lacks [CLS] or [SEP]")
        tok.post_processor = processors.BertProcessing(("[SEP]", sep_id), ("[CLS]", cls_id))
    else:
        tok = Tokenizer.from_file(str(path))
        if lowercase is not None:
            tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.no_padding()
    tok.no_truncation()
    # "[SEP]" typed inside a question or context is text, not a separator.
    tok.encode_special_tokens = True
    return tok


def pad_id(tok: Tokenizer) -> int:
    for token in ("[PAD]", "<pad>"):
        if (i := tok.token_to_id(token)) is not None:
            return i
    return 0


class WindowError(str):
    """Why a question got no windows."""


def make_windows(
    tok: Tokenizer, questions: list[str], contexts: list[str], settings: WindowSettings,
    pad_to: int | None = None, multiple: int = 1,
) -> tuple[Windows, dict[int, str]]:
    """Cut every (question, context) into windows.

    Returns the windows and, for questions that got none, the reason by index. Questions are cut
    to ``settings.max_query_len`` tokens first. ``pad_to`` pads to a fixed length (static graphs);
    else the arrays are as wide as the longest window rounded up to ``multiple`` (at most
    ``settings.max_seq_len``), room for batches padded to that multiple (``padded_length``).

    Each distinct context is tokenized once, not once per question: `tokenizers` encodes a pair as
    its two sequences encoded apart, then truncated and post-processed, and we do the same steps
    with its own ``Encoding.truncate`` and ``Tokenizer.post_process``, sharing the context's
    encoding. SQuAD has about five questions per context and the long form (documents x questions)
    many more, so sharing the context's encoding saves much of the tokenizing (BENCHMARKS.md, "Tokenizing and
    decoding per question"). tests/test_windows.py holds the windows equal to the pair encodings'.
    """
    errors: dict[int, str] = {}
    distinct: dict[str, int] = {}
    context_of = [distinct.setdefault(c, len(distinct)) for c in contexts]
    # Encoded without the post-processor, which post_process applies once per window below (a second pass
    # would trim RoBERTa's offsets twice).
    processor, tok.post_processor = tok.post_processor, None
    try:
        q_enc = tok.encode_batch(questions, add_special_tokens=False)
        cut = [i for i, e in enumerate(q_enc) if len(e.ids) > settings.max_query_len]
        if cut:  # cut the text, not the tokens, and encode it again: as a pair would see that question
            texts = [questions[i][: q_enc[i].offsets[settings.max_query_len - 1][1]] for i in cut]
            for i, e in zip(cut, tok.encode_batch(texts, add_special_tokens=False)):
                q_enc[i] = e
        c_enc = tok.encode_batch(list(distinct), add_special_tokens=False)
    finally:
        tok.post_processor = processor
    for e in q_enc:
        e.set_sequence_id(0)
    for e in c_enc:
        e.set_sequence_id(1)

    specials = tok.num_special_tokens_to_add(True)
    encodings, rows = [], []
    # By question length, then input order: the order windows had when pairs were encoded per length.
    for i in sorted(range(len(q_enc)), key=lambda i: len(q_enc[i].ids)):
        q, c = q_enc[i], c_enc[context_of[i]]
        room = settings.max_seq_len - len(q.ids) - specials
        if not q.ids:
            errors[i] = "question has no tokens"
            continue
        if room < 1:
            errors[i] = f"question of {len(q.ids)} tokens leaves no room for context in {settings.max_seq_len}"
            continue
        if len(c.ids) <= room:
            parts = [c]
        else:  # run_squad's windows: starts 0, doc_stride, ... (tokenizers' stride is the overlap)
            whole = Encoding.merge([c], growing_offsets=False)  # a copy: truncate cuts in place
            whole.truncate(room, stride=max(0, room - settings.doc_stride))
            parts = [whole, *whole.overflowing]
        for part in parts:
            encodings.append(tok.post_process(q, part, add_special_tokens=True))
            rows.append(i)

    longest = max((len(e.ids) for e in encodings), default=0)
    width = pad_to or int(padded_length(longest, multiple, settings.max_seq_len))
    windows = _to_arrays(encodings, np.asarray(rows, dtype=np.int64), pad_id(tok), width)
    # A context that normalizes to nothing (whitespace, control characters) has no tokens.
    empty = np.zeros(len(questions), dtype=bool)
    has_ctx = np.zeros(len(questions), dtype=bool)
    np.logical_or.at(has_ctx, windows.row, windows.context_mask.any(axis=1))
    empty[windows.row] = ~has_ctx[windows.row]
    for i in np.flatnonzero(empty):
        errors[int(i)] = "context has no tokens"
    if empty.any():
        windows = windows.take(np.flatnonzero(~empty[windows.row]))
    return windows, errors


def padded_length(length, multiple: int, limit: int):
    """``length`` (an int or an array of them) rounded up to ``multiple``, but not past ``limit`` (nor below
    ``length``)."""
    return np.maximum(length, np.minimum(-(-length // multiple) * multiple, limit))


def _to_arrays(encodings: list, row: np.ndarray, pad: int, width: int) -> Windows:
    """One array per field, filled in one assignment each (not per window: a fifth of tokenizing's time)."""
    ids = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    n, total = len(ids), int(lengths.sum())
    real = np.arange(width) < lengths[:, None]  # True on the tokens, in the order the encodings list them

    def scatter(values, fill, dtype, per_token=1):
        out = np.full((n, width, per_token), fill, dtype=dtype)
        out[real] = np.fromiter(values, dtype=dtype, count=total * per_token).reshape(total, per_token)
        return out if per_token > 1 else out[..., 0]

    input_ids = scatter(chain.from_iterable(ids), pad, np.int64)
    types = scatter(chain.from_iterable(e.type_ids for e in encodings), 0, np.int64)
    offsets = scatter(chain.from_iterable(chain.from_iterable(e.offsets for e in encodings)), 0, np.int32, 2)
    context = np.zeros((n, width), dtype=bool)  # sequence id 1; 0 is the question, None a special token
    context[real] = np.fromiter((s == 1 for s in chain.from_iterable(e.sequence_ids for e in encodings)),
                                dtype=bool, count=total)
    return Windows(input_ids, types, real.astype(np.int64), offsets, context, row, lengths)
