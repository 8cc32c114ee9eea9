"""The BERT question-answering quantization policy, for the SQuAD benchmark.

Written once, in :mod:`hf_adaquant.policies` (recipes name it ``policy: bert-qa``); re-exported here.
"""

from __future__ import annotations

from ...policies import BERT_ENCODER_PATTERN, bert_qa_quantization_config

__all__ = ["BERT_ENCODER_PATTERN", "bert_qa_quantization_config"]
