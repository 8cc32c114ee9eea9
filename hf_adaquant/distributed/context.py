"""``DistributedContext``: who we are in a launch (rank, device) and the few collectives AdaQuant needs.

Launched by ``accelerate launch`` or ``torchrun`` (``WORLD_SIZE > 1`` in the environment), the process group is
set up through :class:`accelerate.PartialState` (gloo on CPU, nccl on GPUs); otherwise everything is a no-op
single process, so plain ``python script.py`` users see no change.

Failures: a rank that raises must not leave the others blocked in a collective until the process-group timeout.
Two mechanisms, one per communication pattern:

* independent jobs of uneven length (layer-parallel): the failing rank posts its message in the process group's
  key-value store; the others poll it between layers and inside the optimisation loop (:meth:`check_abort`), and
  the collectives at the end are entered only through :meth:`barrier`, which polls too.
* lock-step collectives (data-parallel): every rank always joins, passing its own error or None
  (:meth:`sync_failure`); the flag is all-reduced and every rank raises with the failing rank's message.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "DistributedRunError", "get_context", "is_main_process"]

_logger = logging.getLogger(__name__)
_POLL_SECONDS = 0.2  # how often a busy rank looks for another rank's failure
_ACK_TIMEOUT = 10.0  # how long a failing rank waits for the others to take note before it exits


class DistributedRunError(RuntimeError):
    """Raised on every rank when one rank of a distributed run failed (message names the rank and the cause)."""


def _launched_world_size() -> int:
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def _format_error(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()


class DistributedContext:
    """Rank, world size and device of this process, with error-aware collectives.

    Use :func:`get_context` rather than building one: the process group is created once per process.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: torch.device | None = None, backend: str | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device or torch.device("cpu")
        self.backend = backend
        self._session = 0
        self._prefix = "hf_adaquant/0"
        self._last_poll = 0.0
        self._barriers = 0

    # ------------------------------------------------------------------------------------------- set-up

    @classmethod
    def from_environment(cls) -> "DistributedContext":
        """Join the launch described by the environment (torchrun / accelerate), or a single process."""
        if _launched_world_size() <= 1:
            return cls()
        from accelerate import PartialState

        use_cuda = torch.cuda.is_available()
        # PartialState() without cpu=True silently runs every rank as a single process on a CPU-only machine;
        # backend="gloo" keeps an installed MPI from being picked.
        state = PartialState(cpu=not use_cuda) if use_cuda else PartialState(cpu=True, backend="gloo")
        if state.num_processes <= 1:
            return cls()
        device = torch.device("cuda", state.local_process_index) if use_cuda else torch.device("cpu")
        return cls(state.process_index, state.num_processes, state.local_process_index, device,
                   dist.get_backend())

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def new_session(self) -> None:
        """Start a fresh key namespace in the store (every rank calls it once per AdaQuant run)."""
        self._session += 1
        self._prefix = f"hf_adaquant/{self._session}"
        self._barriers = 0

    # ------------------------------------------------------------------------------- failure signalling

    def _store(self) -> dist.Store:
        return dist.distributed_c10d._get_default_store()

    def report_failure(self, error: BaseException, where: str) -> None:
        """Tell the other ranks that this rank failed, then give them a moment to say so before we exit."""
        if not self.is_distributed:
            return
        try:
            store = self._store()
            store.set(f"{self._prefix}/error/{self.rank}", f"{where}: {_format_error(error)}")
            store.add(f"{self._prefix}/errors", 1)
            deadline = time.monotonic() + _ACK_TIMEOUT
            while time.monotonic() < deadline and store.add(f"{self._prefix}/acks", 0) < self.world_size - 1:
                time.sleep(0.05)
        except Exception:  # the store itself is gone: nothing more we can do, the launcher ends the others
            _logger.debug("could not post the failure to the other ranks", exc_info=True)

    def _raise_if_failed(self) -> None:
        store = self._store()
        if store.add(f"{self._prefix}/errors", 0) == 0:
            return
        messages = []
        for r in range(self.world_size):
            key = f"{self._prefix}/error/{r}"
            if r != self.rank and store.check([key]):
                messages.append(f"rank {r} failed in {store.get(key).decode()}")
        store.add(f"{self._prefix}/acks", 1)
        raise DistributedRunError(f"rank {self.rank} stops because " + "; ".join(messages or ["another rank failed"]))

    def check_abort(self, force: bool = False) -> None:
        """Raise :class:`DistributedRunError` if another rank reported a failure (rate-limited, cheap to call)."""
        if not self.is_distributed:
            return
        now = time.monotonic()
        if not force and now - self._last_poll < _POLL_SECONDS:
            return
        self._last_poll = now
        self._raise_if_failed()

    def barrier(self, name: str) -> None:
        """Wait for every rank, raising instead of hanging if one of them reported a failure."""
        if not self.is_distributed:
            return
        store = self._store()
        self._barriers += 1  # every rank passes the same barriers in the same order: keys never reused
        key = f"{self._prefix}/barrier/{self._barriers}/{name}"
        store.add(key, 1)
        while store.add(key, 0) < self.world_size:
            self._raise_if_failed()
            time.sleep(0.01)
        self._raise_if_failed()

    def sync_failure(self, error: BaseException | None, where: str) -> None:
        """Collective: every rank passes its error (or None); if any rank failed, all ranks raise.

        The failing rank re-raises its own exception (full traceback); the others raise
        :class:`DistributedRunError` naming the failing rank and its message.
        """
        if not self.is_distributed:
            if error is not None:
                raise error
            return
        flag = torch.tensor([0.0 if error is None else 1.0], device=self._comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0:
            return
        messages = self.all_gather_object(None if error is None else f"{where}: {_format_error(error)}")
        if error is not None:
            raise error
        failed = "; ".join(f"rank {r} failed in {m}" for r, m in enumerate(messages) if m is not None)
        raise DistributedRunError(f"rank {self.rank} stops because {failed}")

    # ------------------------------------------------------------------------------------- collectives

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.is_distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self._comm_device if self.backend == "nccl" else None)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place, and return it (moved through the backend's device if needed)."""
        if not self.is_distributed:
            return tensor
        if tensor.device != self._comm_device:
            moved = tensor.to(self._comm_device)
            dist.all_reduce(moved)
            tensor.copy_(moved)
        else:
            dist.all_reduce(tensor)
        return tensor

    def broadcast_tensor(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Overwrite ``tensor`` with rank ``src``'s values, in place."""
        if not self.is_distributed:
            return
        if tensor.device != self._comm_device:
            moved = tensor.detach().to(self._comm_device)
            dist.broadcast(moved, src)
            tensor.data.copy_(moved)
        else:
            dist.broadcast(tensor.data, src)


_CONTEXT: DistributedContext | None = None


def get_context() -> DistributedContext:
    """This process's :class:`DistributedContext`, created (and the process group joined) on first use."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = DistributedContext.from_environment()
        if _CONTEXT.is_distributed:
            _logger.info("distributed AdaQuant: rank %d of %d on %s (%s)", _CONTEXT.rank, _CONTEXT.world_size,
                         _CONTEXT.device, _CONTEXT.backend)
    return _CONTEXT


def is_main_process() -> bool:
    """True on rank 0 of a launch (and in a plain single process): the one that should write files."""
    return get_context().is_main
