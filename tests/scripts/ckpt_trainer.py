"""Trainer checkpoints on 2 emulated nodes x 2 ranks, partition 4, under emulated Slurm.

1. An uninterrupted run of 6 optimizer steps (accumulation 2, dropout, AdamW, StepLR)
   saves sharded checkpoints with ModelCheckpoint at steps 3 and 6 (and ``last.ckpt``,
   which the step-6 save replaces), a full-format one and the reference states at step 3. Each rank sends itself the Slurm requeue signal
   (at different batches), so Lightning's ``hpc_ckpt_1.ckpt`` is written too.
2. Resumes from the step-3 sharded, full and hpc checkpoints (the latter picked by
   Lightning itself, as after a Slurm requeue) reproduce steps 4-6.
3. ``fit(ckpt_path=<directory>)`` picks the newest complete checkpoint, ignoring an
   interrupted save and a directory without completion marker.
"""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mics import MiCSStrategy
from tests.scripts import ckpt_common as cc
from tests.scripts import common


class AtStep(Callback):
    """At the end of step SAVE_AT: reference states and a full-format checkpoint.
    Sends the requeue signal to its own rank at a rank-dependent batch."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank >= 2 and batch_idx == cc.SAVE_AT * cc.ACCUM:
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank < 2 and batch_idx == cc.SAVE_AT * cc.ACCUM - 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        if batch_idx == cc.SAVE_AT * cc.ACCUM - 2:  # mid-window: warns
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer.save_checkpoint(self.out / "mid-window.ckpt")
            self.mid_window_warning = [
                str(w.message) for w in caught if "accumulation window" in str(w.message)
            ]
        if batch_idx != cc.SAVE_AT * cc.ACCUM - 1:
            return
        optimizer = trainer.optimizers[0]
        ref = {
            "model": common.full_state(pl_module),
            "optimizer": cc.full_optimizer_state(pl_module, optimizer),
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        }
        if trainer.global_rank == 0:
            torch.save(ref, self.out / "ref3.pt")
        strategy = trainer.strategy
        strategy.state_dict_type = "full"
        trainer.save_checkpoint(self.out / "full" / "step3.ckpt")
        strategy.state_dict_type = "sharded"


def fake_slurm_env() -> None:
    """What srun would set for this rank (torchrun launched it)."""
    os.environ.update(
        SLURM_NTASKS=os.environ["WORLD_SIZE"],
        SLURM_NTASKS_PER_NODE=os.environ["LOCAL_WORLD_SIZE"],
        SLURM_PROCID=os.environ["RANK"],
        SLURM_LOCALID=os.environ["LOCAL_RANK"],
        SLURM_NODEID="0",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="mics-test",
        SLURM_NODELIST="127.0.0.1",
    )


def make_trainer(root: Path, args, **kwargs) -> Trainer:
    strategy = MiCSStrategy(
        partition_size=common.partition_size(args.partition_size),
        ranks_per_node=args.ranks_per_node,
        state_dict_type=kwargs.pop("state_dict_type", "sharded"),
    )
    defaults = dict(
        strategy=strategy,
        accelerator="cpu",
        devices=cc.world(),
        max_steps=cc.STEPS,
        accumulate_grad_batches=cc.ACCUM,
        default_root_dir=str(root),
        plugins=[SLURMEnvironment(auto_requeue=True)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        enable_checkpointing=False,
    )
    return Trainer(**{**defaults, **kwargs})


def fit(trainer: Trainer, ckpt_path=None) -> tuple[list[float], dict, cc.LitGPT]:
    loader = cc.ResumableLoader(cc.world())
    module = cc.LitGPT(loader, seed=1 if ckpt_path is not None else 0)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    losses = [common.mean_over_world(v) for v in module.losses]
    return losses, common.full_state(module), module


def main() -> None:
    p = common.parser()
    p.add_argument("--dir", required=True)
    args = p.parse_args()
    out = Path(args.dir)
    fake_slurm_env()
    report: dict = {}

    # 1. Uninterrupted run, checkpoints at step 3 (and 6), Slurm requeue signal.
    root = out / "root"
    ckpts = out / "sharded"
    mc = ModelCheckpoint(
        dirpath=ckpts,
        filename="{step}",
        every_n_train_steps=cc.SAVE_AT,
        save_top_k=-1,
        save_last=True,
    )
    at_step = AtStep(out)
    trainer = make_trainer(root, args, callbacks=[at_step, mc], enable_checkpointing=True)
    losses, final, _ = fit(trainer)
    if trainer.global_rank == 0:
        torch.save(final, out / "final.pt")
    report["uninterrupted_steps"] = trainer.global_step
    report["mid_window_warning"] = at_step.mid_window_warning
    report["num_losses"] = len(losses)
    report["sharded_dirs"] = sorted(p.name for p in ckpts.iterdir())
    report["root_entries"] = sorted(p.name for p in root.iterdir())
    tail = losses[cc.SAVE_AT * cc.ACCUM :]

    # 2. Exact resume from each format, and from Lightning's hpc checkpoint.
    resumes = {
        "sharded": (ckpts / "step=3.ckpt", "sharded"),
        "full": (out / "full" / "step3.ckpt", "full"),
        "hpc": (None, "sharded"),  # Lightning picks root/hpc_ckpt_1.ckpt under Slurm
    }
    for name, (path, kind) in resumes.items():
        trainer = make_trainer(root, args, state_dict_type=kind)
        resumed, state, module = fit(trainer, ckpt_path=path)
        report[f"resume_{name}"] = {
            "ckpt_path": str(trainer.ckpt_path),
            "batches_skipped": module.batches_skipped,
            "global_step": trainer.global_step,
            "num_losses": len(resumed),
            "loss_diff": max(abs(a - b) for a, b in zip(resumed, tail, strict=True))
            if len(resumed) == len(tail)
            else None,
            "param_diff": common.max_abs_diff(state, final),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }
    report["uninterrupted_lr"] = 3e-3 * 0.5 ** (cc.STEPS // 2)

    # 3. A directory of checkpoints: an interrupted save (temporary name) and a
    # directory without completion marker are ignored; the newest complete one wins.
    if trainer.global_rank == 0:
        (ckpts / ".mics-tmp-deadbeef").mkdir()
        (ckpts / ".mics-tmp-deadbeef" / "__0_0.distcp").write_bytes(b"partial")
        (ckpts / "step=9.ckpt").mkdir()
        (ckpts / "step=9.ckpt" / "__0_0.distcp").write_bytes(b"partial")
    trainer.strategy.barrier()
    trainer = make_trainer(root, args)
    _, state, _ = fit(trainer, ckpt_path=ckpts)
    report["resume_dir"] = {
        "ckpt_path": str(trainer.ckpt_path),
        "global_step": trainer.global_step,
        "param_diff": common.max_abs_diff(state, final),
    }
    common.report(args.out, **report)
    common.finish()


if __name__ == "__main__":
    main()
