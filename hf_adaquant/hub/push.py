"""Publish a saved checkpoint folder (or a quantized model) to the Hugging Face Hub with our model card.

One ``HfApi.create_commit`` per push: every file of the folder is a ``CommitOperationAdd`` read in place, and the
card is added from memory, so the folder itself is never written to (a failed or interrupted upload leaves it
exactly as it was) and no staging copy is made. The token is only handed to ``huggingface_hub``: it is never
logged, printed or written to a file.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn

from ..serialization.checkpoint import save_quantized
from .card import build_model_card
from .checkpoint_info import read_checkpoint_info
from ..version import __version__

__all__ = ["HubApi", "push_model_to_hub", "push_to_hub"]

_logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload AdaQuant-quantized model (hf-adaquant)"
CARD_NAME = "README.md"


class HubApi(Protocol):
    """The ``huggingface_hub.HfApi`` methods the upload uses (tests inject a local stand-in)."""

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any: ...

    def create_branch(self, repo_id: str, *, branch: str, **kwargs: Any) -> Any: ...

    def create_commit(self, repo_id: str, operations: Sequence[CommitOperationAdd], **kwargs: Any) -> Any: ...


def _operations(folder: Path, card: bytes | None) -> list[CommitOperationAdd]:
    """One add per file of ``folder`` (hidden files such as ``.cache`` are not part of a model); ``card``
    replaces a ``README.md`` found there."""
    ops = []
    for src in sorted(folder.rglob("*")):
        rel = src.relative_to(folder)
        if src.is_dir() or any(part.startswith(".") for part in rel.parts):
            continue
        if card is not None and rel.as_posix() == CARD_NAME:
            continue
        ops.append(CommitOperationAdd(path_in_repo=rel.as_posix(), path_or_fileobj=str(src)))
    if card is not None:
        ops.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card))
    return ops


def _default_api(token: str | bool | None) -> HubApi:
    return HfApi(token=token, library_name="hf-adaquant", library_version=__version__)


def push_to_hub(
    save_dir: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    tags: Sequence[str] | None = None,
    api: HubApi | None = None,
    eval_results: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    model_card: bool = True,
) -> Any:
    """Upload a checkpoint folder written by ``save_quantized`` to ``repo_id``, with our model card, in one commit.

    The arguments up to ``tags`` are those of ``huggingface_hub``'s / transformers' ``push_to_hub``. Creates the
    repository if needed (``create_repo(exist_ok=True)``) and the ``revision`` branch if it is missing, then
    makes one ``create_commit``.

    Args:
        save_dir: the checkpoint folder (``config.json`` with ``quantization_config`` + safetensors weights;
            optional ``eval_results.json`` and ``recipe.yaml`` side-cars feed the card).
        repo_id: ``"user/name"`` on the Hub.
        private: visibility of a new repository (``None``: the Hub's default, e.g. an organisation's setting).
        token: Hub token; ``None`` uses the login stored by ``hf auth login`` / ``HF_TOKEN``.
        revision: branch to commit to (created from the default branch if missing).
        commit_message / commit_description: of the upload commit.
        create_pr: open a pull request instead of committing to the branch.
        tags: extra Hub tags for the card's metadata.
        api: an ``HfApi``-like object; defaults to ``huggingface_hub.HfApi(token=token)``.
        eval_results: FP vs quantized metrics for the card (format of ``eval_results.json``); defaults to the
            folder's ``eval_results.json``.
        base_model: Hub id of the float model, for the card's ``base_model`` metadata.
        model_card: generate ``README.md`` (replacing one in the folder, in the upload only).

    Returns:
        What ``create_commit`` returns (a ``CommitInfo`` for the real Hub).

    Raises:
        FileNotFoundError / ValueError: ``save_dir`` is not a quantized checkpoint, or ``repo_id`` is malformed.

    Example:
        >>> push_to_hub("out/resnet18-w4a8", "me/resnet18-adaquant-w4a8", tags=["imagenet"])
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"invalid repo id {repo_id!r}: {err}") from None
    info = read_checkpoint_info(save_dir)
    api = api if api is not None else _default_api(token)
    card = None
    if model_card:
        card = str(build_model_card(info, repo_id, eval_results=eval_results, base_model=base_model,
                                    tags=tags)).encode()
    operations = _operations(info.path, card)
    _logger.info("pushing %d files from %s to %s", len(operations), info.path, repo_id)
    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    if revision is not None and not revision.startswith("refs/pr"):  # as transformers: a new branch is made
        api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    return api.create_commit(repo_id, operations, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                             commit_description=commit_description, token=token, repo_type="model",
                             revision=revision, create_pr=create_pr)


def push_model_to_hub(model: nn.Module, repo_id: str, *, base_model: str | None = None, **kwargs: Any) -> Any:
    """Save a quantized model with ``save_quantized`` into a temporary folder and :func:`push_to_hub` it.

    ``kwargs`` are :func:`push_to_hub`'s (``private``, ``token``, ``revision``, ``commit_message``, ``tags``...).
    """
    with tempfile.TemporaryDirectory(prefix="hf-adaquant-push-") as tmp:
        save_dir = save_quantized(model, Path(tmp) / "checkpoint")
        return push_to_hub(save_dir, repo_id, base_model=base_model, **kwargs)
