"""The checkpoint layout of quantized embedding tables (:class:`~hf_adaquant.nn.qembedding.QEmbedding`).

A table ``E`` is stored as ``E.weight_packed`` (``(rows, row_nbytes)`` uint8: each row's unsigned codes packed on
their own, 8-bit slots for 5..8 bits, 4-bit for 3..4, 2-bit for 2), ``E.weight_scale`` (float32 step per row) and
``E.weight_zero_point`` (int32 per row), and described in ``checkpoint_layout["embeddings"][E]`` by its bits and
shape. Reloading rebuilds exactly the table the quantized model computed with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..nn.qembedding import FrozenQEmbedding, QEmbedding, pack_rows, row_nbytes, unpack_rows
from .pack import check_tensor_specs

__all__ = ["check_embedding_tensors", "describe_embeddings", "embedding_tensor_specs", "pack_embedding",
           "quantize_embedding_skeleton_", "unpack_embedding", "validate_embedding_description"]

_KEYS = ("bits", "shape")


def describe_embeddings(qmodel: nn.Module) -> dict[str, dict[str, Any]]:
    """``{name: {"bits", "shape"}}`` of the model's quantized embedding tables."""
    return {name: {"bits": m.bits, "shape": [m.num_embeddings, m.embedding_dim]}
            for name, m in qmodel.named_modules() if isinstance(m, QEmbedding)}


def validate_embedding_description(desc: Any) -> None:
    """Check one ``checkpoint_layout.embeddings`` entry.

    Raises:
        ValueError: a field is missing or impossible (names it).
    """
    if not isinstance(desc, dict):
        raise ValueError(f"must be a JSON object, got {type(desc).__name__}")
    missing = [key for key in _KEYS if key not in desc]
    if missing:
        raise ValueError(f"lacks {missing}")
    bits = desc["bits"]
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    shape = desc["shape"]
    if not isinstance(shape, list) or len(shape) != 2 or \
            not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ValueError(f"shape must be [rows, dim] (positive integers), got {shape!r}")


def embedding_tensor_specs(desc: dict[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{suffix: (dtype, shape)}`` of the tensors stored for a table described by ``desc``."""
    rows, dim = desc["shape"]
    return {"weight_packed": (torch.uint8, (rows, row_nbytes(dim, desc["bits"]))),
            "weight_scale": (torch.float32, (rows,)), "weight_zero_point": (torch.int32, (rows,))}


@torch.no_grad()
def pack_embedding(module: QEmbedding) -> dict[str, torch.Tensor]:
    """``{suffix: tensor}`` holding ``module``'s packed codes, steps and zero-points (CPU)."""
    packed = module.weight_packed if isinstance(module, FrozenQEmbedding) else pack_rows(module.int_codes(),
                                                                                         module.bits)
    return {"weight_packed": packed.cpu().clone(), "weight_scale": module.weight_scale.float().cpu().clone(),
            "weight_zero_point": module.weight_zero_point.to(torch.int32).cpu().clone()}


def check_embedding_tensors(tensors: dict[str, torch.Tensor], desc: dict[str, Any]) -> None:
    """Check a table's stored tensors against its description: names, dtypes, shapes, zero-points and codes on
    the described grid, positive finite steps.

    Raises:
        ValueError: the first inconsistency, naming the tensor.
    """
    check_tensor_specs(tensors, embedding_tensor_specs(desc))
    top = 2 ** desc["bits"] - 1
    zero_point = tensors["weight_zero_point"]
    if bool(((zero_point < 0) | (zero_point > top)).any()):
        raise ValueError(f"tensor 'weight_zero_point' leaves the {desc['bits']}-bit grid [0, {top}]")
    step = tensors["weight_scale"]
    if not bool((torch.isfinite(step) & (step > 0)).all()):
        raise ValueError("tensor 'weight_scale' holds steps that are not finite and positive")
    if int(unpack_rows(tensors["weight_packed"], desc["bits"], desc["shape"][1]).max()) > top:
        raise ValueError(f"tensor 'weight_packed' holds codes beyond the {desc['bits']}-bit grid")


def unpack_embedding(tensors: dict[str, torch.Tensor], desc: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The :class:`QEmbedding` state dict (relative names) of a stored table.

    Raises:
        ValueError: naming ``where`` (file and table) and the tensor at fault.
    """
    try:
        check_embedding_tensors(tensors, desc)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    rows, dim = desc["shape"]
    q = QEmbedding(rows, dim, desc["bits"])
    q.set_codes(unpack_rows(tensors["weight_packed"].cpu(), desc["bits"], dim),
                tensors["weight_scale"].cpu(), tensors["weight_zero_point"].cpu())
    return q.state_dict()


def quantize_embedding_skeleton_(model: nn.Module, embeddings: dict[str, dict[str, Any]],
                                 where: str = "checkpoint", placeholder: bool = False) -> None:
    """Replace each stored table's ``nn.Embedding`` of a float skeleton by a :class:`QEmbedding` (or, with
    ``placeholder``, a :class:`FrozenQEmbedding` whose buffers a state-dict loader fills), in place.

    Raises:
        ValueError: the skeleton lacks the table or has another shape (wrong architecture).
    """
    for name, desc in embeddings.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"{where}: quantized embedding {name!r} is not in the model (wrong architecture?)") \
                from exc
        if type(module) is not nn.Embedding:
            raise ValueError(f"{where}: {name!r} should be an nn.Embedding, the model has a {type(module).__name__}")
        if [module.num_embeddings, module.embedding_dim] != desc["shape"]:
            raise ValueError(f"{where}: embedding {name!r} is {[module.num_embeddings, module.embedding_dim]} in "
                             f"the model, {desc['shape']} in the checkpoint (wrong architecture or model arguments?)")
        if placeholder:
            new: nn.Module = FrozenQEmbedding.placeholder(module, desc["bits"])
        else:
            new = QEmbedding(module.num_embeddings, module.embedding_dim, desc["bits"], module.padding_idx,
                             device=module.weight.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
