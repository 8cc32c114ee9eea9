"""Calibration data from ``datasets``: Hub names (online users), local json / imagefolder / saved datasets, lists.

Two jobs: :func:`load_calibration_dataset` builds a shuffled, truncated ``datasets.Dataset`` (what
``AdaQuantQuantizer.get_calibration_dataset`` returns); :func:`dataset_to_batches` turns such a dataset (or a list)
into the input batches :func:`hf_adaquant.quantize` takes.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import datasets
import torch
from torch import nn

from ..serialization.checkpoint import model_kind
from ..utils.deprecation import renamed_kwargs

__all__ = ["dataset_to_batches", "load_calibration_dataset", "model_input_names", "tokenize_texts",
           "text_batches_from_config"]

_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def _load_raw(source: Any, split: str, config_name: str | None, **kwargs: Any):

    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        return source[split]
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("the calibration list is empty")
        if all(isinstance(s, str) for s in source):
            return datasets.Dataset.from_dict({"text": list(source)})
        if all(isinstance(s, Mapping) for s in source):
            return datasets.Dataset.from_list([dict(s) for s in source])
        raise TypeError("a calibration list must hold strings or dicts of features (or pass batches of tensors "
                        "straight to quantize)")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"calibration dataset must be a name, a path, a datasets.Dataset or a list, got {type(source)!r}")
    path = Path(source)
    if not path.exists() and (str(path).endswith(_JSON_SUFFIXES) or path.is_absolute()
                              or str(source).startswith((".", "~"))):
        raise FileNotFoundError(f"calibration dataset {str(source)!r}: no such file or folder")
    if path.is_file() and str(path).endswith(_JSON_SUFFIXES):
        return datasets.load_dataset("json", data_files=str(path), split="train", **kwargs)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():  # Dataset.save_to_disk
            loaded = datasets.load_from_disk(str(path))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if any(p.suffix.lower() in (".jpg", ".jpeg", ".png") for p in path.rglob("*")):
            return datasets.load_dataset("imagefolder", data_dir=str(path), split="train", **kwargs)
    # a Hub dataset name (needs network) or any builder name datasets knows
    return datasets.load_dataset(str(source), config_name, split=split, **kwargs)


@renamed_kwargs(split="dataset_split")
def load_calibration_dataset(source: Any, num_samples: int = 100, *, dataset_config_name: str | None = None,
                             dataset_split: str = "train", preprocess_function: Callable | None = None,
                             preprocess_batch: bool = True, seed: int = 2016, token: str | bool | None = None,
                             **load_kwargs: Any) -> datasets.Dataset:
    """A ``datasets.Dataset`` of at most ``num_samples`` rows, shuffled with ``seed``, then preprocessed.

    ``source``: a Hub dataset name, a local ``.json``/``.jsonl`` file, an image folder, a ``save_to_disk``
    directory, a ``datasets.Dataset``, or a list of strings (column ``"text"``) / dicts. ``token`` goes to
    ``datasets.load_dataset`` (gated or private Hub datasets). ``split=`` is the deprecated name of
    ``dataset_split``.
    """
    if token is not None:
        load_kwargs["token"] = token
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    ds = _load_raw(source, dataset_split, dataset_config_name, **load_kwargs)
    ds = ds.shuffle(seed=seed).select(range(min(num_samples, len(ds))))
    if preprocess_function is not None:
        ds = ds.map(preprocess_function, batched=preprocess_batch, remove_columns=ds.column_names)
    return ds


def model_input_names(model: nn.Module) -> set[str] | None:
    """Keyword inputs ``model.forward`` accepts (None when it takes ``**kwargs``)."""
    params = inspect.signature(model.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def dataset_to_batches(data: Any, model: nn.Module, batch_size: int = 8) -> list[Any]:
    """Input batches for ``model`` from a ``datasets.Dataset`` (columns the model does not take are dropped;
    a single remaining column is passed positionally) or a ready list/iterable of batches (returned as is)."""
    if not isinstance(data, datasets.Dataset):
        if isinstance(data, (torch.Tensor, Mapping)):
            return [data]
        return list(data)
    accepted = model_input_names(model)
    columns = [c for c in data.column_names if accepted is None or c in accepted]
    if not columns:
        tensor_columns = [c for c in data.column_names if c in ("pixel_values", "input", "x", "image")]
        if len(tensor_columns) != 1:
            raise ValueError(f"no dataset column matches the model's inputs {sorted(accepted or [])}; columns: "
                             f"{data.column_names} (use preprocess_function to produce them)")
        columns = tensor_columns
    # transformers models take keyword inputs; timm / plain models one positional tensor
    positional = model_kind(model) != "transformers" and len(columns) == 1
    data = data.with_format("torch", columns=columns)
    batches = []
    for start in range(0, len(data), batch_size):
        rows = data[start:start + batch_size]
        batch = {c: _as_tensor(rows[c]) for c in columns}
        batches.append(batch[columns[0]] if positional else batch)
    return batches


def tokenize_texts(tokenizer: Any, rows: dict[str, list], text_column: str | None, max_length: int
                   ) -> dict[str, torch.Tensor]:
    """Tokenise a column of text (or question/context pairs) to fixed-length tensors."""
    if text_column is not None:
        if text_column not in rows:
            raise ValueError(f"text_column {text_column!r} is not in the dataset columns {sorted(rows)}")
        return dict(tokenizer(rows[text_column], truncation=True, max_length=max_length, padding="max_length",
                              return_tensors="pt"))
    if "question" in rows and "context" in rows:
        return dict(tokenizer(rows["question"], rows["context"], truncation="only_second", max_length=max_length,
                              padding="max_length", return_tensors="pt"))
    column = "text" if "text" in rows else next((c for c, v in rows.items() if v and isinstance(v[0], str)), None)
    if column is None:
        raise ValueError(f"no text column among {sorted(rows)}; set AdaQuantConfig.text_column")
    return dict(tokenizer(rows[column], truncation=True, max_length=max_length, padding="max_length",
                          return_tensors="pt"))


def text_batches_from_config(config: Any, model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Calibration batches for quantize-on-load from ``config.dataset`` (+ ``config.tokenizer``).

    Raises:
        ValueError: no dataset, or text data without a tokenizer.
    """
    if config.dataset is None:
        raise ValueError("quantize-on-load needs calibration data: AdaQuantConfig(dataset=..., tokenizer=...)")
    source = config.dataset
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], (torch.Tensor, Mapping)) and all(
            isinstance(v, torch.Tensor) for v in (source[0].values() if isinstance(source[0], Mapping) else [source[0]])):
        return list(source)  # ready input batches
    ds = load_calibration_dataset(source, config.num_samples, dataset_split=config.dataset_split,
                                  dataset_config_name=config.dataset_config_name, seed=config.seed)
    accepted = model_input_names(model)
    if accepted is not None and set(ds.column_names) & accepted and "input_ids" in ds.column_names:
        return dataset_to_batches(ds, model, config.calibration_batch_size)  # already tokenised
    tokenizer = config.tokenizer
    if tokenizer is None:
        raise ValueError("text calibration data needs a tokenizer: AdaQuantConfig(tokenizer=...)")
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    batches = []
    for start in range(0, len(ds), config.calibration_batch_size):
        rows = ds[start:start + config.calibration_batch_size]
        encoded = tokenize_texts(tokenizer, rows, config.text_column, config.max_length)
        batches.append({k: v for k, v in encoded.items() if accepted is None or k in accepted})
    return batches
