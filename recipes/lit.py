"""The LightningModule of the recipes: a GPT (next-token) or BERT (masked-LM) language model.

The network is created in ``__init__``, so ``trainer.init_module(empty_init=True)`` puts it
on the meta device and the strategy materialises it shard by shard (MiCS calls the models'
``reset_parameters()``). The validation metric (torchmetrics: perplexity for GPT,
masked-token accuracy for BERT) is created on the device when validation starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch import LightningModule
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from recipes.bert import BERT, IGNORE_INDEX, BERTConfig
from recipes.gpt import GPT, GPTConfig

ARCHS = {"gpt": (GPT, GPTConfig), "bert": (BERT, BERTConfig)}


def build_network(arch: str, config: GPTConfig | BERTConfig) -> nn.Module:
    """``GPT(config)`` or ``BERT(config)``, on the current default device."""
    return ARCHS[arch][0](config)


def network_flops(arch: str, config: GPTConfig | BERTConfig, batch: int, seq_len: int) -> int:
    """FLOPs of one training micro-batch (forward + backward) of ``batch`` x ``seq_len``
    tokens, counted on a meta-device copy (no memory, no compute). Recomputation by
    activation checkpointing is not counted (model FLOPs, as MFU is defined)."""
    with torch.device("meta"):
        model = build_network(arch, config)
        idx = torch.zeros(batch, seq_len, dtype=torch.long)
    return measure_flops(model, lambda: model(idx), loss_fn=torch.Tensor.sum)


def loss_fn(arch: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ARCHS[arch][0].loss(logits, targets)


@dataclass
class WarmupCosine:
    """LR factor: linear warm-up over ``warmup_steps``, cosine decay to ``min_ratio`` at
    ``total_steps``, then constant."""

    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.1
) -> LambdaLR:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` x lr at ``total_steps``."""
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio))


def param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]]) -> list[dict[str, Any]]:
    """Two groups: matrices (weight decay), biases and LayerNorm weights (none)."""
    decay, no_decay = [], []
    for _, p in named_parameters:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class LanguageModel(LightningModule):
    """GPT or BERT pre-training; ``cfg.model`` instantiates to it.

    Batches are ``(input_ids, targets)``: next tokens for GPT, MLM labels (``IGNORE_INDEX``
    where nothing is predicted) for BERT. Logs ``train/loss`` (rank 0's micro-batch),
    ``val/loss`` and ``val/ppl`` (GPT) or ``val/mlm_acc`` (BERT) over all ranks.

    Args:
        arch: ``"gpt"`` or ``"bert"``.
        optimizer: ``fn(param_groups) -> Optimizer``, e.g. a ``functools.partial`` of
            ``torch.optim.AdamW`` (Hydra: ``_partial_: true``); default AdamW(lr=3e-4).
        scheduler: ``fn(optimizer, total_steps=...) -> LRScheduler`` stepped every optimizer
            step, e.g. a partial of `warmup_cosine`; ``None`` keeps the lr constant.
        micro_batch_size, seq_len: the shape of one rank's micro-batch (for FLOPs).
        nominal_params: the parameter count the size is named after (documentation).
        **network: the `GPTConfig` / `BERTConfig` fields (``n_layer``, ``n_embd``, ...).
    """

    def __init__(
        self,
        arch: str,
        optimizer: Callable[..., Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        micro_batch_size: int = 8,
        seq_len: int | None = None,
        nominal_params: int | None = None,
        **network: Any,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
        self.arch = arch
        self.config = ARCHS[arch][1](**network)
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=3e-4)
        self.scheduler_factory = scheduler
        self.micro_batch_size = micro_batch_size
        self.seq_len = seq_len or self.config.block_size
        self.nominal_params = nominal_params
        self.model = build_network(arch, self.config)
        self.val_metric_name = "val/ppl" if arch == "gpt" else "val/mlm_acc"
        #: Created on the device when validation first starts (see `_ensure_metric`).
        self.val_metric: Metric | None = None
        #: FLOPs of one micro-batch on one rank, read by ThroughputMonitor.
        self.flops_per_batch: int | None = None
        #: ``fn(network, device_mesh) -> network`` that shards the network under Lightning's
        #: ModelParallelStrategy (strategy=fsdp, see recipes/strategies.py); MiCS and DDP
        #: need none.
        self.parallelize: Callable[[nn.Module, Any], nn.Module] | None = None

    def configure_model(self) -> None:
        # NOTE: Lightning calls this on every fit/validate/test; sharding is idempotent.
        if self.parallelize is not None and self._device_mesh is not None:
            self.model = self.parallelize(self.model, self._device_mesh)

    def make_optimizer(
        self, named_parameters: Iterable[tuple[str, nn.Parameter]], total_steps: int
    ) -> tuple[Optimizer, Any]:
        """The optimizer over ``named_parameters`` and its LR scheduler (or ``None``)."""
        optimizer = self.optimizer_factory(param_groups(named_parameters))
        if self.scheduler_factory is None:
            return optimizer, None
        return optimizer, self.scheduler_factory(optimizer, total_steps=total_steps)

    def setup(self, stage: str) -> None:
        if self.flops_per_batch is None:
            self.flops_per_batch = network_flops(
                self.arch, self.config, self.micro_batch_size, self.seq_len
            )

    def _ensure_metric(self) -> None:
        # NOTE: created after the strategy has set the model up, on its device: torchmetrics
        # keeps its state in plain tensors that no strategy materialises or moves (and
        # `module.to_empty()`, which materialises a meta-device model, also empties them).
        device = self.trainer.strategy.root_device
        if self.val_metric is None or self.val_metric.device != device:
            if self.arch == "gpt":
                metric: Metric = Perplexity(ignore_index=IGNORE_INDEX)
            else:
                metric = MulticlassAccuracy(
                    num_classes=self.config.vocab_size, ignore_index=IGNORE_INDEX, average="micro"
                )
            self.val_metric = metric.to(device)

    def on_validation_start(self) -> None:
        self._ensure_metric()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        inputs, targets = batch
        loss = loss_fn(self.arch, self.model(inputs), targets)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        logits = self.model(inputs)
        self.log("val/loss", loss_fn(self.arch, logits, targets), prog_bar=True, sync_dist=True)
        if self.arch == "gpt":
            self.val_metric.update(logits.float(), targets)
        else:
            self.val_metric.update(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        self.log(self.val_metric_name, self.val_metric, prog_bar=True)

    def configure_optimizers(self) -> Any:
        total = self.trainer.max_steps
        if total is None or total < 0:
            total = int(self.trainer.estimated_stepping_batches)
        optimizer, scheduler = self.make_optimizer(self.named_parameters(), total)
        if scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
