"""A rank dies (SIGKILL): while a checkpoint is being written (``--mode save``), in
the middle of a training step (``--mode train``), or while rank 0 publishes a checkpoint
that replaces one of the same name (``--mode replace --kill-at STEP``, STEP one of the
steps of ``lightning_mics.checkpoint._publish``: ``written``, ``set-aside``,
``renamed-in``).

Launched one process per rank without an agent (no torchrun, which would kill the other
ranks itself), so the survivors must notice on their own. Before dying, the run saves a
complete checkpoint ``step-1``; the interrupted one is ``step-2``. In ``replace`` mode
both saves go to ``last.ckpt`` (formats ``--formats FIRST,SECOND``), and rank 0 writes
the full model state of each step to ``ref-<step>.pt`` before saving it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from lightning.fabric import Fabric

from lightning_mics.fabric import MiCSStrategy
from recipes.gpt import GPT
from tests.scripts import ckpt_common as cc
from tests.scripts import common


def die() -> None:
    """Record the time of death (in the working directory) and SIGKILL this rank."""
    Path("victim-died").write_text(str(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def die_while_writing() -> None:
    """This rank writes its files, then is killed before the checkpoint is complete."""
    from torch.distributed.checkpoint import FileSystemWriter

    original = FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        future = original(self, plan, planner)
        future.wait()
        die()
        return future

    FileSystemWriter.write_data = write_then_die


def die_at_publish_step(step: str) -> None:
    """This rank (rank 0) is killed at the named step of publishing a checkpoint."""
    from lightning_mics import checkpoint as ckpt

    def hook(name: str) -> None:
        if name == step:
            die()

    ckpt._on_publish_step = hook


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--mode", choices=["save", "train", "replace"], required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--victim", type=int, default=1)
    p.add_argument("--kill-at", default="set-aside", help="publish step (--mode replace)")
    p.add_argument("--formats", default="sharded,sharded", help="first,second (replace)")
    args = p.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    strategy = MiCSStrategy(
        partition_size=2, ranks_per_node=2, timeout=timedelta(seconds=args.timeout)
    )
    fabric = Fabric(strategy=strategy, accelerator="cpu", devices=world)
    fabric.launch()
    model = fabric.setup_module(common.make_model())
    optimizer = fabric.setup_optimizers(cc.make_optimizer(model.parameters()))
    loader = common.make_loader(world, 2, 1, 3)
    victim = fabric.global_rank == args.victim
    try:
        train(fabric, model, optimizer, loader, victim, args)
    except BaseException:
        print(f"FAILED-AT {time.time()}", file=sys.stderr, flush=True)
        raise
    common.finish()


def train(fabric, model, optimizer, loader, victim: bool, args) -> None:
    out = Path(args.dir)
    formats = args.formats.split(",")
    for step, (x, y) in enumerate(loader, start=1):
        if step == 2 and args.mode == "train" and victim:
            die()
        fabric.backward(GPT.loss(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
        if step == 2 and args.mode == "save" and victim:
            die_while_writing()
        name = f"step-{step}"
        if args.mode == "replace":
            name = "last.ckpt"
            fabric.strategy.state_dict_type = formats[step - 1]
            state = common.full_state(model)
            if fabric.global_rank == 0:
                torch.save(state, out / f"ref-{step}.pt")
            if step == 2 and victim:
                die_at_publish_step(args.kill_at)
        fabric.save(out / name, {"model": model, "optimizer": optimizer})
        if step == 2:
            break


if __name__ == "__main__":
    main()
