"""Stopping cleanly when a cluster preempts a job: SIGTERM and SIGINT become a request, honoured at the next safe point.

A job runs inside :func:`stop_on_signals`. The first SIGTERM or SIGINT only sets a flag; the training loops check it
at every step boundary (:meth:`StopRequest.agreed`: under torchrun every rank takes the same decision at the same step),
write a checkpoint there and raise :class:`Preempted` with the way to resume; caching checks it between shards. A second
signal is not caught: it ends the process as usual.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import torch
import torch.distributed as dist

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(RuntimeError):
    """The job stopped on SIGTERM/SIGINT at a safe point; the message says how to resume."""


class StopRequest:
    """Whether a stop was requested in this process (``requested``) and, across torchrun's ranks, by any
    (``agreed``)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None

    def agreed(self, device: str | torch.device = "cpu") -> bool:
        """True when any rank was asked to stop: one all-reduce under a multi-process group, so that every rank
        stops at the same step; ``device`` is where the group's tensors live (CUDA for NCCL)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


_CURRENT: StopRequest | None = None


def current_request() -> StopRequest:
    """The request of the running :func:`stop_on_signals` block (a request that never fires outside one)."""
    return _CURRENT if _CURRENT is not None else StopRequest()


def stop_if_requested(resume_hint: str) -> None:
    """At a point where stopping loses nothing that a rerun cannot redo: stop if a signal came (``resume_hint`` says
    what is kept and how to go on)."""
    request = current_request()
    if request.requested:
        raise Preempted(f"stopped by {request.signal_name}: {resume_hint}")


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Inside the block, the first SIGTERM/SIGINT sets the request; the previous handlers come back afterwards (and
    on a second signal, which then acts as it would have)."""
    global _CURRENT
    request = StopRequest()
    previous = {number: signal.getsignal(number) for number in _SIGNALS}

    def handle(number: int, frame: FrameType | None) -> None:
        request.requested = True
        request.signal_name = signal.Signals(number).name
        for restored, handler in previous.items():  # a second signal is not caught
            signal.signal(restored, handler)

    outer, _CURRENT = _CURRENT, request
    for number in _SIGNALS:
        signal.signal(number, handle)
    try:
        yield request
    finally:
        _CURRENT = outer
        for number, handler in previous.items():
            signal.signal(number, handler)
