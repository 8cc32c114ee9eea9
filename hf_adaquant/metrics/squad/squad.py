"""SQuAD v1.1 exact match and F1 as an ``evaluate.Metric``, loadable offline by path.

    >>> import evaluate, hf_adaquant.metrics
    >>> squad = evaluate.load(hf_adaquant.metrics.metric_path("squad"))
    >>> squad.compute(predictions=[{"id": "1", "prediction_text": "Denver Broncos"}],
    ...               references=[{"id": "1", "answers": {"text": ["Denver Broncos"], "answer_start": [177]}}])
    {'exact_match': 100.0, 'f1': 100.0}

The same contract as the Hub's ``evaluate-metric/squad``; the scoring (official normalisation, token F1, max over
gold answers) is :func:`hf_adaquant.tasks.squad.metric.squad_scores`, so this module and the library agree.
"""

import datasets
import evaluate

from hf_adaquant.tasks.squad.metric import squad_scores

_CITATION = """@inproceedings{rajpurkar-etal-2016-squad,
    title = "{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text",
    author = "Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy",
    booktitle = "Proceedings of EMNLP", year = "2016"}"""

_DESCRIPTION = "SQuAD v1.1 exact match and token F1 (percent), official answer normalisation (hf-adaquant)."

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of {"id": str, "prediction_text": str}.
    references: list of {"id": str, "answers": {"text": [str], "answer_start": [int]}}.
Returns:
    {"exact_match": 0..100, "f1": 0..100}, averaged over the references (a question without prediction scores 0).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Squad(evaluate.Metric):
    """SQuAD v1.1 EM / F1."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")},
                "references": {"id": datasets.Value("string"),
                               "answers": datasets.Sequence({"text": datasets.Value("string"),
                                                             "answer_start": datasets.Value("int32")})},
            }),
            reference_urls=["https://rajpurkar.github.io/SQuAD-explorer/"])

    def _compute(self, predictions, references):
        return squad_scores(predictions, references)
