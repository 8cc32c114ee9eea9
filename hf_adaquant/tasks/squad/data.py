"""SQuAD v1.1 json (optionally gzipped) -> flat list of question examples, filtered by article index.

The file is read by ``datasets``' json loader (``field="data"``: one row per article, cached as Arrow after the
first read); this module only flattens articles -> paragraphs -> questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import datasets

from ...data.paths import shared_dir

__all__ = ["EVAL_ARTICLES", "CALIBRATION_ARTICLES", "SquadExample", "default_squad_path", "load_squad_examples",
           "squad_references"]

# The offline MiniLM-SQuAD model was fine-tuned on dev articles 0-39: evaluate on 40-47 only, calibrate on 0-39.
EVAL_ARTICLES = range(40, 48)
CALIBRATION_ARTICLES = range(0, 40)


@dataclass(frozen=True)
class SquadExample:
    """One question with its context and gold answers (``answers`` in ``evaluate``'s squad layout)."""

    id: str
    article: int
    title: str
    context: str
    question: str
    answers: dict  # {"text": [...], "answer_start": [...]}


def default_squad_path() -> Path:
    """``shared/data/squad/dev-v1.1.json.gz`` (development machines only).

    Raises:
        FileNotFoundError: no ``shared/`` folder was found.
    """
    root = shared_dir()
    if root is None:
        raise FileNotFoundError("no shared/ folder found (set HF_ADAQUANT_SHARED); pass the SQuAD json path")
    return root / "data" / "squad" / "dev-v1.1.json.gz"


def _read_articles(path: Path) -> datasets.Dataset:
    """The ``data`` list of a SQuAD json file as a ``datasets.Dataset`` of articles, in file order."""
    try:
        articles = datasets.load_dataset("json", data_files=str(path), field="data", split="train")
    except datasets.exceptions.DatasetGenerationError as err:  # not json, or no top-level "data" list
        raise ValueError(f"{path} is not SQuAD json: expected a top-level {{'data': [articles]}}") from err
    if "paragraphs" not in articles.column_names:
        raise ValueError(f"{path} is not SQuAD json: its articles have no 'paragraphs'")
    return articles


def load_squad_examples(path: str | Path | None = None, articles: Iterable[int] | None = EVAL_ARTICLES
                        ) -> list[SquadExample]:
    """Questions of the SQuAD v1.1 file ``path`` (``.json`` or ``.json.gz``), from the given article indices.

    Args:
        path: the official json layout (``{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}``); default
            the shared dev set.
        articles: article indices to keep (default 40-47, the evaluation split); None keeps all.

    Raises:
        FileNotFoundError: the file does not exist. ValueError: not SQuAD json, or an article index is out of range.
    """
    path = Path(path) if path is not None else default_squad_path()
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file not found: {path}")
    data = _read_articles(path)
    num = len(data)
    wanted = list(range(num)) if articles is None else sorted(set(articles))
    bad = [a for a in wanted if not 0 <= a < num]
    if bad:
        raise ValueError(f"article indices {bad} out of range: {path} has {num} articles")
    examples: list[SquadExample] = []
    for a, article in zip(wanted, data.select(wanted)):
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                examples.append(SquadExample(
                    id=qa["id"], article=a, title=article.get("title") or "", context=paragraph["context"],
                    question=qa["question"],
                    answers={"text": [x["text"] for x in qa["answers"]],
                             "answer_start": [x["answer_start"] for x in qa["answers"]]}))
    return examples


def squad_references(examples: Iterable[SquadExample]) -> list[dict]:
    """References in ``evaluate``'s squad format."""
    return [{"id": e.id, "answers": e.answers} for e in examples]
