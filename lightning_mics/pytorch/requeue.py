"""Slurm auto-requeue under MiCS: the requeue checkpoint is saved by all ranks together.

Lightning's handler of the requeue signal saves ``hpc_ckpt_<n>.ckpt`` inside the signal
handler, wherever each rank happens to be; a sharded save is collective, so ranks
interrupted at different points would deadlock or mix collectives. Instead the signal
only sets a flag, the ranks agree at the next batch boundary (one small all-reduce per
batch, only under Slurm auto-requeue) and run Lightning's handler there together.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Trainer

from lightning_mics.process_groups import all_reduce_flag


class DeferredRequeue:
    """Defers the requeue signal of a Slurm auto-requeue run to a batch boundary."""

    def __init__(self) -> None:
        self._handler: Callable[[Any, Any], None] | None = None
        self._signum = signal.SIGUSR1
        self._requested = False

    def install(self, trainer: Trainer, environment: Any) -> None:
        """Under Slurm auto-requeue, make the requeue signal only set a flag; otherwise
        leave the signals alone."""
        self._handler = None
        if (
            not isinstance(environment, SLURMEnvironment)
            or not environment.auto_requeue
            or os.name == "nt"
        ):
            return
        self._signum = environment.requeue_signal or signal.SIGUSR1
        self._requested = False
        # NOTE: Lightning's requeue handler (save `hpc_ckpt_<n>.ckpt`, requeue the job) is
        # reachable only through its private `_signal_connector`: the one use of it.
        self._handler = trainer._signal_connector._slurm_sigusr_handler_fn
        signal.signal(self._signum, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        self._requested = True

    def at_batch_boundary(self) -> None:
        """Collective (only under Slurm auto-requeue): if any rank got the signal, run
        Lightning's requeue handler on every rank."""
        if self._handler is None:
            return
        if all_reduce_flag(self._requested):
            self._requested = False
            self._handler(self._signum, None)
