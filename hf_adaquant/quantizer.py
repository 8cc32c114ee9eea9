"""``AdaQuantQuantizer``: an ``optimum`` quantizer (from_pretrained -> get_calibration_dataset -> quantize).

It subclasses ``optimum.quantization_base.OptimumQuantizer`` and follows the ORT/OpenVINO quantizers' argument
names (``get_calibration_dataset(dataset_name, num_samples, dataset_config_name, dataset_split, ...)``).

Example:
    >>> quantizer = AdaQuantQuantizer.from_pretrained("timm/resnet18.a1_in1k")
    >>> calib = quantizer.get_calibration_dataset("path/to/imagefolder", num_samples=256, preprocess_function=f)
    >>> qmodel = quantizer.quantize(AdaQuantConfig(weight_bits=4), calib, save_dir="resnet18-w4")
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import datasets
from optimum.quantization_base import OptimumQuantizer
from torch import nn

from .config import AdaQuantConfig
from .integrations.calibration import dataset_to_batches, load_calibration_dataset
from .quantize import quantize
from .serialization.checkpoint import model_kind, save_quantized
from .integrations.auto_classes import TASK_AUTO_CLASSES, auto_class_name
from .utils.deprecation import renamed_kwargs

__all__ = ["AdaQuantQuantizer", "TASK_AUTO_CLASSES"]

_logger = logging.getLogger(__name__)



def _is_timm_id(name: str) -> bool:
    return name.startswith(("timm/", "hf-hub:"))


def _load_transformers(name_or_path: str, task: str | None, **kwargs: Any) -> nn.Module:
    import torch
    import transformers

    if task is not None:
        cls = getattr(transformers, auto_class_name(task))
    else:
        config = transformers.AutoConfig.from_pretrained(name_or_path, **kwargs)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModel
    # checkpoints stored in fp16 (e.g. our MiniLM-SQuAD) are calibrated in fp32
    return cls.from_pretrained(name_or_path, dtype=kwargs.pop("dtype", torch.float32), **kwargs).eval()


class AdaQuantQuantizer(OptimumQuantizer):
    """Quantize a transformers, timm or plain PyTorch model with AdaQuant (an ``optimum`` ``OptimumQuantizer``).

    Args:
        model: the float model (not modified: :meth:`quantize` works on a copy).
        task: the transformers task it was loaded for (informational; the Auto class it picked).
    """

    def __init__(self, model: nn.Module, task: str | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model)!r}")
        from .nn import QModuleMixin

        if any(isinstance(m, QModuleMixin) for m in model.modules()):
            raise ValueError("the model is already quantized by hf_adaquant (e.g. an adaquant checkpoint loaded "
                             "from the Hub); pass the float model")
        self.model = model.eval()
        self.task = task
        self.kind = model_kind(model)
        self.qmodel: nn.Module | None = None
        self.save_dir: Path | None = None

    @classmethod
    def from_pretrained(cls, model_or_id_or_dir: nn.Module | str | os.PathLike, task: str | None = None,
                        **kwargs: Any) -> "AdaQuantQuantizer":
        """A quantizer for a model object, a Hub id or a local directory.

        ``timm/...`` and ``hf-hub:...`` ids and directories whose ``config.json`` names an ``architecture`` load
        with ``timm.create_model(..., pretrained=True)``; other ids and directories with transformers, through the
        Auto class of ``task`` or of the config's ``architectures``. ``kwargs`` go to the loader (revision,
        token, cache_dir...).

        Raises:
            ValueError: the directory already holds an adaquant checkpoint, or an unknown task.
        """
        if isinstance(model_or_id_or_dir, nn.Module):
            return cls(model_or_id_or_dir, task)
        name = str(model_or_id_or_dir)
        local = Path(name)
        if local.is_dir():
            config_path = local / "config.json"
            if not config_path.is_file():
                raise ValueError(f"{config_path}: missing; cannot tell which library the model belongs to")
            config = json.loads(config_path.read_text())
            qconfig = config.get("quantization_config") or {}
            if qconfig.get("quant_method") == "adaquant":
                raise ValueError(f"{local} already holds an adaquant checkpoint; load it with "
                                 "hf_adaquant.load_quantized (quantize the float model instead)")
            if "architecture" in config:
                import timm

                return cls(timm.create_model(f"local-dir:{local}", pretrained=True, **kwargs), task)
            return cls(_load_transformers(name, task, **kwargs), task)
        if _is_timm_id(name):
            import timm

            hub_id = name if name.startswith("hf-hub:") else f"hf-hub:{name}"
            return cls(timm.create_model(hub_id, pretrained=True, **kwargs), task)
        return cls(_load_transformers(name, task, **kwargs), task)

    @renamed_kwargs(split="dataset_split", dataset_name_or_path_or_list="dataset_name")
    def get_calibration_dataset(self, dataset_name: Any, num_samples: int = 100, dataset_config_name: str | None = None,
                                dataset_split: str = "train", preprocess_function: Callable | None = None,
                                preprocess_batch: bool = True, seed: int = 2016, token: str | bool | None = None,
                                **load_kwargs: Any) -> datasets.Dataset:
        """A ``datasets.Dataset`` of ``num_samples`` shuffled rows, mapped through ``preprocess_function``.

        Same arguments as ``ORTQuantizer`` / ``OVQuantizer.get_calibration_dataset``. ``dataset_name``: a Hub
        dataset name (needs network), a local ``.json``/``.jsonl`` file, an image folder, a ``save_to_disk``
        directory, a ``datasets.Dataset``, or a list of strings / dicts. ``preprocess_function`` should produce the
        model's inputs (``input_ids``/``attention_mask``... for transformers, ``pixel_values`` for vision models);
        other columns are dropped. The old names ``split=`` and ``dataset_name_or_path_or_list=`` still work, with
        a ``FutureWarning``.
        """
        return load_calibration_dataset(dataset_name, num_samples, dataset_config_name=dataset_config_name,
                                        dataset_split=dataset_split, preprocess_function=preprocess_function,
                                        preprocess_batch=preprocess_batch, seed=seed, token=token, **load_kwargs)

    def quantize(self, quantization_config: AdaQuantConfig, calibration_dataset: Any,
                 save_dir: str | os.PathLike | None = None, *, save_directory: str | os.PathLike | None = None,
                 batch_size: int = 8) -> nn.Module:
        """Run :func:`hf_adaquant.quantize` on a copy of the model; save when a directory is given.

        Args:
            quantization_config: the run's configuration.
            calibration_dataset: a ``datasets.Dataset`` (e.g. from :meth:`get_calibration_dataset`), or a list of
                ready input batches (tensors or dicts of tensors).
            save_dir / save_directory: where to write the compact checkpoint (either name: ORT says ``save_dir``,
                OpenVINO ``save_directory``).
            batch_size: rows per batch when ``calibration_dataset`` is a ``datasets.Dataset``.

        Returns:
            The quantized model (its run report is ``qmodel.hf_adaquant_report``).
        """
        if save_dir is not None and save_directory is not None and Path(save_dir) != Path(save_directory):
            raise ValueError(f"save_dir={save_dir!r} and save_directory={save_directory!r} disagree; pass one")
        target = save_dir if save_dir is not None else save_directory
        if not isinstance(quantization_config, AdaQuantConfig):
            raise TypeError(f"quantization_config must be an AdaQuantConfig, got {type(quantization_config)!r}")
        batches = dataset_to_batches(calibration_dataset, self.model, batch_size)
        qmodel = quantize(self.model, batches, quantization_config)
        if self.kind == "transformers":
            from .integrations.transformers import mark_quantized

            mark_quantized(qmodel)
        self.qmodel = qmodel
        if target is not None:
            self.save_dir = save_quantized(qmodel, target)
            self._save_preprocessors(self.save_dir)
        return qmodel

    def _save_preprocessors(self, save_dir: Path) -> None:
        """Copy the model's tokenizer and image processor next to the checkpoint, so that the saved folder (and a
        Hub repo pushed from it) is usable on its own, as a transformers checkpoint is."""
        source = getattr(getattr(self.model, "config", None), "name_or_path", None)
        if self.kind != "transformers" or not source:
            return
        from transformers import AutoImageProcessor, AutoTokenizer

        # A Hub id: only what is already in the local cache (no download as a side effect of saving).
        local_only = not Path(source).is_dir()
        copied = []
        for kind, auto in (("tokenizer", AutoTokenizer), ("image processor", AutoImageProcessor)):
            try:
                auto.from_pretrained(source, local_files_only=local_only).save_pretrained(str(save_dir))
                copied.append(kind)
            except (OSError, ValueError, KeyError, TypeError) as e:  # the model has none of this kind
                _logger.debug("no %s in %s (%s)", kind, source, e)
        _logger.info("copied %s from %s", " and ".join(copied) or "no preprocessor", source)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the last saved checkpoint with ``hf_adaquant.hub.push_to_hub(save_dir, repo_id, **kwargs)``.

        Raises:
            RuntimeError: nothing was saved yet (call :meth:`quantize` with ``save_dir``).
        """
        if self.save_dir is None:
            raise RuntimeError("nothing to push: call quantize(..., save_dir=...) first")
        from .hub import push_to_hub

        return push_to_hub(self.save_dir, repo_id, **kwargs)
