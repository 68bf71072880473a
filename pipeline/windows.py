"""Questions and contexts -> overlapping model windows, with character offsets into each context.

Built on `tokenizers`' own truncation with overflow: only the context is cut, and each next window
starts ``overlap`` tokens before the previous one ended. We expose BERT run_squad's ``doc_stride``
(the step between window starts), so the overlap handed to `tokenizers` is
``room - doc_stride`` where ``room`` is the number of context tokens a window holds for that
question. That makes the windows exactly run_squad's: starts 0, doc_stride, 2*doc_stride, ...
until a window reaches the end of the context.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
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
    pad_to: int | None = None,
) -> tuple[Windows, dict[int, str]]:
    """Cut every (question, context) into windows.

    Returns the windows and, for questions that got none, the reason by index. Questions are cut
    to ``settings.max_query_len`` tokens first. ``pad_to`` pads to a fixed length (static graphs).
    """
    errors: dict[int, str] = {}
    q_enc = tok.encode_batch(questions, add_special_tokens=False)
    questions = list(questions)
    q_len = [len(e.ids) for e in q_enc]
    cut = [i for i, n in enumerate(q_len) if n > settings.max_query_len]
    for i in cut:
        questions[i] = questions[i][: q_enc[i].offsets[settings.max_query_len - 1][1]]
    if cut:  # re-count: the pair encoding decides how many tokens the question takes
        for i, e in zip(cut, tok.encode_batch([questions[i] for i in cut], add_special_tokens=False)):
            q_len[i] = len(e.ids)

    specials = tok.num_special_tokens_to_add(True)
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(q_len):
        if n == 0:
            errors[i] = "question has no tokens"
        else:
            by_len[n].append(i)

    encodings, rows = [], []
    for n, idx in sorted(by_len.items()):
        room = settings.max_seq_len - n - specials
        tok.enable_truncation(settings.max_seq_len, stride=max(0, room - settings.doc_stride),
                              strategy="only_second")
        for i, enc in zip(idx, tok.encode_batch([(questions[i], contexts[i]) for i in idx])):
            pieces = [enc, *enc.overflowing]
            encodings.extend(pieces)
            rows.extend([i] * len(pieces))
    tok.no_truncation()

    windows = _to_arrays(encodings, np.asarray(rows, dtype=np.int64), pad_id(tok), pad_to)
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


def _to_arrays(encodings: list, row: np.ndarray, pad: int, pad_to: int | None) -> Windows:
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    width = pad_to or (int(lengths.max()) if len(lengths) else 0)
    n = len(encodings)
    ids = np.full((n, width), pad, dtype=np.int64)
    types = np.zeros((n, width), dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    sequence = np.full((n, width), np.nan, dtype=np.float32)  # 0 question, 1 context, nan special
    offsets = np.zeros((n, width, 2), dtype=np.int32)
    for k, e in enumerate(encodings):
        m = lengths[k]
        ids[k, :m] = e.ids
        types[k, :m] = e.type_ids
        mask[k, :m] = 1
        sequence[k, :m] = np.array(e.sequence_ids, dtype=np.float32)  # None -> nan
        offsets[k, :m] = e.offsets
    return Windows(ids, types, mask, offsets, sequence == 1, row, lengths)
