"""Pieces shared by the checkpoint test scripts: a GPT with dropout (so that exact resume
needs the RNG states), AdamW + a step LR schedule, and a dataloader that resumes
mid-epoch."""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from recipes.gpt import GPT
from tests.scripts import common
from tests.scripts.lit import LitGPT as _LitGPT

#: The tiny GPT with dropout: every training step draws from the global RNG.
CONFIG = replace(common.TINY, dropout=0.1)
MICRO_BATCH = 2
ACCUM = 2
STEPS = 6
SAVE_AT = 3


def make_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CONFIG)


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)


def make_scheduler(optimizer: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


class ResumableLoader:
    """A rank's loader that skips the batches a resumed run has already seen (what a
    stateful dataloader does); Lightning itself restarts plain loaders at batch 0."""

    def __init__(self, world: int) -> None:
        self.loader = common.make_loader(world, MICRO_BATCH, ACCUM, STEPS)
        self.skip = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i >= self.skip:
                yield batch
        self.skip = 0


class LitGPT(_LitGPT):
    """The shared LitGPT with dropout, AdamW + StepLR, and a resumable loader."""

    def __init__(self, loader: ResumableLoader | None = None, seed: int = 0) -> None:
        super().__init__(make_model(seed))
        self.loader = loader
        self.batches_skipped = 0

    def configure_optimizers(self):
        optimizer = make_optimizer(self.parameters())
        scheduler = {"scheduler": make_scheduler(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_load_checkpoint(self, checkpoint) -> None:
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
        if self.loader is not None:
            self.loader.skip = self.batches_skipped = progress["processed"]


def world() -> int:
    return int(os.environ["WORLD_SIZE"])


def full_optimizer_state(module, optimizer) -> dict:
    """Unsharded optimizer state keyed by parameter name (collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    return get_optimizer_state_dict(module, optimizer, options=options)


def state_diff(a, b) -> float:
    """Max abs difference of two nested states (tensors and numbers)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (sorted(a)[:5], sorted(b)[:5])
        return max([state_diff(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, list | tuple):
        assert len(a) == len(b)
        return max([state_diff(x, y) for x, y in zip(a, b, strict=True)] or [0.0])
    if isinstance(a, torch.Tensor):
        return (a.detach().float() - b.detach().float()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, int | float):
        return abs(a - b)
    return 0.0 if a == b else float("inf")
