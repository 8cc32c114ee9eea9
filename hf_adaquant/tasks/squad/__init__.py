"""Extractive QA on SQuAD v1.1: data, features, span post-processing, EM/F1, evaluation and the BERT policy."""

from .data import CALIBRATION_ARTICLES, EVAL_ARTICLES, SquadExample, load_squad_examples, squad_references
from .evaluation import evaluate_squad_model, predict_squad, squad_logits
from .features import SquadFeatures, feature_batches, prepare_features, squad_calibration_batches
from .metric import Squad, exact_match_score, f1_score, load_squad_metric, normalize_answer
from .policy import bert_qa_quantization_config
from .postprocess import best_span, postprocess_predictions

__all__ = [
    "CALIBRATION_ARTICLES", "EVAL_ARTICLES", "Squad", "SquadExample", "SquadFeatures", "bert_qa_quantization_config", "best_span",
    "evaluate_squad_model", "exact_match_score", "f1_score", "feature_batches", "load_squad_examples",
    "load_squad_metric", "normalize_answer", "postprocess_predictions", "predict_squad", "prepare_features",
    "squad_calibration_batches", "squad_logits", "squad_references",
]
