"""Atomic file writes: a file appears whole or not at all, never half-written.

Every writer in the library goes through :func:`atomic_path`: it hands out a temporary name in the target's own
folder (same file system, so the final ``os.replace`` is one atomic rename), fsyncs it, and renames it over the
target only when the write finished. On an exception or Ctrl-C the temporary file is removed; a SIGKILL can leave
one behind, which :func:`remove_stale_temporaries` cleans on the next write to that folder.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["TEMP_MARKER", "atomic_path", "atomic_write_bytes", "atomic_write_text", "fsync_path",
           "remove_stale_temporaries", "replace_directory", "temporary_name"]

TEMP_MARKER = ".hf_adaquant-tmp-"  # every temporary name contains it, so stale ones can be found and removed


def temporary_name(target: Path) -> Path:
    """A fresh hidden name next to ``target`` that :func:`remove_stale_temporaries` recognises."""
    return target.with_name(f".{target.name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_path(path: Path) -> None:
    """Flush a file (or, where the OS allows, a folder entry) to disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some file systems refuse to open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename, on failure it is removed.

    Example:
        >>> with atomic_path("out/model.onnx") as tmp:
        ...     onnx.save(model_proto, tmp)
    """
    target = Path(path)
    tmp = temporary_name(target)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove temporaries that killed writers left in ``directory`` (only those of ``name`` when given).

    Only names whose writer process is no longer alive are removed, so a concurrent writer's file is never
    taken from under it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    prefix = f".{name}{TEMP_MARKER}" if name is not None else "."
    removed = []
    for item in directory.iterdir():
        if not item.name.startswith(prefix) or TEMP_MARKER not in item.name:
            continue
        pid_text = item.name.rsplit(TEMP_MARKER, 1)[1].split("-", 1)[0]
        if pid_text.isdigit() and _alive(int(pid_text)):  # a live writer (this process included) owns it
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
        removed.append(item)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the file system cannot exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _remove(path: Path) -> None:
    """Delete a folder tree, or a file or link (what ``replace_directory`` may find at the target)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def replace_directory(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished folder ``staging`` at ``target`` (a sibling on the same file system), replacing any folder
    (or file) there in one atomic exchange where the OS supports it, else in two renames; the old one is then
    removed.

    A reader sees the old folder or the new one, never a mix of their files.
    """
    staging, target = Path(staging), Path(target)
    fsync_path(staging)
    if not target.exists():
        os.replace(staging, target)
    elif _exchange(staging, target):
        _remove(staging)  # now holds the old folder (or file)
    else:
        old = temporary_name(target)
        os.replace(target, old)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(old, target)  # put the old folder back: never leave the target missing
            raise
        _remove(old)
    fsync_path(target.parent)
