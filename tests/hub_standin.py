"""A local stand-in for ``huggingface_hub.HfApi``: ``create_repo``, ``create_branch``, ``create_commit`` and
``upload_folder`` into a folder (no network)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, RepoUrl


class LocalHubApi:
    """Records every call; ``upload_folder`` copies the folder to ``root/<repo_id>/`` (like one commit)."""

    endpoint = "https://huggingface.co"  # only used to format URLs: nothing is contacted

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.repos: dict[str, dict[str, Any]] = {}

    def create_repo(self, repo_id: str, *, token: Any = None, private: bool | None = None,
                    repo_type: str | None = None, exist_ok: bool = False, **kwargs: Any) -> RepoUrl:
        self.calls.append(("create_repo", dict(repo_id=repo_id, token=token, private=private, repo_type=repo_type,
                                               exist_ok=exist_ok, **kwargs)))
        if repo_id in self.repos and not exist_ok:
            raise FileExistsError(repo_id)
        self.repos.setdefault(repo_id, {"private": private})
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        # the Hub puts a bare name under the token's user
        return RepoUrl(f"{self.endpoint}/{repo_id if '/' in repo_id else 'user/' + repo_id}", endpoint=self.endpoint)

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, commit_message: str | None = None,
                      token: Any = None, repo_type: str | None = None, create_pr: bool | None = None,
                      **kwargs: Any) -> CommitInfo:
        self.calls.append(("upload_folder", dict(repo_id=repo_id, folder_path=str(folder_path),
                                                 commit_message=commit_message, token=token, repo_type=repo_type,
                                                 create_pr=create_pr, **kwargs)))
        if repo_id not in self.repos:
            raise FileNotFoundError(f"repository {repo_id} does not exist (create_repo first)")
        target = self.root / repo_id
        shutil.copytree(folder_path, target, dirs_exist_ok=True)
        n = sum(1 for c in self.calls if c[0] == "upload_folder")
        full_id = repo_id if "/" in repo_id else f"user/{repo_id}"  # the Hub puts a bare name under the user
        return CommitInfo(commit_url=f"{self.endpoint}/{full_id}/commit/{n:040x}", commit_message=commit_message or "",
                          commit_description="", oid=f"{n:040x}",
                          pr_url=f"{self.endpoint}/{full_id}/discussions/{n}" if create_pr else None)

    def create_branch(self, repo_id: str, *, branch: str, token: Any = None, repo_type: str | None = None,
                      exist_ok: bool = False, **kwargs: Any) -> None:
        self.calls.append(("create_branch", dict(repo_id=repo_id, branch=branch, token=token, repo_type=repo_type,
                                                 exist_ok=exist_ok, **kwargs)))
        if repo_id not in self.repos:
            raise FileNotFoundError(f"repository {repo_id} does not exist (create_repo first)")
        branches = self.repos[repo_id].setdefault("branches", {"main"})
        if branch in branches and not exist_ok:
            raise FileExistsError(branch)
        branches.add(branch)

    def create_commit(self, repo_id: str, operations: list, *, commit_message: str, commit_description: Any = None,
                      token: Any = None, repo_type: str | None = None, revision: str | None = None,
                      create_pr: bool | None = None, **kwargs: Any) -> CommitInfo:
        """Writes every ``CommitOperationAdd`` under ``root/<repo_id>/`` (``root/<repo_id>@<revision>/`` for a
        branch other than main)."""
        self.calls.append(("create_commit", dict(repo_id=repo_id, operations=[op.path_in_repo for op in operations],
                                                 commit_message=commit_message,
                                                 commit_description=commit_description, token=token,
                                                 repo_type=repo_type, revision=revision, create_pr=create_pr,
                                                 **kwargs)))
        if repo_id not in self.repos:
            raise FileNotFoundError(f"repository {repo_id} does not exist (create_repo first)")
        if (revision not in (None, "main") and not revision.startswith("refs/pr/")
                and revision not in self.repos[repo_id].get("branches", ())):
            raise FileNotFoundError(f"revision {revision} does not exist (create_branch first)")
        target = self.repo_dir(repo_id, revision)
        for op in operations:
            if not isinstance(op, CommitOperationAdd):
                raise TypeError(f"unexpected operation {op!r}")
            dst = target / op.path_in_repo
            dst.parent.mkdir(parents=True, exist_ok=True)
            with op.as_file() as f:
                dst.write_bytes(f.read())
        n = sum(1 for c in self.calls if c[0] in ("create_commit", "upload_folder"))
        full_id = repo_id if "/" in repo_id else f"user/{repo_id}"  # the Hub puts a bare name under the user
        return CommitInfo(commit_url=f"{self.endpoint}/{full_id}/commit/{n:040x}", commit_message=commit_message,
                          commit_description=commit_description or "", oid=f"{n:040x}",
                          pr_url=f"{self.endpoint}/{full_id}/discussions/{n}" if create_pr else None)

    def repo_dir(self, repo_id: str, revision: str | None = None) -> Path:
        if revision not in (None, "main"):
            return self.root / f"{repo_id}@{revision}"
        return self.root / repo_id
