"""Named quantization policies: model-family rules that become an :class:`~hf_adaquant.AdaQuantConfig`.

A policy is the one place its rules are written: code calls the function (``bert_qa_quantization_config(4, 8)``),
recipes name it (``quantization: {policy: bert-qa, weight_bits: 4, ...}``, see :data:`POLICIES`), and both give the
same config.

**BERT question answering** (``"bert-qa"``: ``BertForQuestionAnswering`` and look-alikes).
What is quantized, and why:

* **Every ``nn.Linear`` of the encoder** (query/key/value, attention output, intermediate and output dense):
  weights per output channel at ``weight_bits``, the layer input per tensor at ``activation_bits``. These hold
  all of the encoder's weights and nearly all of its multiply-accumulates.
* **The QA head** (``qa_outputs``, hidden -> 2 start/end logits) at W8A8 by default: it has 2 x hidden weights
  (0.003% of the model), so 4 bits saves nothing, while its error goes straight into the span scores.
* **Embedding tables** (word/position/token-type ``nn.Embedding``: a lookup with no MACs, but most of a small
  BERT's bytes) at ``embedding_bits`` per value, one min-max step and zero-point per row (8 by default;
  ``embedding_bits=None`` keeps them float). ``include`` does not apply to them, ``exclude`` does.
* **Stays float**: the attention matmuls QK^T and AV (activation x activation products, not layers with
  weights), softmax, LayerNorm, GELU and the residual adds. They are not Linear/Conv modules, so the engine
  leaves them alone by construction; ``include`` also keeps any pooler or other head out of the plan.
* The first encoder layer (layer 0 query) gets **no** 8-bit exception: unlike a CNN's first conv, it reads the
  normalised embedding output, not raw input, and is as robust as the other projections.

Activation ranges and the layer losses include the padded positions of the calibration batches (their hidden
states are ordinary values computed from the real tokens); :func:`~hf_adaquant.tasks.squad.squad_calibration_batches`
batches features by length so padding stays a small share.

GELU follows ``intermediate.dense``: the layer-wise AdaQuant loss is the plain MSE on the pre-GELU output (only
ReLU/ReLU6 are applied to both sides of the loss, as the engine detects them; no ReLU is assumed for GELU).
"""

from __future__ import annotations

from typing import Any, Callable

from .config import AdaQuantConfig

__all__ = ["BERT_ENCODER_PATTERN", "POLICIES", "bert_qa_quantization_config", "policy_config"]

BERT_ENCODER_PATTERN = "*encoder.layer.*"


def bert_qa_quantization_config(weight_bits: int = 8, activation_bits: int | None = 8, *, pipeline: str = "light",
                                head: str = "qa_outputs", head_bits: tuple[int, int | None] | None = (8, 8),
                                **overrides: Any) -> AdaQuantConfig:
    """``AdaQuantConfig`` implementing the BERT QA policy above.

    Args:
        weight_bits / activation_bits: precision of the encoder's Linear layers.
        pipeline: "light" or "advanced".
        head: name of the QA head Linear in the model. head_bits: its ``(w, a)``; None quantizes it like the
            encoder (pinned inside the budget when ``size_budget``/``bops_budget`` is given).
        overrides: any other ``AdaQuantConfig`` field (``iterations``, ``activation_range_method``, ...);
            ``layer_bits`` / ``pinned_layers`` entries are merged after the head's.
    """
    head_entry = {}
    if head_bits is not None:
        abits = None if activation_bits is None else head_bits[1]
        head_entry[head] = (head_bits[0], abits)
    # Under a size/BOPs budget the bit allocation owns layer_bits: the head is pinned inside the budget instead.
    budgeted = overrides.get("size_budget") is not None or overrides.get("bops_budget") is not None
    key = "pinned_layers" if budgeted else "layer_bits"
    overrides[key] = {**head_entry, **(overrides.get(key) or {})}
    include = overrides.pop("include", None) or [BERT_ENCODER_PATTERN, head]
    return AdaQuantConfig(weight_bits=weight_bits, activation_bits=activation_bits, pipeline=pipeline,
                          first_last_bits=overrides.pop("first_last_bits", None), include=include, **overrides)


POLICIES: dict[str, Callable[..., AdaQuantConfig]] = {"bert-qa": bert_qa_quantization_config}
"""Policies by the name recipes use (``quantization.policy``)."""


def policy_config(name: str, **fields: Any) -> AdaQuantConfig:
    """The config of policy ``name`` with ``fields`` (``weight_bits``, ``activation_bits``, ``pipeline`` and any
    other ``AdaQuantConfig`` field or policy argument).

    Raises:
        ValueError: an unknown policy name (naming the known ones).
    """
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known policies: {sorted(POLICIES)}")
    return POLICIES[name](**fields)
