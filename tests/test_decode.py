"""Span decoding on logits built by hand, and against a brute-force loop on random logits."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import DecodeSettings
from pipeline.decode import best_spans


def mask_of(width: int, first: int, last: int) -> np.ndarray:
    m = np.zeros(width, dtype=bool)
    m[first:last + 1] = True
    return m


def test_answer_at_window_edges_and_rules():
    width = 12
    start = np.zeros((2, width))
    end = np.zeros((2, width))
    mask = np.stack([mask_of(width, 3, 10), mask_of(width, 3, 10)])
    start[0, 0] = end[0, 0] = 100  # [CLS] is never an answer
    start[0, 10] = 9  # last context token of window 0 ...
    end[0, 10] = 9  # ... as a one-token answer at the window's edge
    start[1, 3] = 5  # first context token of window 1
    end[1, 2] = 50  # end outside the context: ignored
    end[1, 4] = 3
    spans = best_spans(start, end, mask, np.array([0, 0]), 1, DecodeSettings(max_answer_len=5))
    assert (spans.window[0, 0], spans.start_token[0, 0], spans.end_token[0, 0]) == (0, 10, 10)
    assert spans.score[0, 0] == 18

    # end before start is never chosen; length limit holds
    start = np.zeros((1, width))
    end = np.zeros((1, width))
    start[0, 8] = 10
    end[0, 4] = 10  # before the start
    end[0, 9] = 1
    spans = best_spans(start, end, mask[:1], np.array([0]), 1, DecodeSettings(max_answer_len=30))
    assert (spans.start_token[0, 0], spans.end_token[0, 0]) == (8, 9)
    start[0, 3] = 10
    end[0, 10] = 10  # 8 tokens long
    spans = best_spans(start, end, mask[:1], np.array([0]), 1, DecodeSettings(max_answer_len=7))
    assert spans.end_token[0, 0] - spans.start_token[0, 0] + 1 <= 7


@pytest.mark.parametrize("top_k", [1, 3])  # 1: the running-maximum path; 3: the whole band
@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(seed, top_k):
    rng = np.random.default_rng(seed)
    n_rows, width, max_len = 7, 40, 6
    counts = rng.integers(1, 5, n_rows)
    row = np.repeat(np.arange(n_rows), counts)
    rng.shuffle(row)  # windows of a question need not be adjacent
    start = rng.standard_normal((len(row), width))
    end = rng.standard_normal((len(row), width))
    mask = np.stack([mask_of(width, int(a), int(a + rng.integers(0, 30))) for a in rng.integers(2, 10, len(row))])
    spans = best_spans(start, end, mask, row, n_rows, DecodeSettings(max_answer_len=max_len, top_k=top_k))
    for r in range(n_rows):
        cands = []
        for w in np.flatnonzero(row == r):
            for i in range(width):
                for j in range(i, min(width, i + max_len)):
                    if mask[w, i] and mask[w, j]:
                        cands.append((start[w, i] + end[w, j], w, i, j))
        cands.sort(reverse=True)
        scores = np.array([c[0] for c in cands])
        probs = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        for k in range(top_k):
            assert spans.score[r, k] == pytest.approx(cands[k][0])
            assert (spans.window[r, k], spans.start_token[r, k], spans.end_token[r, k]) == cands[k][1:]
            assert spans.probability[r, k] == pytest.approx(probs[k])


def test_rows_without_windows_stay_empty():
    spans = best_spans(np.zeros((1, 5)), np.zeros((1, 5)), np.ones((1, 5), bool), np.array([1]), 3,
                       DecodeSettings())
    assert spans.window[:, 0].tolist() == [-1, 0, -1]
