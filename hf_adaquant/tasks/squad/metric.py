"""SQuAD v1.1 exact match and token F1 with the official answer normalisation, in ``evaluate``'s squad format.

``evaluate.load("squad")`` needs the Hub (the pip package ships no metric scripts), so :class:`Squad` is our own
implementation of the same contract::

    compute(predictions=[{"id", "prediction_text"}],
            references=[{"id", "answers": {"text": [...], "answer_start": [...]}}])
    -> {"exact_match": 0..100, "f1": 0..100}

:func:`load_squad_metric` returns ``evaluate.load("squad")`` for users online and this module otherwise.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import socket
import string
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import urlparse

__all__ = ["Squad", "exact_match_score", "f1_score", "load_squad_metric", "normalize_answer", "squad_scores"]

_logger = logging.getLogger(__name__)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def normalize_answer(text: str) -> str:
    """Official SQuAD v1.1 normalisation: lower-case, drop punctuation, drop a/an/the, collapse whitespace.

    The order matters (punctuation goes before articles, so "the-end" -> "theend" keeps its "the").
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 when both normalise to the same string, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 between the normalised strings (bag of words; 0.0 when nothing is shared)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:  # also covers empty strings, as the v1.1 script does
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _best_over(metric: Callable[[str, str], float], prediction: str, ground_truths: Sequence[str]) -> float:
    return max(metric(prediction, gt) for gt in ground_truths)


class Squad:
    """SQuAD v1.1 metric with the interface of ``evaluate``'s squad module (``compute``, ``add_batch``)."""

    name = "squad"

    def __init__(self) -> None:
        self._predictions: list[Mapping[str, Any]] = []
        self._references: list[Mapping[str, Any]] = []

    def __repr__(self) -> str:
        return "Squad(offline SQuAD v1.1 EM/F1, hf_adaquant)"

    def add_batch(self, *, predictions: Iterable[Mapping[str, Any]], references: Iterable[Mapping[str, Any]]) -> None:
        """Accumulate predictions and references for a later ``compute()``."""
        self._predictions.extend(predictions)
        self._references.extend(references)

    def compute(
        self,
        *,
        predictions: Iterable[Mapping[str, Any]] | None = None,
        references: Iterable[Mapping[str, Any]] | None = None,
    ) -> dict[str, float]:
        """EM and F1 in percent, averaged over the references (a question without prediction scores 0).

        Raises:
            ValueError: malformed entries, duplicate ids, a prediction for an unknown id, or no references.
        """
        if (predictions is None) != (references is None):
            raise ValueError("give both predictions and references, or neither (to use add_batch's)")
        if predictions is None:
            predictions, references = self._predictions, self._references
            self._predictions, self._references = [], []
        return _score(list(predictions), list(references))  # type: ignore[arg-type]


def squad_scores(predictions: Iterable[Mapping[str, Any]], references: Iterable[Mapping[str, Any]]
                 ) -> dict[str, float]:
    """``{"exact_match", "f1"}`` in percent: the scoring behind :class:`Squad` and the ``evaluate`` module
    ``hf_adaquant/metrics/squad``.

    Raises:
        ValueError: malformed entries, duplicate ids, a prediction for an unknown id, or no references.
    """
    return _score(list(predictions), list(references))


def _score(predictions: list[Mapping[str, Any]], references: list[Mapping[str, Any]]) -> dict[str, float]:
    if not references:
        raise ValueError("no references to score")
    answers: dict[str, list[str]] = {}
    for i, ref in enumerate(references):
        try:
            qid, texts = ref["id"], ref["answers"]["text"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"reference {i} must look like {{'id', 'answers': {{'text': [...], "
                             f"'answer_start': [...]}}}}, got {ref!r}") from exc
        if qid in answers:
            raise ValueError(f"duplicate reference id {qid!r}")
        if isinstance(texts, str) or not len(texts):
            raise ValueError(f"reference {qid!r} needs a non-empty list of answer texts, got {texts!r}")
        answers[qid] = list(texts)
    predicted: dict[str, str] = {}
    for i, pred in enumerate(predictions):
        try:
            qid, text = pred["id"], pred["prediction_text"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"prediction {i} must look like {{'id', 'prediction_text'}}, got {pred!r}") from exc
        if qid in predicted:
            raise ValueError(f"duplicate prediction id {qid!r}")
        if qid not in answers:
            raise ValueError(f"prediction id {qid!r} has no reference")
        predicted[qid] = text
    missing = len(answers) - len(predicted)
    if missing:
        _logger.warning("%d of %d questions have no prediction and score 0", missing, len(answers))
    em = f1 = 0.0
    for qid, gold in answers.items():
        if qid in predicted:
            em += _best_over(exact_match_score, predicted[qid], gold)
            f1 += _best_over(f1_score, predicted[qid], gold)
    n = len(answers)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


def _offline_by_env() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_ENV_VARS)


def _hub_reachable(timeout: float) -> bool:
    """A TCP connect to the Hub endpoint: an offline machine answers in ``timeout`` seconds at most, instead of
    ``evaluate.load``'s retried HTTP calls."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _evaluate_load() -> Any:
    import evaluate  # optional: not a dependency of hf_adaquant

    return evaluate.load("squad")


def load_squad_metric(source: str = "auto", *, probe_timeout: float = 2.0,
                      hub_loader: Callable[[], Any] | None = None) -> Any:
    """The SQuAD metric: ``evaluate.load("squad")`` when available, else our :class:`Squad`.

    Args:
        source: ``"auto"`` (the Hub module if ``evaluate`` is installed, no offline variable such as
            ``HF_HUB_OFFLINE`` is set and the Hub answers a quick connect; our module otherwise),
            ``"evaluate"`` (the Hub module; errors propagate) or ``"local"`` (ours, never touches the network).
        probe_timeout: seconds the ``"auto"`` reachability probe may take.
        hub_loader: replaces ``evaluate.load("squad")`` (tests inject a stand-in).

    Both return ``{"exact_match", "f1"}`` in percent from ``compute(predictions=..., references=...)``.
    """
    if source not in ("auto", "evaluate", "local"):
        raise ValueError(f"source must be 'auto', 'evaluate' or 'local', got {source!r}")
    loader = hub_loader or _evaluate_load
    if source == "local":
        return Squad()
    if source == "evaluate":
        try:
            return loader()
        except ImportError as exc:
            raise ImportError("source='evaluate' needs the evaluate package: pip install evaluate") from exc
    if hub_loader is None:
        try:
            import evaluate  # noqa: F401
        except ImportError:
            _logger.debug("evaluate is not installed: using hf_adaquant's SQuAD metric")
            return Squad()
    if _offline_by_env() or not _hub_reachable(probe_timeout):
        _logger.info("the Hub is not reachable (or offline mode is set): using hf_adaquant's SQuAD metric")
        return Squad()
    try:
        return loader()
    except Exception as exc:  # network, cache or script errors: the local metric computes the same numbers
        _logger.warning("evaluate.load('squad') failed (%s: %s); using hf_adaquant's SQuAD metric",
                        type(exc).__name__, exc)
        return Squad()
