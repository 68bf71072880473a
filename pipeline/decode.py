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


def band_scores(start_logits: np.ndarray, end_logits: np.ndarray, context_mask: np.ndarray,
                max_answer_len: int) -> np.ndarray:
    """Scores [W, L, K] of span (i, i + k); -inf where the span is not a candidate."""
    w, seq = start_logits.shape
    start = np.where(context_mask, start_logits.astype(np.float64), -np.inf)
    end = np.where(context_mask, end_logits.astype(np.float64), -np.inf)
    end = np.concatenate([end, np.full((w, max_answer_len - 1), -np.inf)], axis=1)
    # band[w, i, k] = start[w, i] + end[w, i + k]; a contiguous context makes (i, i+k) a valid span
    # whenever both ends are context tokens.
    return start[:, :, None] + sliding_window_view(end, max_answer_len, axis=1)[:, :seq]


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray, context_mask: np.ndarray,
               row: np.ndarray, n_rows: int, settings: DecodeSettings,
               offsets: np.ndarray | None = None) -> Spans:
    """Best ``settings.top_k`` spans per question.

    start_logits, end_logits: float [W, L]; context_mask: bool [W, L]; row: int [W] in [0, n_rows).
    ``offsets`` (int [W, L, 2]) lets top-k drop a span already listed from another window.
    """
    k_top = settings.top_k
    n_win, seq = start_logits.shape
    spans = Spans(*(np.full((n_rows, k_top), -1, dtype=np.int64) for _ in range(3)),
                  np.full((n_rows, k_top), -np.inf), np.zeros((n_rows, k_top)))
    if n_win == 0:
        return spans
    # Per window its own top-k candidates suffice for the question's top-k (more if de-duplicating).
    per_window = min(seq * settings.max_answer_len, k_top if k_top == 1 else 2 * k_top)
    win_max, win_sum, cand, cand_score = [], [], [], []
    for c0 in range(0, n_win, _CHUNK):  # bounded memory: the band is W x L x max_answer_len
        band = band_scores(start_logits[c0:c0 + _CHUNK], end_logits[c0:c0 + _CHUNK],
                           context_mask[c0:c0 + _CHUNK], settings.max_answer_len).reshape(-1, seq * settings.max_answer_len)
        m = band.max(axis=1)
        finite = np.isfinite(m)
        win_max.append(m)
        win_sum.append(np.where(finite, np.exp(band - np.where(finite, m, 0.0)[:, None]).sum(axis=1), 0.0))
        top = np.argpartition(-band, per_window - 1, axis=1)[:, :per_window]
        cand.append(top)
        cand_score.append(np.take_along_axis(band, top, axis=1))
    win_max, win_sum = np.concatenate(win_max), np.concatenate(win_sum)
    cand = np.concatenate(cand)
    cand_score = np.concatenate(cand_score).ravel()

    # Softmax normaliser per question over every candidate of every window.
    finite = np.isfinite(win_max)
    row_max = np.full(n_rows, -np.inf)
    np.maximum.at(row_max, row, win_max)
    row_sum = np.zeros(n_rows)
    np.add.at(row_sum, row, win_sum * np.exp(np.where(finite, win_max - row_max[row], -np.inf)))
    row_lse = row_max + np.log(np.where(row_sum > 0, row_sum, 1.0))

    cand_window = np.repeat(np.arange(n_win), cand.shape[1])
    cand_start = cand.ravel() // settings.max_answer_len
    cand_end = cand_start + cand.ravel() % settings.max_answer_len
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
