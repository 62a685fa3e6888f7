"""Trainer callbacks. Needs Lightning (the core of `lightning_mics` does not)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_mics.accounting import (
    LOG_KEYS,
    MB,
    CommStats,
    find_comm_stats,
    format_summary,
    mean_snapshot,
)


class CommStatsMonitor(Callback):
    """Log the communication of every optimizer step.

    For each optimizer step (a whole accumulation window: all its micro-steps' forwards
    and backwards, and the optimizer step) it logs, through ``pl_module.log`` and thus
    the Trainer's logger, ``{prefix}{kind}_count`` and ``{prefix}{kind}_bytes`` for
    ``all_gather``, ``reduce_scatter`` and ``all_reduce``, and ``{prefix}inter_node_bytes``
    / ``{prefix}intra_node_bytes``. Values are this rank's logical bytes (see
    :mod:`lightning_mics.accounting`); the logger writes rank 0's. Collectives outside
    training windows (validation between steps, ...) are not counted.

    Args:
        prefix: prefix of the metric names.
        prog_bar: also show ``{prefix}inter_node_MB`` (inter-node megabytes of 10**6
            bytes per step) in the progress bar.

    Attributes:
        history: every logged step's full snapshot (see ``CommStats.snapshot``).
    """

    def __init__(self, prefix: str = "comm/", prog_bar: bool = False) -> None:
        self.prefix = prefix
        self.prog_bar = prog_bar
        self.history: list[dict[str, int]] = []
        self._stats: CommStats | None = None
        self._window_open = False
        self._step_at_window_start = 0

    def summary(self) -> dict[str, float]:
        """The mean snapshot over the logged optimizer steps."""
        return mean_snapshot(self.history)

    def format_summary(self) -> str:
        return format_summary(
            self.summary(), title=f"per optimizer step, mean of {len(self.history)}"
        )

    # ------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = trainer.strategy.model
        self._stats = (find_comm_stats(model) if model is not None else None) or find_comm_stats(
            pl_module
        )
        if self._stats is None:
            rank_zero_warn(
                "CommStatsMonitor found no communication statistics: it needs "
                "strategy='mics' with comm_stats=True. Nothing will be logged."
            )
        self._window_open = False

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._stats is None or self._window_open:
            return
        # First micro-step of an accumulation window: count from here.
        self._stats.reset()
        self._window_open = True
        self._step_at_window_start = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._stats is None or not self._window_open:
            return
        if trainer.global_step == self._step_at_window_start:
            return  # still accumulating
        snapshot = self._stats.snapshot()
        self._stats.reset()
        self._window_open = False
        self.history.append(snapshot)
        for key in LOG_KEYS:
            # NOTE: float64, so byte counts above 2**24 are logged exactly (Lightning
            # turns plain numbers into float32 tensors).
            value = torch.tensor(float(snapshot[key]), dtype=torch.float64)
            pl_module.log(f"{self.prefix}{key}", value, on_step=True, on_epoch=False)
        if self.prog_bar:
            pl_module.log(
                f"{self.prefix}inter_node_MB",  # 10**6 bytes
                snapshot["inter_node_bytes"] / MB,
                on_step=True,
                on_epoch=False,
                prog_bar=True,
            )
