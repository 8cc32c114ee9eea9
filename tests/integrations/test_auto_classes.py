"""One task -> transformers Auto class table, shared by the Optimum quantizer and the recipes."""

from __future__ import annotations

import pytest
import transformers

from hf_adaquant import quantizer
from hf_adaquant.integrations.auto_classes import TASK_AUTO_CLASSES, auto_class_name
from hf_adaquant.recipes.schema import TRANSFORMERS_TASKS


def test_every_task_names_a_transformers_class_and_recipes_tasks_are_known() -> None:
    assert all(hasattr(transformers, name) for name in TASK_AUTO_CLASSES.values())
    assert set(TRANSFORMERS_TASKS) <= set(TASK_AUTO_CLASSES)
    assert auto_class_name("sequence-classification") == auto_class_name("text-classification")
    assert quantizer.TASK_AUTO_CLASSES is TASK_AUTO_CLASSES  # the quantizer's public name is the same table


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'summarise'; known: \[.*'question-answering'"):
        auto_class_name("summarise")
