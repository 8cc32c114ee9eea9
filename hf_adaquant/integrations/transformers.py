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

A transformers model returned by :func:`hf_adaquant.quantize` is marked quantized too (a finalizer registered with
``quantize``): its ``save_pretrained`` / ``push_to_hub`` write the compact checkpoint, never a float one.
"""

from __future__ import annotations

import inspect
import logging
import os
import types
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from ..config import AdaQuantConfig as CoreAdaQuantConfig
from ..hub.push import push_model_to_hub
from ..nn.qembedding import FrozenQEmbedding
from ..hub.push import push_to_hub as hub_push
from ..quantize import quantize, register_model_finalizer
from ..serialization.checkpoint import (CheckpointError, attach_report, check_weights_header,
                                        quantization_config_dict, read_weights, register_checkpoint_loader,
                                        save_quantized, validate_layout, verify_layer_tensors)
from ..serialization.embeddings import quantize_embedding_skeleton_
from ..serialization.layout import (apply_signed, build_qmodule, layer_tensor_specs, replace_folded_batchnorms_,
                                    unpack_layer)
from ..utils.modules import set_submodule
from .calibration import text_batches_from_config
from .transformers_config import AdaQuantConfig

__all__ = ["AdaQuantHfQuantizer", "PackedQLayer", "QUANT_METHOD", "load_checkpoint", "mark_quantized", "register"]

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


# What save_pretrained(push_to_hub=True, **kwargs) hands on to the upload (the rest are transformers' saving options,
# which the compact format does not use).
_PUSH_KWARGS = frozenset(inspect.signature(hub_push).parameters) - {"save_dir", "repo_id"}


def _save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *args: Any, push_to_hub: bool = False,
                     **kwargs: Any) -> None:
    """``save_pretrained`` of an adaquant model: the compact checkpoint; with ``push_to_hub=True`` it is then
    uploaded with our card by :func:`hf_adaquant.hub.push_to_hub` (``repo_id`` defaults to the folder name, as in
    transformers)."""
    if not kwargs.pop("is_main_process", True):  # transformers' convention: only the main process writes
        return
    save_dir = save_quantized(model, save_directory)
    if push_to_hub:
        repo_id = kwargs.pop("repo_id", Path(save_directory).name)
        hub_push(save_dir, repo_id, **{k: v for k, v in kwargs.items() if k in _PUSH_KWARGS})


def _push_to_hub(model: nn.Module, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                 revision: str | None = None, commit_message: str | None = None,
                 commit_description: str | None = None, create_pr: bool = False, tags: list[str] | None = None,
                 **kwargs: Any) -> Any:
    """``model.push_to_hub`` of an adaquant model (transformers' arguments): the compact checkpoint and our card
    (bits per layer, config, loading snippet) in one commit, never transformers' float weights or generic card.

    Other keywords are :func:`hf_adaquant.hub.push_to_hub`'s (``api``, ``eval_results``, ``base_model``) or
    transformers' saving options (``max_shard_size``, ``safe_serialization``...), which do not apply here.
    """
    ignored = sorted(set(kwargs) - _PUSH_KWARGS)
    if ignored:
        _logger.info("push_to_hub: %s do not apply to adaquant checkpoints; ignored", ", ".join(ignored))
    extra = {k: v for k, v in kwargs.items() if k in _PUSH_KWARGS}
    return push_model_to_hub(model, repo_id, private=private, token=token, revision=revision,
                             commit_message=commit_message, commit_description=commit_description,
                             create_pr=create_pr, tags=tags, **extra)


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
    model.push_to_hub = types.MethodType(_push_to_hub, model)  # transformers' would upload its generic card
    if "transformers_weights" in model.config.__dict__:
        del model.config.transformers_weights
    return model


def _finalize_quantized(model: nn.Module) -> None:
    """``quantize``'s finalizer: a transformers model it returns saves and pushes the quantized format."""
    if isinstance(model, PreTrainedModel):
        mark_quantized(model)


def _local_weights_file(config: Any, weights_file: str) -> Path | None:
    """The weights file of a checkpoint loaded from a local folder (``config._name_or_path``), if it is there."""
    name_or_path = getattr(config, "_name_or_path", None)
    if not name_or_path:
        return None
    path = Path(name_or_path) / weights_file
    return path if path.is_file() else None


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

    def __init__(self, quantization_config: CoreAdaQuantConfig | dict, **kwargs: Any) -> None:
        if isinstance(quantization_config, dict):
            quantization_config = AdaQuantConfig.from_dict(quantization_config)
        elif isinstance(quantization_config, CoreAdaQuantConfig):  # e.g. built by a policy or a recipe
            quantization_config = AdaQuantConfig.from_config(quantization_config)
        super().__init__(quantization_config, **kwargs)
        self.layout = (validate_layout(quantization_config, "config.json quantization_config")
                       if self.pre_quantized else None)
        self.weights_path: str | None = None  # the checkpoint file being loaded (named in errors)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized and self.quantization_config.dataset is None:
            raise ValueError("quantize-on-load needs calibration data: pass AdaQuantConfig(dataset=..., "
                             "tokenizer=...) (a datasets name, a local dataset or a list of texts/inputs)")

    def update_attn_implementation(self, config: Any) -> Any:
        # The only hook that sees the config before transformers resolves the weights file (see module docstring).
        if self.pre_quantized:
            config.transformers_weights = self.layout["weights_file"]
            # transformers opens the file (for its dtype) before any other hook; a truncated one would fail there
            # with a SafetensorError naming no file. Check the header here (cheap) when the folder is local.
            local = _local_weights_file(config, self.layout["weights_file"])
            if local is not None:
                check_weights_header(local, self.layout)
        return config

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            return model
        for path in checkpoint_files or []:
            # a clear error naming the file if it is truncated, corrupted, or not saved with this config.json
            verify_layer_tensors(read_weights(path, layout=self.layout), self.layout, str(path))
            self.weights_path = str(path)
        replace_folded_batchnorms_(model, self.layout["folded_batchnorms"])
        for name, desc in self.layout["layers"].items():
            set_submodule(model, name, PackedQLayer(model.get_submodule(name), desc))
        # quantized embedding tables load straight into packed modules (buffers named as stored)
        quantize_embedding_skeleton_(model, self.layout.get("embeddings", {}), "config.json", placeholder=True)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            where = self.weights_path or "checkpoint"
            for name, module in list(model.named_modules()):
                if isinstance(module, PackedQLayer):
                    try:
                        set_submodule(model, name, module.to_qmodule(f"{where}: layer {name!r}"))
                    except ValueError as exc:
                        raise CheckpointError(str(exc)) from exc
                elif isinstance(module, FrozenQEmbedding):  # as save_quantized's models: the float32 grid table
                    set_submodule(model, name, module.unfrozen())
            attach_report(model, self.quantization_config.to_dict())
        else:
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


def load_checkpoint(directory: Path, config: dict[str, Any]) -> nn.Module:
    """Rebuild a saved transformers checkpoint with its architecture's ``from_pretrained`` (through the "adaquant"
    quantizer): what :func:`hf_adaquant.load_quantized` does for a transformers folder without ``model=``."""
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    return cls.from_pretrained(str(directory), device_map=None)


def register() -> None:
    """Register "adaquant" with transformers, and mark the transformers models ``quantize`` returns as quantized;
    idempotent (re-imports and reloads replace the entries)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is None:
        register_quantization_config(QUANT_METHOD)(AdaQuantConfig)
    else:
        AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = AdaQuantConfig
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is None:
        register_quantizer(QUANT_METHOD)(AdaQuantHfQuantizer)
    else:
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = AdaQuantHfQuantizer
    register_model_finalizer(_finalize_quantized)
    register_checkpoint_loader("transformers", load_checkpoint)


register()
