"""``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` on quantized timm and plain PyTorch models.

transformers models get them through :mod:`hf_adaquant.integrations.transformers`. Other models are bound the same
three methods, ``huggingface_hub.ModelHubMixin``-style (as optimum-quanto's wrappers give them), by a finalizer
of :func:`hf_adaquant.quantize`: methods on the instance, not a new class, so ``type(model)`` (which tells a timm
model from a plain one) is unchanged.

    >>> qmodel = hf_adaquant.quantize(timm_model, batches, config)
    >>> qmodel.save_pretrained("out/resnet-w4a8")
    >>> qmodel.push_to_hub("me/resnet-w4a8", private=True, tags=["imagenet"])
    >>> again = qmodel.from_pretrained("me/resnet-w4a8")
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from ..hub.push import push_model_to_hub
from ..hub.push import push_to_hub as hub_push
from ..quantize import register_model_finalizer
from ..serialization.checkpoint import load_quantized, register_load_finalizer, save_quantized

__all__ = ["add_hub_methods"]


def _save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, push_to_hub: bool = False,
                     repo_id: str | None = None, **push_kwargs: Any) -> Path:
    """Write the compact checkpoint (``save_quantized``); with ``push_to_hub=True`` upload it with our card
    (``repo_id`` defaults to the folder name; ``push_kwargs`` are :func:`hf_adaquant.hub.push_to_hub`'s)."""
    save_dir = save_quantized(model, save_directory)
    if push_to_hub:
        hub_push(save_dir, repo_id or Path(save_directory).name, **push_kwargs)
    return save_dir


def _push_to_hub(model: nn.Module, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                 revision: str | None = None, commit_message: str | None = None,
                 commit_description: str | None = None, create_pr: bool = False, tags: list[str] | None = None,
                 **kwargs: Any) -> Any:
    """Upload the compact checkpoint and our model card in one commit (``huggingface_hub``'s arguments)."""
    return push_model_to_hub(model, repo_id, private=private, token=token, revision=revision,
                             commit_message=commit_message, commit_description=commit_description,
                             create_pr=create_pr, tags=tags, **kwargs)


def _from_pretrained(self: nn.Module, path_or_repo_id: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """``load_quantized(path_or_repo_id, **kwargs)`` (a plain PyTorch checkpoint needs ``model=<float
    skeleton>``), with these methods bound to the result."""
    return load_quantized(path_or_repo_id, **kwargs)  # the load finalizer binds the methods


class _HubMethod:
    """``func`` bound to ``model``, like ``types.MethodType``, but picklable: a bound method pickles as
    ``getattr(model, func.__name__)``, which a fresh instance lacks, so ``torch.save(model)`` and ``copy.deepcopy``
    would fail. This pickles as (module-level function, model)."""

    def __init__(self, func: Any, model: nn.Module) -> None:
        functools.update_wrapper(self, func)
        self.func = func
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(self.model, *args, **kwargs)


def add_hub_methods(model: nn.Module) -> nn.Module:
    """Bind ``save_pretrained``, ``push_to_hub`` and ``from_pretrained`` to a quantized timm / plain model (in
    place; transformers models are left to their own integration). Returns ``model``."""
    if isinstance(model, PreTrainedModel):
        return model
    model.save_pretrained = _HubMethod(_save_pretrained, model)
    model.push_to_hub = _HubMethod(_push_to_hub, model)
    model.from_pretrained = _HubMethod(_from_pretrained, model)
    return model


register_model_finalizer(add_hub_methods)
register_load_finalizer(add_hub_methods)
