"""A BoringModel-style LightningModule through fit, validate, test and predict with
``strategy="mics"``, plus the strategy's collectives, sampler and meta-device init."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset

import lightning_mics  # registers "mics"
from lightning_mics import checkpoint as ckpt
from recipes.gpt import GPT
from tests.scripts import common
from tests.scripts.lit import LitGPT


class RandomDataset(Dataset):
    def __init__(self, size: int = 32, length: int = 64) -> None:
        self.data = torch.randn(length, size, generator=torch.Generator().manual_seed(0))

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index]

    def __len__(self) -> int:
        return len(self.data)


class BoringModel(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(32, 32) for _ in range(2)])
        self.head = nn.Linear(32, 2)
        self.seen: dict[str, object] = {}
        self.predict_inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)

    def training_step(self, batch, batch_idx):
        loss = self(batch).pow(2).mean()
        self.log("train_loss", loss, sync_dist=True)
        self.log("train_rank", float(self.global_rank), sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_rank", float(self.global_rank), sync_dist=True)
        self.log("val_loss", self(batch).pow(2).mean(), sync_dist=True)

    def test_step(self, batch, batch_idx):
        self.log("test_rank", float(self.global_rank), sync_dist=True)

    def predict_step(self, batch, batch_idx):
        self.predict_inputs.append(batch)
        return self(batch)

    def on_train_start(self) -> None:
        strategy = self.trainer.strategy
        sampler = self.trainer.train_dataloader.sampler
        rank = torch.tensor([float(self.global_rank)])
        self.seen.update(
            sampler_replicas=sampler.num_replicas,
            sampler_rank=sampler.rank,
            all_gather=self.all_gather(rank).flatten().tolist(),
            reduce_sum=strategy.reduce(rank.clone(), reduce_op="sum").item(),
            reduce_mean=strategy.reduce(rank.clone()).item(),
            broadcast=strategy.broadcast(f"from-{self.global_rank}"),
            any_decision=strategy.reduce_boolean_decision(self.global_rank == 3, all=False),
            # The root's own parameters stay gathered between forward and backward
            # (reshard_after_forward=False for the root); the blocks are sharded.
            blocks_sharded=all(isinstance(p, DTensor) for p in self.layers.parameters()),
        )
        strategy.barrier()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class MetaInitGPT(LitGPT):
    """Created under ``trainer.init_module(empty_init=True)``: parameters start on meta."""

    def __init__(self) -> None:
        super().__init__(GPT(common.TINY))
        self.started_on_meta = all(p.is_meta for p in self.parameters())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ConfigureModelGPT(MetaInitGPT):
    """Creates its model in ``configure_model`` on the meta device (idempotently: the
    hook runs again for every fit/validate/test)."""

    def __init__(self) -> None:
        LightningModule.__init__(self)
        self.model = None
        self.losses = []
        self.started_on_meta = False

    def configure_model(self) -> None:
        if self.model is not None:
            return
        with torch.device("meta"):
            self.model = GPT(common.TINY)
        self.started_on_meta = all(p.is_meta for p in self.model.parameters())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", GPT.loss(self.model(x), y), sync_dist=True)


class FailingConfigureModel(BoringModel):
    meshes_during_run = -1

    def configure_model(self) -> None:
        from lightning_mics import process_groups

        FailingConfigureModel.meshes_during_run = len(process_groups._MESHES)
        raise RuntimeError("configure_model failed on purpose")


def checkpoint_report(
    root: Path, trained: dict[str, torch.Tensor], global_step: int
) -> dict[str, object]:
    """Rank 0 reads back the checkpoints that fit wrote under ``root`` (in this process
    only) and compares them with the trained model's unsharded state."""
    ckpts = sorted(root.rglob("*.ckpt"))
    report: dict[str, object] = {"names": [c.name for c in ckpts]}
    if int(os.environ["RANK"]) != 0 or len(ckpts) != 1:
        return report
    saved = ckpt.consolidated_model_state(ckpts[0])
    report.update(
        keys_equal=sorted(saved) == sorted(trained),
        num_tensors=len(saved),
        bitwise_equal=all(
            k in trained and v.dtype == trained[k].dtype and torch.equal(v, trained[k])
            for k, v in saved.items()
        ),
        max_abs_diff=max(
            (saved[k].float() - trained[k].float()).abs().max().item()
            for k in saved
            if k in trained
        ),
        global_step=ckpt.load_meta(ckpts[0]).get("global_step"),
        trained_global_step=global_step,
    )
    return report


def trainer(**kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=int(os.environ["WORLD_SIZE"]),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return Trainer(**{**defaults, **kwargs})


def main() -> None:
    args = common.parser().parse_args()
    out = {}

    # 1. The registered name, fit / validate / test / predict.
    t = trainer(
        strategy="mics",
        max_steps=4,
        limit_val_batches=2,
        default_root_dir=str(Path.cwd() / "boring"),
    )
    model = BoringModel()
    data = DataLoader(RandomDataset(), batch_size=4)
    t.fit(model, data, data)
    out["strategy_class"] = type(t.strategy).__name__
    out["fit"] = {k: v for k, v in model.seen.items()}
    out["fit"]["train_rank"] = t.callback_metrics["train_rank"].item()
    out["fit"]["global_step"] = t.global_step
    trained = {k: v.full_tensor() for k, v in model.state_dict().items()}  # collective
    out["checkpoint"] = checkpoint_report(Path.cwd() / "boring", trained, t.global_step)
    out["validate"] = t.validate(model, data)[0]
    out["test"] = t.test(model, data)[0]
    predictions = t.predict(model, DataLoader(RandomDataset(length=16), batch_size=4))
    out["predictions"] = [list(p.shape) for p in predictions]
    # predictions equal the unsharded model's output on this rank's inputs
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    reference = BoringModel()
    reference.load_state_dict(full)
    inputs = torch.cat(model.predict_inputs)
    out["predict_rows"] = len(inputs)
    out["predict_diff"] = (reference(inputs) - torch.cat(predictions)).abs().max().item()

    # 2. An instance with arguments, and meta-device init in configure-free style.
    t2 = trainer(
        strategy=lightning_mics.MiCSStrategy(partition_size=4, ranks_per_node=2),
        max_steps=3,
        enable_checkpointing=False,
        use_distributed_sampler=False,
    )
    with t2.init_module(empty_init=True):
        meta_model = MetaInitGPT()
    t2.fit(meta_model, common.make_loader(int(os.environ["WORLD_SIZE"]), 2, 1, 3))
    out["meta"] = {
        "started_on_meta": meta_model.started_on_meta,
        "materialized": not any(p.is_meta for p in meta_model.parameters()),
        "finite_losses": all(math.isfinite(v) for v in meta_model.losses),
        "num_losses": len(meta_model.losses),
        "partition_size": t2.strategy.mics.topology.partition_size,
    }

    # 3. configure_model with meta-device init; fit then validate reuse the sharded model.
    t3 = trainer(strategy="mics", max_steps=2, enable_checkpointing=False)
    cm_model = ConfigureModelGPT()
    loader = common.make_loader(int(os.environ["WORLD_SIZE"]), 2, 1, 2)
    t3.fit(cm_model, loader)
    val = t3.validate(cm_model, loader)[0]
    out["configure_model"] = {
        "started_on_meta": cm_model.started_on_meta,
        "materialized": not any(p.is_meta for p in cm_model.parameters()),
        "finite_losses": all(math.isfinite(v) for v in cm_model.losses),
        "num_losses": len(cm_model.losses),
        "val_loss_finite": math.isfinite(val["val_loss"]),
    }

    # 4. Teardown of a run that failed before sharding destroys the groups it created.
    from lightning_mics import process_groups

    before = set(process_groups._MESHES)
    t4 = trainer(
        strategy=lightning_mics.MiCSStrategy(partition_size=1, ranks_per_node=2), max_steps=1
    )
    try:
        t4.fit(FailingConfigureModel(), data)
        failed = False
    except RuntimeError:
        failed = True
    out["teardown"] = {
        "failed": failed,
        "meshes_unchanged": set(process_groups._MESHES) == before,
        "kept_meshes_of_sharded_models": len(before),
        "meshes_during_failed_run": FailingConfigureModel.meshes_during_run,
    }

    # 5. A model sharded under one layout is refused under another, with a clear error.
    t5 = trainer(
        strategy=lightning_mics.MiCSStrategy(partition_size=2, ranks_per_node=2), max_steps=1
    )
    try:
        t5.validate(cm_model, loader)
        out["layout_error"] = ""
    except lightning_mics.MiCSTopologyError as err:
        out["layout_error"] = str(err)
    common.report(args.out, **out)
    common.finish()


if __name__ == "__main__":
    main()
