"""Load checkpoints written by ``ckpt_trainer.py`` (2 nodes x 2 ranks, partition 4)
under another topology, and Fabric save / load.

Trainer: the step-3 sharded checkpoint loads under this launch's topology with the
exact model, optimizer and scheduler states; the state is saved again (to measure the
bytes written with replicas). Fabric (``--fabric``): loads the Trainer's checkpoint,
resumes exactly from its own sharded and full checkpoints, and initialises a sharded
model from the consolidated safetensors file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch import nn

import lightning_mics
from lightning_mics.fabric import MiCSStrategy as FabricMiCSStrategy
from recipes.gpt import GPT
from tests.scripts import ckpt_common as cc
from tests.scripts import common
from tests.scripts.ckpt_trainer import make_trainer


def trainer_load(out: Path, args) -> dict:
    ref = torch.load(out / "ref3.pt", weights_only=True)
    trainer = make_trainer(out / f"root-w{cc.world()}", args, max_steps=cc.SAVE_AT, plugins=None)
    module = cc.LitGPT(seed=7)
    loader = common.make_loader(cc.world(), cc.MICRO_BATCH, cc.ACCUM, cc.STEPS)
    trainer.fit(module, loader, ckpt_path=out / "sharded" / "step=3.ckpt")
    optimizer = trainer.optimizers[0]
    result = {
        "global_step": trainer.global_step,
        "topology": trainer.strategy.mics.topology.describe(),
        "model_diff": common.max_abs_diff(common.full_state(module), ref["model"]),
        "optimizer_diff": cc.state_diff(
            cc.full_optimizer_state(module, optimizer), ref["optimizer"]
        ),
        "scheduler_equal": trainer.lr_scheduler_configs[0].scheduler.state_dict()
        == ref["scheduler"],
    }
    trainer.save_checkpoint(out / f"resaved-w{cc.world()}-p{args.partition_size}.ckpt")
    return result


class Holder(nn.Module):
    """Parameter names as in the Trainer's LitGPT (``model.*``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def fabric_run(
    fabric: Fabric, model, optimizer, start: int, save: Path | None, rng=None
) -> list[float]:
    loader = iter(common.make_loader(cc.world(), cc.MICRO_BATCH, cc.ACCUM, cc.STEPS))
    if rng is not None:  # after creating the iterator, which draws from the global RNG
        torch.set_rng_state(rng)
    losses = []
    for i, (x, y) in enumerate(loader):
        if i < start * cc.ACCUM:
            continue
        is_last = (i + 1) % cc.ACCUM == 0
        with fabric.no_backward_sync(model, enabled=not is_last):
            loss = GPT.loss(model(x), y)
            fabric.backward(loss / cc.ACCUM)
        losses.append(common.mean_over_world(loss.item()))
        if is_last:
            optimizer.step()
            optimizer.zero_grad()
            step = (i + 1) // cc.ACCUM
            if save is not None and step == cc.SAVE_AT:
                # Every rank has the same RNG state here (same seed, same draws).
                rng = torch.get_rng_state()
                state = {"model": model, "optimizer": optimizer, "step": step, "rng": rng}
                for kind in ("sharded", "full"):
                    fabric.strategy.state_dict_type = kind
                    fabric.save(save / f"fabric-{kind}", state)
                fabric.strategy.state_dict_type = "sharded"
    return losses


def fabric_checks(out: Path, args) -> dict:
    strategy = FabricMiCSStrategy(
        partition_size=common.partition_size(args.partition_size),
        ranks_per_node=args.ranks_per_node,
    )
    fabric = Fabric(strategy=strategy, accelerator="cpu", devices=cc.world())
    fabric.launch()
    result: dict = {}

    # The Trainer's checkpoint (other topology) into Fabric objects.
    ref = torch.load(out / "ref3.pt", weights_only=True)
    model = fabric.setup_module(Holder(cc.make_model(seed=3)))
    optimizer = fabric.setup_optimizers(cc.make_optimizer(model.parameters()))
    rest = fabric.load(
        out / "sharded" / "step=3.ckpt", {"state_dict": model, "optimizer_0": optimizer}
    )
    result["trainer_ckpt_model_diff"] = common.max_abs_diff(common.full_state(model), ref["model"])
    result["trainer_ckpt_optimizer_diff"] = cc.state_diff(
        cc.full_optimizer_state(model.module, optimizer.optimizer)["state"],
        ref["optimizer"]["state"],
    )
    result["trainer_ckpt_global_step"] = rest["global_step"]

    # Exact resume with Fabric, both formats.
    ckpt_dir = out / f"fabric-w{cc.world()}"
    model = fabric.setup_module(cc.make_model(seed=0))
    optimizer = fabric.setup_optimizers(cc.make_optimizer(model.parameters()))
    torch.manual_seed(123)
    losses = fabric_run(fabric, model, optimizer, 0, ckpt_dir)
    final = common.full_state(model)
    tail = losses[cc.SAVE_AT * cc.ACCUM :]
    for kind in ("sharded", "full"):
        resumed_model = fabric.setup_module(cc.make_model(seed=5))
        resumed_opt = fabric.setup_optimizers(cc.make_optimizer(resumed_model.parameters()))
        state = {"model": resumed_model, "optimizer": resumed_opt, "step": 0, "rng": None}
        rest = fabric.load(ckpt_dir / f"fabric-{kind}", state)
        resumed = fabric_run(
            fabric, resumed_model, resumed_opt, state["step"], None, rng=state["rng"]
        )
        result[f"fabric_resume_{kind}"] = {
            "step": state["step"],
            "rest": sorted(rest),
            "num_losses": len(resumed),
            "loss_diff": max(abs(a - b) for a, b in zip(resumed, tail, strict=True))
            if len(resumed) == len(tail)
            else None,
            "param_diff": common.max_abs_diff(common.full_state(resumed_model), final),
        }

    # A MiCS model initialised from the consolidated full model file.
    model = fabric.setup_module(Holder(cc.make_model(seed=9)))
    lightning_mics.load_model_weights(model, out / "consolidated.safetensors")
    final_ref = torch.load(out / "final.pt", weights_only=True)
    result["init_from_file_diff"] = common.max_abs_diff(common.full_state(model), final_ref)
    return result


def main() -> None:
    p = common.parser()
    p.add_argument("--dir", required=True)
    p.add_argument("--fabric", action="store_true")
    args = p.parse_args()
    out = Path(args.dir)
    report = {"trainer": trainer_load(out, args)}
    if args.fabric:
        report["fabric"] = fabric_checks(out, args)
    common.report(args.out, **report)
    common.finish()


if __name__ == "__main__":
    main()
