"""Tokenise (question, context) pairs into overlapping features, batch them, and draw calibration batches.

Standard extractive-QA windowing: question first, only the context is truncated (``truncation="only_second"``),
long contexts become several features that overlap by ``stride`` tokens. Each feature keeps the character
offsets of its context tokens (None elsewhere) to map a predicted token span back to context text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .data import SquadExample

__all__ = ["SquadFeatures", "feature_batches", "prepare_features", "squad_calibration_batches"]

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


@dataclass
class SquadFeatures:
    """Tokenised windows of a list of examples.

    ``example_index[i]`` is the example feature ``i`` came from; ``offset_mapping[i][t]`` is the ``(start, end)``
    character span of token ``t`` in that example's context, or None when the token is not a context token.
    Post-processing needs only those two fields.
    """

    example_index: list[int]
    offset_mapping: list[list[tuple[int, int] | None]]
    inputs: dict[str, list[list[int]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.example_index)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.inputs["input_ids"]]


def prepare_features(examples: Sequence[SquadExample], tokenizer: Any, *, max_length: int = 384,
                     stride: int = 128) -> SquadFeatures:
    """Tokenise ``examples`` into overlapping windows (no padding; :func:`feature_batches` pads per batch).

    Args:
        examples: questions with contexts.
        tokenizer: a *fast* transformers tokenizer (offsets are needed).
        max_length: tokens per feature, question and special tokens included.
        stride: tokens shared by consecutive windows of one context.

    Raises:
        ValueError: slow tokenizer, ``stride >= max_length``, or no examples.
    """
    if not examples:
        raise ValueError("no examples to tokenise")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("prepare_features needs a fast tokenizer (character offsets); "
                         f"got {type(tokenizer).__name__}")
    if not 0 <= stride < max_length:
        raise ValueError(f"stride must be in [0, max_length), got stride={stride}, max_length={max_length}")
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise ValueError("the question must come first: use a tokenizer with padding_side='right'")
    # Leading spaces in some SQuAD questions waste tokens and can push the question past max_length.
    enc = tokenizer([e.question.lstrip() for e in examples], [e.context for e in examples],
                    truncation="only_second", max_length=max_length, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True, padding=False)
    example_index = list(enc["overflow_to_sample_mapping"])
    offsets: list[list[tuple[int, int] | None]] = []
    for i in range(len(example_index)):
        seq_ids = enc.sequence_ids(i)
        offsets.append([tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], seq_ids)])
    inputs = {k: [list(x) for x in enc[k]] for k in MODEL_INPUTS if k in enc}
    return SquadFeatures(example_index=example_index, offset_mapping=offsets, inputs=inputs)


def _collate(features: SquadFeatures, indices: Sequence[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(features.inputs["input_ids"][i]) for i in indices)
    batch = {}
    for key, rows in features.inputs.items():
        pad = pad_token_id if key == "input_ids" else 0
        batch[key] = torch.tensor([rows[i] + [pad] * (width - len(rows[i])) for i in indices], dtype=torch.long)
    return batch


def feature_batches(features: SquadFeatures, batch_size: int, *, indices: Sequence[int] | None = None,
                    pad_token_id: int = 0) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """``(feature indices, batch)`` pairs, each batch padded to its longest feature (right padding)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(features))) if indices is None else list(indices)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        yield chunk, _collate(features, chunk, pad_token_id)


def squad_calibration_batches(examples: Sequence[SquadExample], tokenizer: Any, num_samples: int, batch_size: int,
                              *, max_length: int = 384, stride: int = 128, seed: int = 0
                              ) -> list[dict[str, torch.Tensor]]:
    """``num_samples`` features drawn at random (seeded) from ``examples``, as unlabeled batches for
    :func:`hf_adaquant.quantize`: dicts of ``input_ids``, ``token_type_ids``, ``attention_mask``.

    Draw the examples from the calibration articles (0-39), never from the evaluation ones. Features are
    batched by similar length so little of each batch is padding.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not examples:
        raise ValueError("no calibration examples")
    generator = torch.Generator().manual_seed(seed)
    # Tokenise shuffled examples in chunks until there are enough features: a few hundred features need a
    # small share of the ~9k calibration questions, and tokenising them all would dominate the set-up time.
    order = torch.randperm(len(examples), generator=generator).tolist()
    picked: list[SquadExample] = []
    features = None
    chunk = max(8, num_samples // 2)
    while features is None or len(features) < num_samples:
        if len(picked) == len(examples):
            raise ValueError(f"asked for {num_samples} calibration features, the examples give {len(features)}")
        picked += [examples[i] for i in order[len(picked):len(picked) + chunk]]
        features = prepare_features(picked, tokenizer, max_length=max_length, stride=stride)
    chosen = torch.randperm(len(features), generator=generator)[:num_samples].tolist()
    lengths = features.lengths()
    chosen.sort(key=lambda i: (lengths[i], i))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [batch for _, batch in feature_batches(features, batch_size, indices=chosen, pad_token_id=pad)]
