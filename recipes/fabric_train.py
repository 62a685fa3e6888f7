"""Train a GPT or BERT with Lightning Fabric: the same configs as recipes/train.py, your loop.

    python recipes/fabric_train.py experiment=laptop_gpt
    python recipes/fabric_train.py experiment=laptop_bert strategy.partition_size=4

The loop, top to bottom: launch the processes, prepare the data (local rank 0 first),
create the network (on the meta device for sharding strategies), ``fabric.setup(model,
optimizer)`` (MiCS shards the model and points the optimizer at the shards),
``setup_dataloaders`` (a distributed sampler), gradient accumulation with
``no_backward_sync`` (MiCS: reduce-scatter inside the partition on every micro-step,
all-reduce across replicas once per step), ``clip_gradients``, validation, and a sharded
checkpoint with ``fabric.save`` (``ckpt_path=...`` resumes with ``fabric.load``).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `import recipes` work
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools
import json
import os
import time
import warnings
from typing import Any

import hydra
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from omegaconf import DictConfig
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from lightning_mics.accounting import find_comm_stats, format_summary, mean_snapshot
from recipes.bert import IGNORE_INDEX
from recipes.config import (
    ConfigError,
    accumulation,
    datamodule_from_config,
    fsdp_options,
    strategy_options,
    validate_config,
    world_size,
)
from recipes.lit import loss_fn
from recipes.strategies import fabric_strategy

warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")


def build_fabric(cfg: DictConfig) -> Fabric:
    """The Fabric of a composed config (launches nothing)."""
    name = cfg.strategy.name
    fsdp = fsdp_options(cfg) if name == "fsdp" else {}
    return Fabric(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        precision=cfg.trainer.precision,
        strategy=fabric_strategy(name, strategy_options(cfg), world_size(cfg), fsdp),
        loggers=CSVLogger(root_dir=cfg.paths.output_dir, name="fabric_csv", version=""),
    )


def make_metric(arch: str, vocab_size: int) -> Metric:
    if arch == "gpt":
        return Perplexity(ignore_index=IGNORE_INDEX)
    return MulticlassAccuracy(num_classes=vocab_size, ignore_index=IGNORE_INDEX, average="micro")


@torch.no_grad()
def validate(
    fabric: Fabric, model: torch.nn.Module, loader: Any, cfg: DictConfig, metric: Metric
) -> dict[str, float]:
    """Mean validation loss and the metric over (at most ``trainer.limit_val_batches``
    batches of) every rank's validation data."""
    model.eval()
    arch = cfg.model.arch
    losses = []
    for batch in itertools.islice(loader, int(cfg.trainer.limit_val_batches)):
        inputs, targets = batch
        logits = model(inputs)
        losses.append(loss_fn(arch, logits, targets))
        if arch == "gpt":
            metric.update(logits.float(), targets)
        else:
            metric.update(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
    model.train()
    loss = fabric.all_reduce(torch.stack(losses).mean(), reduce_op="mean")
    name = "val/ppl" if arch == "gpt" else "val/mlm_acc"
    result = {"val/loss": float(loss), name: float(metric.compute())}  # compute() syncs ranks
    metric.reset()
    return result


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate, launch and train; returns rank 0's summary (also in summary.json)."""
    plan = validate_config(cfg)
    if cfg.trainer.accelerator == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(cfg.trainer.devices)))
    fabric = build_fabric(cfg)
    fabric.launch()
    fabric.print(plan.describe(cfg) + f"\n  output     {cfg.paths.output_dir}")
    fabric.seed_everything(int(cfg.seed))
    arch = cfg.model.arch
    accumulate = accumulation(cfg)
    max_steps = int(cfg.trainer.max_steps)

    # Data: local rank 0 of each node tokenizes into the cache, the others wait, then map it.
    datamodule = datamodule_from_config(cfg)
    with fabric.rank_zero_first(local=True):
        datamodule.prepare_data()
    datamodule.setup("fit")
    train_loader, val_loader = fabric.setup_dataloaders(
        datamodule.train_dataloader(), datamodule.val_dataloader()
    )

    # Model: on the meta device for sharding strategies, materialised shard by shard.
    # cfg.model instantiates to the recipes' LightningModule: Fabric trains its network.
    with fabric.init_module(empty_init=cfg.strategy.name != "ddp"):
        module = hydra.utils.instantiate(cfg.model)
    model, config = module.model, module.config
    if cfg.strategy.name == "fsdp":
        # NOTE: Lightning's ModelParallelStrategy shards the model before the optimizer
        # exists (it does not support setting both up together).
        model = fabric.setup_module(model)
        optimizer, scheduler = module.make_optimizer(model.named_parameters(), max_steps)
        optimizer = fabric.setup_optimizers(optimizer)
    else:
        optimizer, scheduler = module.make_optimizer(model.named_parameters(), max_steps)
        model, optimizer = fabric.setup(model, optimizer)  # MiCS: shards, rebinds the optimizer
    metric = make_metric(arch, config.vocab_size).to(fabric.device)

    step = 0
    state = {"model": model, "optimizer": optimizer, "step": step}
    if scheduler is not None:
        state["scheduler"] = scheduler
    if cfg.get("ckpt_path"):
        fabric.load(cfg.ckpt_path, state)
        step = state["step"]
        fabric.print(f"resumed from {cfg.ckpt_path} at step {step}")

    stats = find_comm_stats(model)
    comm_history: list[dict[str, int]] = []
    losses: list[float] = []
    val: dict[str, float] = {}
    step_times: list[float] = []
    clip = cfg.trainer.get("gradient_clip_val")
    val_every = int(cfg.trainer.val_check_interval)
    log_every = int(cfg.trainer.log_every_n_steps)
    micro = 0
    t_step = time.perf_counter()
    for epoch in itertools.count():
        if step >= max_steps:
            break
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)  # a new shuffle every epoch
        for inputs, targets in train_loader:
            is_last = (micro + 1) % accumulate == 0
            # Non-final micro-steps: MiCS reduce-scatters inside the partition group only.
            with fabric.no_backward_sync(model, enabled=not is_last):
                loss = loss_fn(arch, model(inputs), targets)
                fabric.backward(loss / accumulate)
            micro += 1
            if not is_last:
                continue
            if clip:
                fabric.clip_gradients(model, optimizer, max_norm=float(clip))
            optimizer.step()
            optimizer.zero_grad()
            if scheduler is not None:
                scheduler.step()
            step += 1
            now = time.perf_counter()
            step_times.append(now - t_step)
            losses.append(loss.item())
            if stats is not None:
                comm_history.append(stats.snapshot())
                stats.reset()
            if step % log_every == 0 or step == max_steps:
                metrics = {"train/loss": losses[-1], "lr": optimizer.param_groups[0]["lr"]}
                if stats is not None:
                    metrics["comm/inter_node_MB"] = comm_history[-1]["inter_node_bytes"] / 1e6
                fabric.log_dict(metrics, step=step)
                fabric.print(
                    f"step {step}/{max_steps}  loss {losses[-1]:.3f}  "
                    + "  ".join(f"{k} {v:.3g}" for k, v in metrics.items() if k != "train/loss")
                )
            if micro % val_every == 0 or step == max_steps:
                val = validate(fabric, model, val_loader, cfg, metric)
                fabric.log_dict(val, step=step)
                fabric.print(f"step {step}  " + "  ".join(f"{k} {v:.3f}" for k, v in val.items()))
                if stats is not None:
                    stats.reset()  # count training collectives only
            t_step = time.perf_counter()
            if step >= max_steps:
                break

    # A sharded checkpoint for MiCS (every rank writes its shards, each shard once).
    state["step"] = step
    checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / f"step{step:06d}.ckpt"
    fabric.save(checkpoint, state)
    fabric.logger.finalize("success")
    times = step_times[1:] or step_times
    tokens_per_step = (
        int(cfg.data.micro_batch_size) * int(cfg.data.seq_len) * accumulate * fabric.world_size
    )
    summary = {
        "optimizer_steps": step,
        "losses": losses,
        "val": val,
        "world_size": fabric.world_size,
        "tokens_per_sec": tokens_per_step * len(times) / sum(times) if times else None,
        "checkpoint": str(checkpoint),
    }
    if comm_history:
        summary["comm"] = mean_snapshot(comm_history)
    if fabric.is_global_zero:
        (Path(cfg.paths.output_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
        first, last = losses[0], sum(losses[-5:]) / len(losses[-5:])
        print(
            f"\nloss {first:.3f} (step 1) -> {last:.3f} (mean of the last 5 steps); "
            + ", ".join(f"{k} {v:.3f}" for k, v in val.items())
            + f"; {summary['tokens_per_sec']:,.0f} tokens/s; checkpoint {checkpoint}"
        )
        if comm_history:
            print(format_summary(summary["comm"], title=f"per optimizer step, mean of {step}"))
    fabric.barrier()
    return summary


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as err:
        print(f"\nConfig error: {err}\n", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
