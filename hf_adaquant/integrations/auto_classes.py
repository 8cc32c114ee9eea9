"""The transformers Auto class for each task name: one table for the Optimum quantizer and the recipes."""

from __future__ import annotations

__all__ = ["TASK_AUTO_CLASSES", "auto_class_name"]

TASK_AUTO_CLASSES = {
    "question-answering": "AutoModelForQuestionAnswering",
    "text-classification": "AutoModelForSequenceClassification",
    "sequence-classification": "AutoModelForSequenceClassification",  # the recipes' name for it
    "token-classification": "AutoModelForTokenClassification",
    "fill-mask": "AutoModelForMaskedLM",
    "feature-extraction": "AutoModel",
    "text-generation": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
}


def auto_class_name(task: str) -> str:
    """``AutoModelFor...`` for ``task`` (``ValueError`` naming the known tasks otherwise)."""
    if task not in TASK_AUTO_CLASSES:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASK_AUTO_CLASSES)}")
    return TASK_AUTO_CLASSES[task]
