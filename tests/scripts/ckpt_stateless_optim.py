"""Checkpoints of an optimizer without tensor state (SGD without momentum), both formats,
saved and loaded on 2 ranks (partition 2) by the Trainer, Fabric and the plain API.

Each part trains a step or two with ``lr=0.05``, saves, and loads into a model with other
weights and an optimizer with ``lr=0.5``: the report holds the model difference and the
restored learning rate.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from lightning.pytorch import Trainer

import lightning_mics
from lightning_mics import MiCSConfig, MiCSTopology, apply_mics
from lightning_mics import MiCSStrategy as TrainerMiCSStrategy
from lightning_mics.fabric import MiCSStrategy as FabricMiCSStrategy
from recipes.gpt import GPT
from tests.scripts import ckpt_common as cc
from tests.scripts import common

KINDS = ("full", "sharded")
LR, OTHER_LR = 0.05, 0.5


def sgd(params, lr: float = LR) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr)  # no momentum: the optimizer keeps no state


class LitSGD(cc.LitGPT):
    def __init__(self, seed: int, lr: float) -> None:
        super().__init__(seed=seed)
        self.lr = lr

    def configure_optimizers(self):
        return sgd(self.parameters(), self.lr)


def trainer_part(out: Path, kind: str) -> dict:
    def make_trainer() -> Trainer:
        return Trainer(
            strategy=TrainerMiCSStrategy(partition_size=2, state_dict_type=kind),
            accelerator="cpu",
            devices=cc.world(),
            max_steps=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
        )

    loader = common.make_loader(cc.world(), 2, 1, 2)
    module = LitSGD(seed=0, lr=LR)
    trainer = make_trainer()
    trainer.fit(module, loader)
    path = out / f"trainer-{kind}.ckpt"
    trainer.save_checkpoint(path)
    saved = common.full_state(module)
    # Resumed at max_steps: restores model and optimizer, trains no further.
    resumed = LitSGD(seed=1, lr=OTHER_LR)
    trainer = make_trainer()
    trainer.fit(resumed, loader, ckpt_path=path)
    return {
        "global_step": trainer.global_step,
        "model_diff": common.max_abs_diff(common.full_state(resumed), saved),
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
    }


def fabric_part(fabric: Fabric, out: Path, kind: str) -> dict:
    fabric.strategy.state_dict_type = kind
    model = fabric.setup_module(common.make_model(seed=0))
    optimizer = fabric.setup_optimizers(sgd(model.parameters()))
    x, y = next(iter(common.make_loader(cc.world(), 2, 1, 1)))
    fabric.backward(GPT.loss(model(x), y))
    optimizer.step()
    path = out / f"fabric-{kind}.ckpt"
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 1})
    saved = common.full_state(model)
    model = fabric.setup_module(common.make_model(seed=1))
    optimizer = fabric.setup_optimizers(sgd(model.parameters(), OTHER_LR))
    state = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(path, state)
    return {
        "step": state["step"],
        "model_diff": common.max_abs_diff(common.full_state(model), saved),
        "lr": optimizer.param_groups[0]["lr"],
    }


def plain_part(out: Path, kind: str) -> dict:
    topology = MiCSTopology.create(cc.world(), 2, 2)
    model = apply_mics(common.make_model(seed=0), topology, MiCSConfig())
    optimizer = sgd(model.parameters())
    x, y = next(iter(common.make_loader(cc.world(), 2, 1, 1)))
    GPT.loss(model(x), y).backward()
    optimizer.step()
    path = out / f"plain-{kind}.ckpt"
    lightning_mics.save_checkpoint(path, model, optimizer, state_dict_type=kind)
    saved = common.full_state(model)
    model = apply_mics(common.make_model(seed=1), topology, MiCSConfig())
    optimizer = sgd(model.parameters(), OTHER_LR)
    lightning_mics.load_checkpoint(path, model, optimizer)
    return {
        "model_diff": common.max_abs_diff(common.full_state(model), saved),
        "lr": optimizer.param_groups[0]["lr"],
    }


def main() -> None:
    p = common.parser()
    p.add_argument("--dir", required=True)
    args = p.parse_args()
    out = Path(args.dir)
    report: dict = {kind: {"trainer": trainer_part(out, kind)} for kind in KINDS}
    fabric = Fabric(
        strategy=FabricMiCSStrategy(partition_size=2), accelerator="cpu", devices=cc.world()
    )
    fabric.launch()
    for kind in KINDS:
        report[kind]["fabric"] = fabric_part(fabric, out, kind)
        report[kind]["plain"] = plain_part(out, kind)
    dist.barrier()
    common.report(args.out, **report)
    common.finish()


if __name__ == "__main__":
    main()
