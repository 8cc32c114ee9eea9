"""Run a question-answering model over SQuAD features and score it (EM/F1 in ``evaluate``'s format)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ...metrics import load_metric
from ...utils.logging import progress_bar
from .data import SquadExample, squad_references
from .features import SquadFeatures, feature_batches, prepare_features
from .postprocess import postprocess_predictions

__all__ = ["evaluate_squad_model", "predict_squad", "squad_logits"]


@torch.no_grad()
def squad_logits(model: nn.Module, features: SquadFeatures, *, batch_size: int = 32, pad_token_id: int = 0,
                 progress: bool = True) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start and end logits per feature (each trimmed to the feature's length), in feature order.

    Features run sorted by length so batches carry little padding; the model's training flag is restored.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    lengths = features.lengths()
    order = sorted(range(len(features)), key=lambda i: (lengths[i], i))
    starts: list[np.ndarray | None] = [None] * len(features)
    ends: list[np.ndarray | None] = [None] * len(features)
    was_training = model.training
    model.eval()
    try:
        batches = feature_batches(features, batch_size, indices=order, pad_token_id=pad_token_id)
        total = (len(order) + batch_size - 1) // batch_size
        for idx, batch in progress_bar(batches, total=total, desc="SQuAD eval", disable=not progress, leave=False):
            out = model(**{k: v.to(device) for k, v in batch.items()})
            s, e = out["start_logits"].float().cpu().numpy(), out["end_logits"].float().cpu().numpy()
            for row, i in enumerate(idx):
                starts[i], ends[i] = s[row, :lengths[i]], e[row, :lengths[i]]
    finally:
        model.train(was_training)
    return starts, ends  # type: ignore[return-value]


def predict_squad(model: nn.Module, tokenizer: Any, examples: Sequence[SquadExample], *, batch_size: int = 32,
                  max_length: int = 384, stride: int = 128, n_best: int = 20, max_answer_length: int = 30,
                  progress: bool = True) -> list[dict[str, str]]:
    """Answer text per example, ``[{"id", "prediction_text"}]``."""
    features = prepare_features(examples, tokenizer, max_length=max_length, stride=stride)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    starts, ends = squad_logits(model, features, batch_size=batch_size, pad_token_id=pad, progress=progress)
    return postprocess_predictions(examples, features, starts, ends, n_best=n_best,
                                   max_answer_length=max_answer_length)


def evaluate_squad_model(model: nn.Module, tokenizer: Any, examples: Sequence[SquadExample], *,
                         batch_size: int = 32, max_length: int = 384, stride: int = 128, n_best: int = 20,
                         max_answer_length: int = 30, metric: Any | None = None,
                         progress: bool = True) -> dict[str, float]:
    """``{"exact_match", "f1"}`` (percent) of a QA model on ``examples``.

    Args:
        model: returns ``start_logits``/``end_logits`` (e.g. ``BertForQuestionAnswering``, quantized or not).
        tokenizer: the model's fast tokenizer.
        examples: e.g. ``load_squad_examples(articles=range(40, 48))``.
        metric: anything with evaluate's squad ``compute``; default our ``evaluate`` module
            ``hf_adaquant.metrics.load_metric("squad")`` (offline; ``load_squad_metric()`` gives the Hub's online).
        progress: show a progress bar (Hugging Face's progress-bar switches hide it).

    Example:
        >>> evaluate_squad_model(model, tokenizer, load_squad_examples())
        {'exact_match': ..., 'f1': ...}
    """
    predictions = predict_squad(model, tokenizer, examples, batch_size=batch_size, max_length=max_length,
                                stride=stride, n_best=n_best, max_answer_length=max_answer_length, progress=progress)
    result = (metric or load_metric("squad")).compute(predictions=predictions, references=squad_references(examples))
    return {"exact_match": float(result["exact_match"]), "f1": float(result["f1"])}
