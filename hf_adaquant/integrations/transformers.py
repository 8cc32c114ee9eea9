"""transformers integration: ``AdaQuantConfig`` registered as quantization method "adaquant" + its ``HfQuantizer``.

After ``import hf_adaquant``:

* ``AutoModelForX.from_pretrained(quantized_dir)`` rebuilds a checkpoint written by ``save_quantized``: before the
  weights load, each quantized layer becomes a :class:`PackedQLayer` whose buffers carry the checkpoint's tensor
  names (``weight_packed``, ``weight_scale``...), so transformers' generic loader fills them as is; after loading
  they are unpacked into ``QLinear``/``QConv2d`` modules.
* ``AutoModelForX.from_pretrained(fp_dir, quantization_config=AdaQuantConfig(dataset=..., tokenizer=...))``
  quantizes right after the float weights load (as GPTQ does), and ``save_pretrained`` writes the compact format.

The weights file is ``adaquant_model.safetensors``, not ``model.safetensors``: transformers without this library
finds no weights and raises, instead of building a float model around missing ones. The quantizer points
transformers at it through ``config.transformers_weights``, which transformers resolves after the quantizer is
created and never writes back to ``config.json``.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from ..config import AdaQuantConfig
from ..serialization.checkpoint import quantization_config_dict, read_weights, save_quantized, validate_layout
from ..serialization.layout import (apply_signed, build_qmodule, layer_tensor_specs, replace_folded_batchnorms_,
                                    set_submodule, unpack_layer)

__all__ = ["AdaQuantHfQuantizer", "PackedQLayer", "QUANT_METHOD", "mark_quantized", "register"]

_logger = logging.getLogger(__name__)

QUANT_METHOD = "adaquant"


class PackedQLayer(nn.Module):
    """Stand-in for a quantized layer while transformers loads the checkpoint: buffers named and shaped exactly
    like the stored tensors (everything persistent: transformers re-creates non-persistent buffers as garbage)."""

    def __init__(self, float_module: nn.Module, desc: dict[str, Any]) -> None:
        super().__init__()
        self.desc = desc
        self.float_module = [float_module]  # a list: not a submodule, its float weight is not in the checkpoint
        for suffix, (dtype, shape) in layer_tensor_specs(desc).items():
            self.register_buffer(suffix, torch.empty(shape, dtype=dtype))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("PackedQLayer is a loading placeholder; the model was not finalised by AdaQuantHfQuantizer")

    def to_qmodule(self, where: str) -> nn.Module:
        """The real quantized module, weights rebuilt from the loaded codes."""
        tensors = {name: buf for name, buf in self.named_buffers(recurse=False)}
        state, signed = unpack_layer(tensors, self.desc, where)
        device = self.weight_packed.device
        with torch.device("meta"):
            q = build_qmodule(self.float_module[0], self.desc, where)
        q = q.to_empty(device=device)
        q.load_state_dict(state, strict=True)
        apply_signed(q, signed)
        return q


def _save_pretrained(model: nn.Module, save_directory: str, *args: Any, push_to_hub: bool = False,
                     **kwargs: Any) -> None:
    """``save_pretrained`` of an adaquant model: the compact checkpoint (push via ``hf_adaquant.hub``)."""
    if not kwargs.pop("is_main_process", True):  # transformers' convention: only the main process writes
        return
    save_quantized(model, save_directory)
    if push_to_hub:
        from ..hub import push_to_hub as hub_push  # another module owns the Hub upload and the model card

        repo_id = kwargs.pop("repo_id", Path(save_directory).name)
        hub_push(save_directory, repo_id, **{k: v for k, v in kwargs.items()
                                             if k in ("token", "private", "commit_message", "create_pr")})


def mark_quantized(model: nn.Module) -> nn.Module:
    """Make a quantized transformers model behave like one loaded with "adaquant": ``config.quantization_config``
    holds the run's config and checkpoint layout, and ``save_pretrained``/``push_to_hub`` write the compact format.
    """
    config = AdaQuantConfig.from_dict(quantization_config_dict(model))
    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.hf_quantizer = AdaQuantHfQuantizer(config, pre_quantized=True)
    # transformers' own save_pretrained would write model.safetensors with float weights; route to ours
    model.save_pretrained = types.MethodType(_save_pretrained, model)
    if "transformers_weights" in model.config.__dict__:
        del model.config.transformers_weights
    return model


def _transplant(model: nn.Module, qmodel: nn.Module) -> None:
    """Give ``model`` (in place: from_pretrained keeps its own object) the structure and state of ``qmodel``."""
    for name, child in qmodel.named_children():
        setattr(model, name, child)
    for name, param in qmodel._parameters.items():
        model._parameters[name] = param
    for name, buf in qmodel._buffers.items():
        model._buffers[name] = buf
    model.hf_adaquant_report = qmodel.hf_adaquant_report


class AdaQuantHfQuantizer(HfQuantizer):
    """``HfQuantizer`` for "adaquant": loads pre-quantized checkpoints, or quantizes on load with calibration data."""

    requires_calibration = False  # calibration happens in _process_model_after_weight_loading when not pre-quantized

    def __init__(self, quantization_config: AdaQuantConfig | dict, **kwargs: Any) -> None:
        if isinstance(quantization_config, dict):
            quantization_config = AdaQuantConfig.from_dict(quantization_config)
        super().__init__(quantization_config, **kwargs)
        self.layout = (validate_layout(quantization_config, "config.json quantization_config")
                       if self.pre_quantized else None)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized and self.quantization_config.dataset is None:
            raise ValueError("quantize-on-load needs calibration data: pass AdaQuantConfig(dataset=..., "
                             "tokenizer=...) (a datasets name, a local dataset or a list of texts/inputs)")

    def update_attn_implementation(self, config: Any) -> Any:
        # The only hook that sees the config before transformers resolves the weights file (see module docstring).
        if self.pre_quantized:
            config.transformers_weights = self.layout["weights_file"]
        return config

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            return model
        for path in checkpoint_files or []:
            read_weights(path)  # a clear error naming the file if it is truncated or corrupted
        replace_folded_batchnorms_(model, self.layout["folded_batchnorms"])
        for name, desc in self.layout["layers"].items():
            set_submodule(model, name, PackedQLayer(model.get_submodule(name), desc))
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            for name, module in list(model.named_modules()):
                if isinstance(module, PackedQLayer):
                    set_submodule(model, name, module.to_qmodule(f"layer {name!r}"))
            from ..serialization.checkpoint import attach_report

            attach_report(model, self.quantization_config.to_dict())
        else:
            from ..quantize import quantize
            from .calibration import text_batches_from_config

            batches = text_batches_from_config(self.quantization_config, model)
            _transplant(model, quantize(model, batches, self.quantization_config))
            self.pre_quantized = True
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        mark_quantized(model)
        self.quantization_config = model.config.quantization_config
        self.layout = self.quantization_config.checkpoint_layout
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[Any, dict]:
        raise ValueError("adaquant models are saved with hf_adaquant.save_quantized(model, dir) (model.save_pretrained "
                         "does it for models loaded or quantized by hf_adaquant)")

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register "adaquant" with transformers; idempotent (re-imports and reloads replace the entry)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is None:
        register_quantization_config(QUANT_METHOD)(AdaQuantConfig)
    else:
        AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = AdaQuantConfig
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is None:
        register_quantizer(QUANT_METHOD)(AdaQuantHfQuantizer)
    else:
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = AdaQuantHfQuantizer


register()
