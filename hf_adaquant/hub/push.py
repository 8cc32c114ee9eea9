"""Publish a saved checkpoint folder to the Hugging Face Hub with a generated model card.

The card is written into a staging copy of the folder, never into the folder itself, so a failed or interrupted
upload leaves the checkpoint exactly as it was. The token is only handed to ``huggingface_hub``: it is never
logged, printed or written to a file.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Protocol

from .card import build_model_card
from .checkpoint_info import read_checkpoint_info

__all__ = ["HubApi", "push_to_hub"]

_logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload AdaQuant-quantized model (hf-adaquant)"


class HubApi(Protocol):
    """The two ``huggingface_hub.HfApi`` methods the upload uses (tests inject a local stand-in)."""

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any: ...

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, **kwargs: Any) -> Any: ...


def _stage(save_dir: Path, staging: Path) -> None:
    """Mirror the checkpoint into ``staging`` (hard links where possible: no copy of large weights)."""
    for src in sorted(save_dir.rglob("*")):
        rel = src.relative_to(save_dir)
        if any(part.startswith(".") for part in rel.parts):  # .cache, .git, editor files: not part of a model
            continue
        dst = staging / rel
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # other file system, or links not supported
            shutil.copy2(src, dst)


def _default_api(token: str | None) -> HubApi:
    from huggingface_hub import HfApi

    from .. import __version__

    return HfApi(token=token, library_name="hf-adaquant", library_version=__version__)


def push_to_hub(
    save_dir: str | Path,
    repo_id: str,
    *,
    api: HubApi | None = None,
    token: str | None = None,
    private: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    eval_results: Mapping[str, Any] | None = None,
    create_pr: bool = False,
    base_model: str | None = None,
    model_card: bool = True,
) -> Any:
    """Upload a checkpoint folder written by ``save_quantized`` to ``repo_id``, with a model card.

    Creates the repository if needed (``create_repo(exist_ok=True)``), then uploads a staging copy of the folder
    holding the generated ``README.md`` in one commit (``upload_folder``).

    Args:
        save_dir: the checkpoint folder (``config.json`` with ``quantization_config`` + safetensors weights;
            optional ``eval_results.json`` and ``recipe.yaml`` side-cars feed the card).
        repo_id: ``"user/name"`` on the Hub.
        api: an ``HfApi``-like object; defaults to ``huggingface_hub.HfApi(token=token)``.
        token: Hub token; ``None`` uses the login stored by ``huggingface-cli login`` / ``HF_TOKEN``.
        private: create the repository as private (no effect on an existing repository).
        commit_message: message of the upload commit.
        eval_results: FP vs quantized metrics for the card (format of ``eval_results.json``); defaults to the
            folder's ``eval_results.json``.
        create_pr: open a pull request instead of committing to ``main``.
        base_model: Hub id of the float model, for the card's ``base_model`` metadata.
        model_card: generate ``README.md`` (replacing one in the folder, in the upload only).

    Returns:
        What ``upload_folder`` returns (a ``CommitInfo`` for the real Hub).

    Raises:
        FileNotFoundError / ValueError: ``save_dir`` is not a quantized checkpoint, or ``repo_id`` is malformed.

    Example:
        >>> push_to_hub("out/resnet18-w4a8", "me/resnet18-adaquant-w4a8")
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"invalid repo id {repo_id!r}: {err}") from None
    info = read_checkpoint_info(save_dir)
    api = api if api is not None else _default_api(token)
    with tempfile.TemporaryDirectory(prefix="hf-adaquant-push-") as tmp:
        staging = Path(tmp) / "upload"
        staging.mkdir()
        _stage(info.path, staging)
        if model_card:
            card = build_model_card(info, repo_id, eval_results=eval_results, base_model=base_model)
            (staging / "README.md").unlink(missing_ok=True)  # a hard link: never write through to the original
            card.save(staging / "README.md")
        files = [p for p in staging.rglob("*") if p.is_file()]
        _logger.info("pushing %d files (%.2f MiB) from %s to %s", len(files),
                     sum(p.stat().st_size for p in files) / 2**20, info.path, repo_id)
        api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=staging, commit_message=commit_message,
                                 token=token, repo_type="model", create_pr=create_pr)
