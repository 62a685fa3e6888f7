"""Meta-device initialisation through the Trainer and Fabric (2 ranks, one partition).

- Trainer: a LightningModule that builds a Hugging Face style model in ``__init__``
  under ``trainer.init_module(empty_init=True)``; one that builds a model without its
  own initialiser in ``configure_model`` under ``self.trainer.init_module(empty_init=True)``
  with ``MiCSStrategy(init_fn=...)``; and the same without ``init_fn``, which must raise
  ``MetaInitError`` on every rank.
- Fabric: ``fabric.init_module(empty_init=True)`` with a torchtitan style model, one with
  ``MiCSStrategy(init_fn=...)``, and one without, which must raise.

The state right after sharding is compared with a normal construction given the same
deterministic init; a few training steps must give finite losses.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_mics
from lightning_mics.fabric import MiCSStrategy as FabricMiCSStrategy
from lightning_mics.meta_init import MetaInitError
from tests.scripts import common, meta_models
from tests.scripts.meta_models import HFStyleModel, TinyModel, TitanStyleModel, init_module

STEPS = 2


def loader() -> DataLoader:
    x, y = meta_models.batch(4 * STEPS)
    return DataLoader(TensorDataset(x, y), batch_size=2)


def initial_report(model: nn.Module, model_cls: type[nn.Module]) -> dict[str, Any]:
    """Collective: the model's state (parameters and every buffer) vs the reference."""
    ref = meta_models.reference(model_cls)
    state = {**common.full_state(model), **dict(model.named_buffers())}
    ref_state = {**ref.state_dict(), **dict(ref.named_buffers())}
    return {"init_diff": common.max_abs_diff(state, ref_state), "num_tensors": len(state)}


class LitMeta(LightningModule):
    def __init__(self, model_cls: type[nn.Module], in_configure_model: bool) -> None:
        super().__init__()
        self.model_cls = model_cls
        self.in_configure_model = in_configure_model
        if not in_configure_model:
            self.model = model_cls()
        self.losses: list[float] = []
        self.initial: dict[str, Any] = {}

    def configure_model(self) -> None:
        if self.in_configure_model and not hasattr(self, "model"):
            with self.trainer.init_module(empty_init=True):
                self.model = self.model_cls()
            assert all(p.is_meta for p in self.model.parameters())

    def on_train_start(self) -> None:
        self.initial = initial_report(self.model, self.model_cls)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = TinyModel.loss(self.model(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def trainer(**options: Any) -> Trainer:
    return Trainer(
        strategy=lightning_mics.MiCSStrategy(partition_size=2, **options),
        accelerator="cpu",
        devices=2,
        max_steps=STEPS,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def trainer_case(
    model_cls: type[nn.Module], in_configure_model: bool, **options: Any
) -> dict[str, Any]:
    t = trainer(**options)
    if in_configure_model:
        module = LitMeta(model_cls, True)
    else:
        with t.init_module(empty_init=True):
            module = LitMeta(model_cls, False)
        assert all(p.is_meta for p in module.parameters())
    try:
        t.fit(module, loader())
    except MetaInitError as err:
        return error_report(err)
    return error_report(None) | module.initial | finite(module.losses)


def fabric_case(model_cls: type[nn.Module], **options: Any) -> dict[str, Any]:
    fabric = Fabric(
        strategy=FabricMiCSStrategy(partition_size=2, **options), accelerator="cpu", devices=2
    )
    fabric.launch()
    with fabric.init_module(empty_init=True):
        model = model_cls()
    assert all(p.is_meta for p in model.parameters())
    try:
        model = fabric.setup_module(model)
    except MetaInitError as err:
        return error_report(err)
    report = error_report(None) | initial_report(model.module, model_cls)
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.5))
    losses = []
    for x, y in fabric.setup_dataloaders(loader()):
        loss = TinyModel.loss(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return report | finite(losses)


def finite(losses: list[float]) -> dict[str, Any]:
    return {
        "num_losses": len(losses),
        "losses_finite": all(map(torch.isfinite, torch.tensor(losses))),
    }


def error_report(error: BaseException | None) -> dict[str, Any]:
    """Collective: which ranks raised, and rank 0's message."""
    raised = [None] * dist.get_world_size()
    dist.all_gather_object(raised, type(error).__name__ if error else None)
    return {"raised": raised, "message": str(error) if error else ""}


def main() -> None:
    args = common.parser().parse_args()
    results = {
        "trainer_init_hf": trainer_case(HFStyleModel, in_configure_model=False),
        "trainer_configure_init_fn": trainer_case(
            TinyModel, in_configure_model=True, init_fn=init_module
        ),
        "trainer_missing": trainer_case(TinyModel, in_configure_model=False),
        "fabric_titan": fabric_case(TitanStyleModel),
        "fabric_init_fn": fabric_case(TinyModel, init_fn=init_module),
        "fabric_missing": fabric_case(TinyModel),
    }
    common.report(args.out, **results)
    common.finish()


if __name__ == "__main__":
    main()
