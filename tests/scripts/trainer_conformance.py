"""Lightning idioms through ``Trainer(strategy=MiCSStrategy(...))``, exactly as users write
them, checked against DDP or a single-process reference.

``--check`` picks one idiom:

- ``precision``: every ``--precisions`` entry trains the same model under DDP and MiCS;
  losses, final parameters and the parameters' dtype inside ``training_step`` are reported.
- ``forward``: ``self(x)`` inside ``training_step``, from a hook and a callback outside the
  steps, and inference with the module after ``fit``; compared with the reference model.
- ``refit``: fit -> test -> fit on one module (the root's parameters change in between);
  compared with a single-process run of the same two fits; records whether anything moved
  the sharded module (``Module._apply``) after sharding.
- ``setup-memory``: bytes of unsharded tensors requested onto the root device during
  ``setup()`` outside FSDP's own per-unit move, and the largest unit's bytes.
- ``sync-bn``: ``Trainer(sync_batchnorm=True)`` with and without BatchNorm layers.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader

from lightning_mics import MiCSStrategy
from recipes.gpt import GPT
from tests.scripts import common
from tests.scripts.lit import LitGPT

STEPS = 3


def trainer(strategy: Any, world: int, **kwargs: Any) -> Trainer:
    return Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=world,
        max_epochs=1,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        **kwargs,
    )


def loader(world: int, micro_batch: int = 2, steps: int = STEPS) -> DataLoader:
    return common.make_loader(world, micro_batch, 1, steps)


# ---------------------------------------------------------------------------- precision
class DtypeLitGPT(LitGPT):
    """Records the dtype of the parameters the step computes with."""

    def __init__(self) -> None:
        super().__init__()
        self.step_dtypes: set[str] = set()

    def training_step(self, batch, batch_idx):
        self.step_dtypes.add(str(self.model.lm_head.weight.dtype))
        return super().training_step(batch, batch_idx)


def precision_kwargs(name: str) -> dict[str, Any]:
    # NOTE: Trainer(accelerator="cpu", precision="16-mixed") silently becomes bf16-mixed
    # (Lightning's choice, for every strategy); the plugin instance keeps fp16 autocast
    # with its gradient scaler, which is the path GPUs take.
    if name == "16-mixed-scaler":
        return {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    return {"precision": name}


def check_precision(world: int, args) -> dict[str, Any]:
    results = {}
    for name in args.precisions.split(","):
        runs = {}
        for strategy in ("ddp", "mics"):
            module = DtypeLitGPT()
            chosen = MiCSStrategy(ranks_per_node=2) if strategy == "mics" else "ddp"
            trainer(chosen, world, **precision_kwargs(name)).fit(module, loader(world))
            runs[strategy] = {
                "losses": [common.mean_over_world(v) for v in module.losses],
                "state": common.full_state(module),
                "dtypes": sorted(module.step_dtypes),
            }
            if strategy == "mics":
                runs[strategy]["param_dtypes"] = sorted({str(p.dtype) for p in module.parameters()})
        ddp, mics = runs["ddp"], runs["mics"]
        results[name] = {
            "loss_diff": max(
                abs(a - b) for a, b in zip(ddp["losses"], mics["losses"], strict=True)
            ),
            "param_diff": common.max_abs_diff(ddp["state"], mics["state"]),
            "ddp_dtypes": ddp["dtypes"],
            "mics_dtypes": mics["dtypes"],
            "mics_param_dtypes": mics["param_dtypes"],
            "losses": mics["losses"],
        }
    return results


# ------------------------------------------------------------------------------ forward
PROBE = torch.randint(
    0, common.TINY.vocab_size, (2, common.SEQ_LEN), generator=torch.Generator().manual_seed(1)
)


class ForwardLitGPT(LitGPT):
    """Calls ``self(x)`` in its step and from a hook, the way users sample text."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = GPT.loss(self(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", GPT.loss(self(x), y), sync_dist=True)

    def on_train_start(self) -> None:
        # Before any step: the root's parameters are still sharded.
        with torch.no_grad():
            self.outputs["train_start"] = self(PROBE).detach().clone()

    def on_train_epoch_end(self) -> None:
        with torch.no_grad():
            self.outputs["hook"] = self(PROBE).detach().clone()


class SampleCallback(Callback):
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        with torch.no_grad():
            pl_module.outputs["callback_no_grad"] = pl_module(PROBE).detach().clone()
        # With gradients enabled, as a careless sampling loop would run it.
        pl_module.outputs["callback_grad"] = pl_module(PROBE).detach().clone()


def check_forward(world: int, args) -> dict[str, Any]:
    module = ForwardLitGPT()
    fit = trainer(MiCSStrategy(ranks_per_node=2), world, callbacks=[SampleCallback()])
    fit.fit(module, loader(world), val_dataloaders=loader(world, steps=1))
    # Saving a checkpoint reshards every unit, the root included.
    fit.save_checkpoint(os.path.join(args.tmp, "after_fit.ckpt"))
    module.eval()
    with torch.no_grad():
        module.outputs["after_fit"] = module(PROBE).detach().clone()
    module.train()
    module.outputs["after_fit_train_mode"] = module(PROBE).detach().clone()
    losses = [common.mean_over_world(v) for v in module.losses]
    state = {k.removeprefix("model."): v for k, v in common.full_state(module).items()}
    outputs = module.outputs
    if torch.distributed.get_rank() != 0:
        return {}
    result = common.compare_with_reference(losses, state, world, 2, 1, STEPS)
    ref_model = common.make_model()
    ref_model.load_state_dict(state)
    with torch.no_grad():
        expected = ref_model(PROBE)
    with torch.no_grad():
        initial = common.make_model()(PROBE)
    result["output_diff"] = {
        k: (v - (initial if k == "train_start" else expected)).abs().max().item()
        for k, v in outputs.items()
    }
    return result


# -------------------------------------------------------------------------------- refit
class RefitLitGPT(LitGPT):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", GPT.loss(self.model(x), y), sync_dist=True)


def reference_two_fits(world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Two fits of STEPS optimizer steps, each with a new optimizer, on one process."""
    model = common.make_model()
    losses = []
    for _ in range(2):
        optimizer = common.make_optimizer(model.parameters())
        data = DataLoader(common.make_dataset(world, 2, 1, STEPS), batch_size=world * 2)
        for x, y in data:
            loss = GPT.loss(model(x), y)
            loss.backward()
            losses.append(loss.item())
            optimizer.step()
            optimizer.zero_grad()
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_refit(world: int, args) -> dict[str, Any]:
    module = RefitLitGPT()
    moves: list[str] = []
    strategy = MiCSStrategy(ranks_per_node=2)
    trainer(strategy, world).fit(module, loader(world))
    # From here on the module is sharded: nothing may move its tensors behind FSDP's back.
    original_apply = nn.Module._apply

    def recording_apply(self, fn, *a, **k):
        moves.append(type(self).__name__)
        return original_apply(self, fn, *a, **k)

    nn.Module._apply = recording_apply
    try:
        root_before = common.full_state(module)["model.transformer.wte.weight"]
        trainer(MiCSStrategy(ranks_per_node=2), world).test(module, loader(world, steps=1))
        trainer(MiCSStrategy(ranks_per_node=2), world).fit(module, loader(world))
    finally:
        nn.Module._apply = original_apply
    losses = [common.mean_over_world(v) for v in module.losses]
    state = {k.removeprefix("model."): v for k, v in common.full_state(module).items()}
    root_changed = (state["transformer.wte.weight"] - root_before).abs().max().item()
    if torch.distributed.get_rank() != 0:
        return {}
    ref_losses, ref_state = reference_two_fits(world)
    return {
        "param_diff": common.max_abs_diff(state, ref_state),
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
        "num_losses": len(losses),
        "root_changed_in_second_fit": root_changed,
        "moves_after_sharding": moves,
    }


# ------------------------------------------------------------------------- setup memory
class TransferTracker(TorchFunctionMode):
    """Bytes of plain (unsharded) tensors that device transfers ask to put on ``device``,
    split into those FSDP requests while sharding a unit and all others."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.inside_fully_shard = False
        self.outside_bytes = 0
        self.max_unit_bytes = 0
        self._unit_bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda) and args:
            tensor = args[0]
            target = self._target(func, args, kwargs)
            if target is not None and target.type == self.device.type and not tensor.is_meta:
                size = tensor.numel() * tensor.element_size()
                if self.inside_fully_shard:
                    self._unit_bytes += size
                else:
                    self.outside_bytes += size
        return func(*args, **kwargs)

    @staticmethod
    def _target(func, args, kwargs) -> torch.device | None:
        if func is torch.Tensor.cpu:
            return torch.device("cpu")
        if func is torch.Tensor.cuda:
            return torch.device("cuda")
        for value in (*args[1:], kwargs.get("device")):
            if isinstance(value, torch.device):
                return value
            if isinstance(value, str):
                return torch.device(value)
        return None

    def wrap_fully_shard(self, fully_shard):
        def tracked(module, *a, **k):
            self.inside_fully_shard, self._unit_bytes = True, 0
            try:
                return fully_shard(module, *a, **k)
            finally:
                self.inside_fully_shard = False
                self.max_unit_bytes = max(self.max_unit_bytes, self._unit_bytes)

        return tracked


class TrackedMiCSStrategy(MiCSStrategy):
    def setup(self, trainer: Trainer) -> None:
        import lightning_mics.sharding as sharding

        self.tracker = TransferTracker(self.root_device)
        original = sharding.fully_shard
        sharding.fully_shard = self.tracker.wrap_fully_shard(original)
        try:
            with self.tracker:
                super().setup(trainer)
        finally:
            sharding.fully_shard = original


def check_setup_memory(world: int, args) -> dict[str, Any]:
    module = LitGPT()
    model_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    block_bytes = max(
        sum(p.numel() * p.element_size() for p in block.parameters())
        for block in module.model.transformer.h
    )
    strategy = TrackedMiCSStrategy(ranks_per_node=2)
    trainer(strategy, world).fit(module, loader(world, steps=1))
    return {
        "model_bytes": model_bytes,
        "block_bytes": block_bytes,
        "outside_fully_shard_bytes": strategy.tracker.outside_bytes,
        "max_unit_bytes": strategy.tracker.max_unit_bytes,
    }


# ---------------------------------------------------------------------- sync_batchnorm
class BatchNormLitGPT(LitGPT):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(common.TINY.vocab_size)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.norm(self.model(x).transpose(1, 2)).transpose(1, 2)
        return GPT.loss(logits, y)


def check_sync_bn(world: int, args) -> dict[str, Any]:
    result: dict[str, Any] = {}
    module = BatchNormLitGPT()
    try:
        trainer(MiCSStrategy(ranks_per_node=2), world, sync_batchnorm=True).fit(
            module, loader(world, steps=1)
        )
        result["with_bn"] = "trained"
    except RuntimeError as err:
        result["with_bn"] = str(err)
    result["converted"] = any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())
    plain = LitGPT()
    trainer(MiCSStrategy(ranks_per_node=2), world, sync_batchnorm=True).fit(plain, loader(world))
    losses = [common.mean_over_world(v) for v in plain.losses]
    state = {k.removeprefix("model."): v for k, v in common.full_state(plain).items()}
    if torch.distributed.get_rank() == 0:
        result["without_bn"] = common.compare_with_reference(losses, state, world, 2, 1, STEPS)
    return result


CHECKS = {
    "precision": check_precision,
    "forward": check_forward,
    "refit": check_refit,
    "setup-memory": check_setup_memory,
    "sync-bn": check_sync_bn,
}


def main() -> None:
    p = common.parser()
    p.add_argument("--check", choices=sorted(CHECKS), required=True)
    p.add_argument("--precisions", default="32-true")
    p.add_argument("--tmp", default=".", help="a directory shared by the ranks")
    args = p.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    result = CHECKS[args.check](world, args)
    common.report(args.out, **result)
    common.finish()


if __name__ == "__main__":
    main()
