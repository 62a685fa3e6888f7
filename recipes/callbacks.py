"""Callbacks of the recipes: a progress bar, throughput with MFU from the cluster config, and
a summary of the run printed (and written to ``summary.json``) at the end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ThroughputMonitor as _LightningThroughputMonitor
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_mics.callbacks import CommStatsMonitor


def batch_size(batch: Any) -> int:
    """Sequences in a ``(input_ids, targets)`` batch."""
    return batch[0].size(0)


def batch_tokens(batch: Any) -> int:
    """Tokens in a ``(input_ids, targets)`` batch."""
    return batch[0].numel()


def peak_flops(trainer: Trainer, peak_tflops: float | None) -> float | None:
    """FLOP/s one device can do: ``peak_tflops`` (from the cluster config) if given, else
    what Lightning knows about the device (A100, H100, ...; nothing for CPUs)."""
    if peak_tflops:
        return float(peak_tflops) * 1e12
    from lightning.fabric.utilities.throughput import _plugin_to_compute_dtype

    dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
    return get_available_flops(trainer.strategy.root_device, dtype)


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM progress bar with the right length when ``max_steps`` ends the run
    and gradients are accumulated (Lightning takes ``max_steps`` optimizer steps for that
    many batches, so the bar overruns its total)."""

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_steps is not None and trainer.max_steps > 0:
            remaining = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            return min(trainer.num_training_batches, remaining)
        return trainer.num_training_batches


class ThroughputMonitor(_LightningThroughputMonitor):
    """Lightning's ThroughputMonitor for ``(input_ids, targets)`` batches, with MFU.

    Logs samples/s, tokens/s (``items``), FLOP/s per device and, with a known peak, MFU
    (``train|device|mfu``) to the Trainer's logger, averaged over ``window_size`` optimizer
    steps. The FLOPs of one micro-batch come from the LightningModule's ``flops_per_batch``.

    Args:
        peak_tflops: dense TFLOP/s of one device (``cluster.peak_tflops``); ``None`` lets
            Lightning look the device up (it knows A100/H100 and other recent GPUs).
        window_size: optimizer steps to average over (Lightning's default is 100, more than
            a short run has).
    """

    def __init__(self, peak_tflops: float | None = None, window_size: int = 100) -> None:
        super().__init__(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=window_size)
        self.peak_tflops = peak_tflops

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_tflops:
            self.available_flops = int(float(self.peak_tflops) * 1e12)
            for throughput in self._throughputs.values():
                throughput.available_flops = self.available_flops


class RunSummary(Callback):
    """Collects rank 0's loss per optimizer step and the time of each step; at the end of
    ``fit`` prints the loss curve's ends, the validation metrics, throughput (tokens/s,
    TFLOP/s and MFU per device, validation time excluded) and the communication per step
    (from ``CommStatsMonitor``), and writes them to ``<default_root_dir>/summary.json``.

    Args:
        peak_tflops: see :class:`ThroughputMonitor`.
        loss_key: the logged training loss.
    """

    def __init__(self, peak_tflops: float | None = None, loss_key: str = "train/loss") -> None:
        self.peak_tflops = peak_tflops
        self.loss_key = loss_key
        self.losses: list[float] = []
        self.step_times: list[float] = []  # seconds of each optimizer step without validation
        self.tokens_per_step = 0
        self._tokens = 0
        self._t_step: float | None = None

    @rank_zero_only
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t_step = time.perf_counter()

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._tokens += batch_tokens(batch)
        if trainer.fit_loop._should_accumulate():
            return  # inside an accumulation window
        now = time.perf_counter()
        if self._t_step is not None:
            self.step_times.append(now - self._t_step)
        self._t_step = now
        self.tokens_per_step = self._tokens * trainer.world_size
        self._tokens = 0
        loss = trainer.callback_metrics.get(self.loss_key)
        if loss is not None:
            self.losses.append(float(loss))

    @rank_zero_only
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t_step = time.perf_counter()  # validation does not count as training time

    def summary(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        # The first step includes lazy initialisation and warm-up: rates skip it.
        times = self.step_times[1:] or self.step_times
        seconds = sum(times)
        result: dict[str, Any] = {
            "optimizer_steps": trainer.global_step,
            "losses": self.losses,
            "val": {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
            },
            "world_size": trainer.world_size,
            "tokens_per_step": self.tokens_per_step,
            "seconds_per_step": seconds / len(times) if times else None,
            "tokens_per_sec": self.tokens_per_step * len(times) / seconds if seconds else None,
        }
        flops = getattr(pl_module, "flops_per_batch", None)
        accumulation = trainer.accumulate_grad_batches
        if flops and seconds:
            per_device = flops * accumulation * len(times) / seconds
            result["tflops_per_device"] = per_device / 1e12
            peak = peak_flops(trainer, self.peak_tflops)
            result["mfu"] = per_device / peak if peak else None
        comm = next((c for c in trainer.callbacks if isinstance(c, CommStatsMonitor)), None)
        if comm is not None and comm.history:
            result["comm"] = comm.summary()
            result["comm_steps"] = len(comm.history)
        return result

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        result = self.summary(trainer, pl_module)
        Path(trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
        (Path(trainer.default_root_dir) / "summary.json").write_text(json.dumps(result, indent=1))
        print(format_summary(result, trainer), flush=True)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def format_summary(result: dict[str, Any], trainer: Trainer | None = None) -> str:
    lines = ["", "Run summary"]
    losses = result["losses"]
    if losses:
        tail = losses[-5:]
        lines.append(
            f"  train loss      {losses[0]:.3f} (step 1) -> {losses[-1]:.3f} "
            f"(step {len(losses)}; mean of the last {len(tail)}: {sum(tail) / len(tail):.3f})"
        )
    for key, value in sorted(result["val"].items()):
        lines.append(f"  {key:<15} {_fmt(value)}")
    if result.get("tokens_per_sec"):
        line = (
            f"  throughput      {result['tokens_per_sec']:,.0f} tokens/s over "
            f"{result['world_size']} ranks, {result['seconds_per_step']:.3f} s per optimizer step"
        )
        if "tflops_per_device" in result:
            mfu = result.get("mfu")
            line += f", {result['tflops_per_device']:.3g} TFLOP/s per rank, MFU " + (
                f"{mfu:.1%}" if mfu else "n/a (set cluster.peak_tflops)"
            )
        lines.append(line)
    if "comm" in result:
        from lightning_mics.accounting import format_summary as format_comm

        title = f"per optimizer step, mean of {result['comm_steps']}"
        comm_lines = format_comm(result["comm"], title=title).splitlines()
        lines.extend("  " + line for line in comm_lines)
    if trainer is not None:
        lines.append(f"  run directory   {trainer.default_root_dir}")
    return "\n".join(lines)
