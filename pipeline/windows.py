"""Questions and contexts -> overlapping model windows, with character offsets into each context.

Built on `tokenizers`' own truncation with overflow: only the context is cut, and each next window
starts ``overlap`` tokens before the previous one ended. We expose BERT run_squad's ``doc_stride``
(the step between window starts), so the overlap handed to `tokenizers` is
``room - doc_stride`` where ``room`` is the number of context tokens a window holds for that
question. That makes the windows exactly run_squad's: starts 0, doc_stride, 2*doc_stride, ...
until a window reaches the end of the context.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, pairwise
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


@contextmanager
def _bare(tok: Tokenizer) -> Iterator[Tokenizer]:
    """The tokenizer without its post-processor, which post_process applies once per window (a second pass would
    trim RoBERTa's offsets twice)."""
    processor, tok.post_processor = tok.post_processor, None
    try:
        yield tok
    finally:
        tok.post_processor = processor


def encode_questions(tok: Tokenizer, questions: list[str], settings: WindowSettings) -> list[Encoding]:
    """Each question encoded without special tokens (sequence id 0), cut to ``settings.max_query_len`` tokens."""
    with _bare(tok):
        q_enc = tok.encode_batch(questions, add_special_tokens=False)
        cut = [i for i, e in enumerate(q_enc) if len(e.ids) > settings.max_query_len]
        if cut:  # cut the text, not the tokens, and encode it again: as a pair would see that question
            texts = [questions[i][: q_enc[i].offsets[settings.max_query_len - 1][1]] for i in cut]
            for i, e in zip(cut, tok.encode_batch(texts, add_special_tokens=False)):
                q_enc[i] = e
    for e in q_enc:
        e.set_sequence_id(0)
    return q_enc


def context_room(tok: Tokenizer, question: Encoding, settings: WindowSettings) -> int:
    """Context tokens a window holds beside this (encoded, cut) question and the special tokens."""
    return settings.max_seq_len - len(question.ids) - tok.num_special_tokens_to_add(True)


def question_error(question: Encoding, room: int, settings: WindowSettings) -> str | None:
    """Why this question gets no windows (None: it gets some)."""
    if not question.ids:
        return "question has no tokens"
    if room < 1:
        return f"question of {len(question.ids)} tokens leaves no room for context in {settings.max_seq_len}"
    return None


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
    many more, so sharing the context's encoding saves much of the tokenizing (docs/log/, "Tokenizing and
    decoding per question"). tests/test_windows.py holds the windows equal to the pair encodings'.
    """
    errors: dict[int, str] = {}
    distinct: dict[str, int] = {}
    context_of = [distinct.setdefault(c, len(distinct)) for c in contexts]
    q_enc = encode_questions(tok, questions, settings)
    with _bare(tok):
        c_enc = tok.encode_batch(list(distinct), add_special_tokens=False)
    for e in c_enc:
        e.set_sequence_id(1)

    specials = tok.num_special_tokens_to_add(True)
    encodings, rows = [], []
    # By question length, then input order: the order windows had when pairs were encoded per length.
    for i in sorted(range(len(q_enc)), key=lambda i: len(q_enc[i].ids)):
        q, c = q_enc[i], c_enc[context_of[i]]
        room = settings.max_seq_len - len(q.ids) - specials
        if (error := question_error(q, room, settings)) is not None:
            errors[i] = error
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


# ------------------------------------------------------------------------------ one long context, piece by piece

PIECE_CHARS = 1 << 15  # characters of a long context tokenized at once (stream_windows)
_PIECES_PER_CALL = 4  # pieces per encode_batch call (`tokenizers` encodes a batch's items in parallel)
# A cut: a space between two printable ASCII characters. The piece before ends with a character every tokenizer
# below keeps, so its last token ends exactly there; the piece after starts with the space.
_SEAM = re.compile(r"[!-~] (?=[!-~])")
# Normalizers that map characters one by one, and pre-tokenizers that split at every space: with these, the
# tokens of two texts cut at a seam, end to end, are the tokens of the whole (tests/test_huge_rows.py holds it).
_CHAR_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"}
_SPACE_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "ByteLevel", "Metaspace",
                         "Punctuation", "Digits"}


def _component_ok(component, allowed: set[str], members: str) -> bool:
    if component is None:
        return True

    def ok(spec: dict) -> bool:
        if spec["type"] == "Sequence":
            return all(ok(m) for m in spec[members])
        if spec["type"] == "ByteLevel" and not spec.get("use_regex", True):
            return False  # no regex split: the whole text is one word for BPE's merges
        if spec["type"] == "Metaspace" and not spec.get("split", True):
            return False
        return spec["type"] in allowed

    return ok(json.loads(component.__getstate__()))


def cuts_at_spaces(tok: Tokenizer) -> bool:
    """Whether this tokenizer's tokens of a text cut at seams (``context_pieces``) are those of the whole: its
    normalizer maps characters one by one, its pre-tokenizer splits at spaces, and it has no added tokens of its
    own besides special ones (an added token may hold a space, or strip the spaces beside it)."""
    return (_component_ok(tok.normalizer, _CHAR_NORMALIZERS, "normalizers")
            and _component_ok(tok.pre_tokenizer, _SPACE_PRE_TOKENIZERS, "pretokenizers")
            and all(t.special for t in tok.get_added_tokens_decoder().values()))


def context_pieces(tok: Tokenizer, context: str, piece_chars: int = PIECE_CHARS) -> list[tuple[int, int]]:
    """(start, end) character ranges cutting ``context`` into pieces of at least ``piece_chars`` (the last may be
    shorter) at seams: a space between two printable ASCII characters, which begins the next piece. One piece, the
    whole context, for a tokenizer not known to tokenize pieces as the whole (``cuts_at_spaces``) or a text
    without seams."""
    cuts = [0]
    if cuts_at_spaces(tok):
        pos = piece_chars
        while pos < len(context) and (m := _SEAM.search(context, pos)) is not None:
            cuts.append(m.start() + 1)
            pos = cuts[-1] + piece_chars
    cuts.append(len(context))
    return list(pairwise(cuts))


def _encoded_pieces(tok: Tokenizer, context: str, pieces: list[tuple[int, int]]) -> Iterator[tuple[int, Encoding]]:
    """(first character, encoding with offsets inside the piece) of each piece, in order, as make_windows encodes
    a context (no special tokens, sequence id 1)."""
    for g in range(0, len(pieces), _PIECES_PER_CALL):
        group = pieces[g:g + _PIECES_PER_CALL]
        with _bare(tok):
            encoded = tok.encode_batch([context[a:b] for a, b in group], add_special_tokens=False)
        for (a, _), e in zip(group, encoded):
            e.set_sequence_id(1)
            yield a, e


def window_count(tokens: int, room: int, doc_stride: int) -> int:
    """Windows a context of ``tokens`` tokens is cut into (0 for none): starts 0, step, 2 step, ... until a
    window reaches its end, step being doc_stride (or ``room`` when doc_stride is larger)."""
    if tokens == 0:
        return 0
    return 1 if tokens <= room else 1 + -(-(tokens - room) // min(doc_stride, room))


def count_windows(tok: Tokenizer, question: Encoding, context: str, settings: WindowSettings,
                  piece_chars: int = PIECE_CHARS) -> int:
    """How many windows ``stream_windows`` yields for this (encoded) question and context: a pass over the
    context's pieces that keeps only their lengths."""
    tokens = sum(len(e) for _, e in _encoded_pieces(tok, context, context_pieces(tok, context, piece_chars)))
    return window_count(tokens, context_room(tok, question, settings), settings.doc_stride)


def stream_windows(tok: Tokenizer, question: Encoding, context: str, settings: WindowSettings,
                   pad_to: int | None = None, multiple: int = 1,
                   piece_chars: int = PIECE_CHARS) -> Iterator[Windows]:
    """The windows ``make_windows`` cuts for one question (encoded by ``encode_questions``, with no
    ``question_error``) and one context, in the same order, a few at a time (``Windows.row`` is 0): memory holds
    one piece of the context's tokens and its windows, not all of them.

    The context is encoded a piece at a time (``context_pieces``). A piece's encoding is appended to the tokens
    not yet windowed with `tokenizers`' own ``Encoding.merge``, whose growing offsets shift the piece's by the
    end of the last token before it, the piece's first character (a seam's property); the same truncation with
    overflow as make_windows then cuts every window that ends before the last token (a later piece may extend
    the others), and the rest waits for the next piece. Each batch is as wide as ``make_windows`` would make it
    for its windows alone. A context with no tokens yields nothing.
    """
    room = context_room(tok, question, settings)
    overlap = max(0, room - settings.doc_stride)
    pad = pad_id(tok)
    pending: Encoding | None = None  # tokens from the next window's first on, offsets into the whole context
    for start, piece in _encoded_pieces(tok, context, context_pieces(tok, context, piece_chars)):
        if pending is None:
            pending = piece
        else:
            end = pending.offsets[-1][1] if len(pending) else 0
            if end != start:
                raise AssertionError(f"a piece starting at character {start} follows a token ending at {end}")
            pending = Encoding.merge([pending, piece], growing_offsets=True)
        if len(pending) > room:
            parts = _cut(pending, room, overlap)
            pending = parts.pop()  # reaches the last token: complete only once no piece follows
            yield _window_batch(tok, question, parts, pad, settings, pad_to, multiple)
    if pending is not None and len(pending):
        if len(pending) > room:
            parts = _cut(pending, room, overlap)
        else:
            parts = [pending]
        yield _window_batch(tok, question, parts, pad, settings, pad_to, multiple)


def _window_batch(tok: Tokenizer, question: Encoding, parts: list[Encoding], pad: int, settings: WindowSettings,
                  pad_to: int | None, multiple: int) -> Windows:
    encodings = [tok.post_process(question, part, add_special_tokens=True) for part in parts]
    longest = max(len(e.ids) for e in encodings)
    width = pad_to or int(padded_length(longest, multiple, settings.max_seq_len))
    return _to_arrays(encodings, np.zeros(len(encodings), dtype=np.int64), pad, width)


def _cut(pending: Encoding, room: int, overlap: int) -> list[Encoding]:
    """make_windows' truncation of ``pending`` (more than ``room`` tokens) into its parts, in order. The first part
    truncate leaves holds every other part as its overflow, which post_process would process again; it is taken
    instead from a copy truncated twice, a truncation replacing the overflow of the one before: one token of
    overflow."""
    first = Encoding.merge([pending], growing_offsets=False)
    first.truncate(room + 1)
    first.truncate(room)
    pending.truncate(room, stride=overlap)
    return [first, *pending.overflowing]
