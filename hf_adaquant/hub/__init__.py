"""Hugging Face Hub publishing: model card generation and ``push_to_hub`` for saved checkpoints."""

from .card import build_model_card as build_model_card
from .checkpoint_info import EVAL_RESULTS_FILE as EVAL_RESULTS_FILE
from .checkpoint_info import RECIPE_FILE as RECIPE_FILE
from .checkpoint_info import CheckpointInfo as CheckpointInfo
from .checkpoint_info import layer_bits_from_config as layer_bits_from_config
from .checkpoint_info import read_checkpoint_info as read_checkpoint_info
from .push import HubApi as HubApi
from .push import push_to_hub as push_to_hub

__all__ = [
    "EVAL_RESULTS_FILE",
    "RECIPE_FILE",
    "CheckpointInfo",
    "HubApi",
    "build_model_card",
    "layer_bits_from_config",
    "push_to_hub",
    "read_checkpoint_info",
]
