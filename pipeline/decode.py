"""Start/end logits of many windows -> the best answer spans of each question, in numpy.

A candidate span (i, j) of a window has both tokens in the context, j >= i, and
j - i + 1 <= max_answer_len; its score is start_logit[i] + end_logit[j]. A question's answers
are its best candidates over all its windows. ``probability`` is the softmax of the span's score
over all the question's candidates in all its windows (a span seen in two overlapping windows
counts in both; in the top-k list it appears once, with its best score).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .config import DecodeSettings

_CHUNK = 256


@dataclass(frozen=True)
class Spans:
    """The top-k answers of each question, best first; slot k of a row is empty where window == -1.

    window, start_token, end_token: int64 [n_rows, top_k]
    score, probability: float64 [n_rows, top_k]
    """

    window: np.ndarray
    start_token: np.ndarray
    end_token: np.ndarray
    score: np.ndarray
    probability: np.ndarray


def _context_logits(start_logits: np.ndarray, end_logits: np.ndarray, context_mask: np.ndarray,
                    max_answer_len: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 logits, -inf off the context; ``end`` padded with max_answer_len - 1 columns of -inf."""
    start = np.where(context_mask, start_logits.astype(np.float64), -np.inf)
    end = np.where(context_mask, end_logits.astype(np.float64), -np.inf)
    return start, np.concatenate([end, np.full((len(end), max_answer_len - 1), -np.inf)], axis=1)


def _ends_after(padded_end: np.ndarray, max_answer_len: int) -> np.ndarray:
    """View [W, L, K]: the end logit of token i + k."""
    return sliding_window_view(padded_end, max_answer_len, axis=1)[:, :padded_end.shape[1] - max_answer_len + 1]


def span_logsumexp(start: np.ndarray, padded_end: np.ndarray, max_answer_len: int) -> np.ndarray:
    """log of the sum of exp(score) over each window's candidate spans [W] (-inf: none), in O(L x K) additions
    and O(L) exponentials: sum_i exp(start_i) x sum_k exp(end_{i+k}), each factor shifted by its maximum."""
    with np.errstate(divide="ignore", invalid="ignore"):
        top_end = padded_end.max(axis=1)
        shift = np.where(np.isfinite(top_end), top_end, 0.0)
        ends = _ends_after(np.exp(padded_end - shift[:, None]), max_answer_len).sum(axis=2)
        per_start = start + np.log(ends)  # log sum over the spans starting at i, less shift
        top = per_start.max(axis=1)
        finite = np.isfinite(top)
        # A running sum, not .sum(): numpy's pairwise summation groups terms by the row's padded length, which
        # the batch decides, and a row's probability would move in its last bits with its batch-mates.
        total = np.cumsum(np.exp(per_start - np.where(finite, top, 0.0)[:, None]), axis=1)[:, -1]
        return np.where(finite, top + np.log(total) + shift, -np.inf)


def window_candidates(start_logits: np.ndarray, end_logits: np.ndarray, context_mask: np.ndarray,
                      settings: DecodeSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each window's own part of the decoding: (log-sum-exp of its candidates' scores [W] (-inf: none), its best
    candidates [W, P] as band indices start_token * max_answer_len + (end_token - start_token), their scores
    [W, P] (-inf: no candidate)). P is 1 for top-k 1, else 2 x top-k: a window's own best suffice for its
    question's, de-duplicated by characters.

    start_logits, end_logits: float [W, L]; context_mask: bool [W, L].
    """
    k_top, max_len = settings.top_k, settings.max_answer_len
    n_win, seq = start_logits.shape
    per_window = min(seq * max_len, k_top if k_top == 1 else 2 * k_top)
    win_lse, cand, cand_score = [], [], []
    for c0 in range(0, n_win, _CHUNK):  # bounded memory: a band is W x L x max_answer_len
        start, end = _context_logits(start_logits[c0:c0 + _CHUNK], end_logits[c0:c0 + _CHUNK],
                                     context_mask[c0:c0 + _CHUNK], max_len)
        win_lse.append(span_logsumexp(start, end, max_len))
        if per_window == 1:
            ends = _ends_after(end, max_len)
            per_start = start + ends.max(axis=2)  # rounding is monotone: the band's row maxima, exactly
            i = per_start.argmax(axis=1)
            w = np.arange(len(start))
            cand.append((i * max_len + ends[w, i].argmax(axis=1))[:, None])
            cand_score.append(per_start[w, i][:, None])
        else:
            # band[w, i, k] = start[w, i] + end[w, i + k]; a contiguous context makes (i, i + k) a valid span
            # whenever both ends are context tokens.
            band = (start[:, :, None] + _ends_after(end, max_len)).reshape(len(start), -1)
            top = np.argpartition(-band, per_window - 1, axis=1)[:, :per_window]
            cand.append(top)
            cand_score.append(np.take_along_axis(band, top, axis=1))
    if not win_lse:
        return np.empty(0), np.empty((0, per_window), dtype=np.int64), np.empty((0, per_window))
    return np.concatenate(win_lse), np.concatenate(cand), np.concatenate(cand_score)


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray, context_mask: np.ndarray,
               row: np.ndarray, n_rows: int, settings: DecodeSettings,
               offsets: np.ndarray | None = None) -> Spans:
    """Best ``settings.top_k`` spans per question.

    start_logits, end_logits: float [W, L]; context_mask: bool [W, L]; row: int [W] in [0, n_rows).
    ``offsets`` (int [W, L, 2]) lets top-k drop a span already listed from another window.

    The softmax normaliser never builds the W x L x max_answer_len band of exponentials (span_logsumexp),
    and the best span of a window is its best start with the best end in reach (a running maximum); only
    top-k > 1 scores the whole band. Same spans, in a fraction of the time (docs/log/, "Tokenizing and
    decoding per question").
    """
    k_top, max_len = settings.top_k, settings.max_answer_len
    n_win = len(start_logits)
    spans = Spans(*(np.full((n_rows, k_top), -1, dtype=np.int64) for _ in range(3)),
                  np.full((n_rows, k_top), -np.inf), np.zeros((n_rows, k_top)))
    if n_win == 0:
        return spans
    win_lse, cand, cand_score = window_candidates(start_logits, end_logits, context_mask, settings)
    cand_score = cand_score.ravel()

    # Softmax normaliser per question over every candidate of every window.
    row_max = np.full(n_rows, -np.inf)
    np.maximum.at(row_max, row, win_lse)
    row_sum = np.zeros(n_rows)
    with np.errstate(invalid="ignore"):
        np.add.at(row_sum, row, np.where(np.isfinite(win_lse), np.exp(win_lse - row_max[row]), 0.0))
    row_lse = row_max + np.log(np.where(row_sum > 0, row_sum, 1.0))

    cand_window = np.repeat(np.arange(n_win), cand.shape[1])
    cand_start = cand.ravel() // max_len
    cand_end = cand_start + cand.ravel() % max_len
    keep = np.isfinite(cand_score)
    cand_score, cand_window, cand_start, cand_end = (a[keep] for a in (cand_score, cand_window, cand_start, cand_end))
    cand_row = row[cand_window]

    order = np.lexsort((-cand_score, cand_row))  # by question, best first
    cand_score, cand_window, cand_start, cand_end, cand_row = (
        a[order] for a in (cand_score, cand_window, cand_start, cand_end, cand_row))
    if k_top > 1 and offsets is not None:
        char_start = offsets[cand_window, cand_start, 0]
        char_end = offsets[cand_window, cand_end, 1]
        key = np.stack([cand_row, char_start, char_end], axis=1)
        _, first = np.unique(key, axis=0, return_index=True)
        first.sort()  # np.unique keeps the first (best) occurrence; restore best-first order
        cand_score, cand_window, cand_start, cand_end, cand_row = (
            a[first] for a in (cand_score, cand_window, cand_start, cand_end, cand_row))
    # Rank of each candidate within its question.
    group_start = np.searchsorted(cand_row, cand_row, side="left")
    rank = np.arange(len(cand_row)) - group_start
    sel = rank < k_top
    r, k = cand_row[sel], rank[sel]
    spans.window[r, k] = cand_window[sel]
    spans.start_token[r, k] = cand_start[sel]
    spans.end_token[r, k] = cand_end[sel]
    spans.score[r, k] = cand_score[sel]
    spans.probability[r, k] = np.exp(cand_score[sel] - row_lse[r])
    return spans


@dataclass(frozen=True)
class CharSpans:
    """One question's best answers, best first, as character spans of its context.

    start, end: int64 [k]; score, probability: float64 [k], k <= top_k (0: no candidate in any window)
    """

    start: np.ndarray
    end: np.ndarray
    score: np.ndarray
    probability: np.ndarray


class RowSpans:
    """``best_spans`` for one question whose windows come a batch at a time, in their order (a context too long to
    hold all its windows' logits at once).

    Between batches it keeps what the answer needs and no more: the best ``top_k`` candidates so far (one per
    character span when top-k > 1, as ``best_spans`` de-duplicates them) with their characters, and the running
    maximum and sum of exp(score - maximum) over every candidate of every window (the softmax normaliser). The
    spans are ``best_spans``' for the same windows, ties going to the earlier window as there; the normaliser is
    the same sum taken in another order.
    """

    def __init__(self, settings: DecodeSettings):
        self.settings = settings
        self.windows = 0  # seen so far
        self._max, self._sum = -np.inf, 0.0
        self._start = self._end = np.empty(0, dtype=np.int64)
        self._score = np.empty(0)

    def add(self, start_logits: np.ndarray, end_logits: np.ndarray, context_mask: np.ndarray,
            offsets: np.ndarray) -> None:
        """The next windows' logits: start_logits, end_logits float [W, L]; context_mask bool [W, L]; offsets int
        [W, L, 2] (characters of the context)."""
        if len(start_logits) == 0:
            return
        max_len = self.settings.max_answer_len
        win_lse, cand, cand_score = window_candidates(start_logits, end_logits, context_mask, self.settings)
        self.windows += len(start_logits)
        finite = win_lse[np.isfinite(win_lse)]
        if len(finite):
            top = max(self._max, float(finite.max()))
            self._sum = self._sum * np.exp(self._max - top) + float(np.exp(finite - top).sum())
            self._max = top
        window = np.repeat(np.arange(len(cand)), cand.shape[1])
        first = cand.ravel() // max_len
        last = first + cand.ravel() % max_len
        score = cand_score.ravel()
        keep = np.isfinite(score)
        window, first, last, score = window[keep], first[keep], last[keep], score[keep]
        # Kept candidates first: they come from earlier windows, and a stable sort keeps ties in window order.
        start = np.concatenate([self._start, offsets[window, first, 0].astype(np.int64)])
        end = np.concatenate([self._end, offsets[window, last, 1].astype(np.int64)])
        score = np.concatenate([self._score, score])
        order = np.argsort(-score, kind="stable")
        start, end, score = start[order], end[order], score[order]
        if self.settings.top_k > 1:
            _, once = np.unique(np.stack([start, end], axis=1), axis=0, return_index=True)
            once.sort()  # the first (best) of each span, best first again
            start, end, score = start[once], end[once], score[once]
        k = self.settings.top_k
        self._start, self._end, self._score = start[:k], end[:k], score[:k]

    def result(self) -> CharSpans:
        lse = self._max + np.log(self._sum if self._sum > 0 else 1.0)
        return CharSpans(self._start, self._end, self._score, np.exp(self._score - lse))
