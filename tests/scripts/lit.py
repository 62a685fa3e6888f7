"""The LightningModule the Trainer test scripts share: the tiny GPT (or a given model),
SGD, every step's loss kept."""

from __future__ import annotations

from lightning.pytorch import LightningModule
from torch import nn

from recipes.gpt import GPT
from tests.scripts import common


class LitGPT(LightningModule):
    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        self.model = common.make_model() if model is None else model
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = GPT.loss(self.model(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return common.make_optimizer(self.parameters())
