"""Start/end logits of every feature -> one answer text per example (the transformers QA pipeline is gone in 5.3).

Per feature: the ``n_best`` highest start and end logits; a span is valid when both ends are context tokens,
``start <= end`` and it spans at most ``max_answer_length`` tokens; its score is start logit + end logit. The best
valid span over all features of an example is cut from the context through the token offsets.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .data import SquadExample

__all__ = ["best_span", "postprocess_predictions"]


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, offsets: Sequence[tuple[int, int] | None], *,
              n_best: int = 20, max_answer_length: int = 30) -> tuple[float, int, int] | None:
    """``(score, start_token, end_token)`` of the best valid span of one feature, or None when none is valid."""
    n = len(offsets)
    start_logits, end_logits = np.asarray(start_logits)[:n], np.asarray(end_logits)[:n]
    # argsort on the negated logits with a stable sort: ties resolve to the earlier token, reproducibly.
    starts = np.argsort(-start_logits, kind="stable")[:n_best]
    ends = np.argsort(-end_logits, kind="stable")[:n_best]
    best: tuple[float, int, int] | None = None
    for s in starts:
        if offsets[s] is None:
            continue
        for e in ends:
            if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                continue
            score = float(start_logits[s] + end_logits[e])
            if best is None or score > best[0]:
                best = (score, int(s), int(e))
    return best


def postprocess_predictions(examples: Sequence[SquadExample], features: Any, start_logits: Sequence[np.ndarray],
                            end_logits: Sequence[np.ndarray], *, n_best: int = 20, max_answer_length: int = 30
                            ) -> list[dict[str, str]]:
    """Predictions in ``evaluate``'s squad format, ``[{"id", "prediction_text"}]``, one per example.

    Args:
        examples: the examples the features were made from (same order).
        features: anything with ``example_index`` and ``offset_mapping`` (a :class:`SquadFeatures`).
        start_logits / end_logits: one row per feature (a 2-D array, or a list of 1-D arrays); positions past
            the feature's length (padding) are ignored.
        n_best: start and end candidates per feature. max_answer_length: longest answer in tokens.

    An example whose features admit no valid span gets an empty prediction.

    Raises:
        ValueError: the numbers of features, logit rows and offsets disagree, or a feature points at a missing
        example.
    """
    num = len(features.example_index)
    if not (len(start_logits) == len(end_logits) == num == len(features.offset_mapping)):
        raise ValueError(f"{num} features but {len(start_logits)} start / {len(end_logits)} end logit rows "
                         f"and {len(features.offset_mapping)} offset rows")
    if n_best < 1 or max_answer_length < 1:
        raise ValueError(f"n_best and max_answer_length must be >= 1, got {n_best}, {max_answer_length}")
    best: dict[int, tuple[float, int, int, int]] = {}  # example -> (score, feature, start, end)
    for f, ex in enumerate(features.example_index):
        if not 0 <= ex < len(examples):
            raise ValueError(f"feature {f} points at example {ex}, but there are {len(examples)} examples")
        offsets = features.offset_mapping[f]
        if len(start_logits[f]) < len(offsets):
            raise ValueError(f"feature {f} has {len(offsets)} tokens but only {len(start_logits[f])} logits")
        span = best_span(start_logits[f], end_logits[f], offsets, n_best=n_best,
                         max_answer_length=max_answer_length)
        if span is not None and (ex not in best or span[0] > best[ex][0]):
            best[ex] = (span[0], f, span[1], span[2])
    predictions = []
    for i, example in enumerate(examples):
        text = ""
        if i in best:
            _, f, s, e = best[i]
            offsets = features.offset_mapping[f]
            text = example.context[offsets[s][0]:offsets[e][1]]
        predictions.append({"id": example.id, "prediction_text": text})
    return predictions
