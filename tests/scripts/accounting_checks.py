"""Communication accounting (`lightning_mics.accounting`) on 4 ranks = 2 nodes x 2 ranks.

One launch, reported as numbers for ``tests/test_accounting.py`` to check:

- ``plain``: the plain API with accumulation over ``--accum`` micro-steps, 2 optimizer
  steps per configuration; each step's `CommStats` snapshot from every rank, and the
  collectives ``torch.distributed`` itself saw in the same step (an independent count,
  by wrapping its functions).
- ``numerics``: parity with the single-process reference, and bitwise equality of the
  trained parameters with and without ``comm_stats``.
- ``trainer``: a Trainer fit with `CommStatsMonitor` and a CSVLogger; the rows it wrote.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

import lightning_mics
from lightning_mics import CommStatsMonitor, MiCSConfig, MiCSStrategy, MiCSTopology, apply_mics
from lightning_mics.accounting import comm_stats
from recipes.gpt import GPT, GPTConfig
from tests.scripts import common
from tests.scripts.lit import LitGPT
from tests.scripts.plain_checks import count_collectives

RANKS_PER_NODE = 2
# name -> (partition size, accumulation mode, reshard_after_forward)
PLAIN = {
    "p2-two_hop": (2, "two_hop", True),
    "p2-every_micro_step": (2, "every_micro_step", True),
    "p2-last_micro_step_only": (2, "last_micro_step_only", True),
    "p4-two_hop": (4, "two_hop", True),
    "p4-two_hop-rafw2": (4, "two_hop", 2),
}
STEPS = 2
TRAINER_ACCUM = 2
#: The model of the plain checks: like common.TINY, but with a vocabulary (the first dim
#: of the embedding and of the head) that 2 and 4 do not divide, so that FSDP pads.
PADDED = dataclasses.replace(common.TINY, vocab_size=common.TINY.vocab_size + 1)


def all_ranks(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train_plain(
    topology: MiCSTopology,
    config: MiCSConfig,
    accum: int,
    micro_batch: int,
    model_config: GPTConfig = common.TINY,
) -> tuple[list[dict], list[dict], torch.nn.Module, list[float]]:
    torch.manual_seed(0)
    model = GPT(model_config)
    apply_mics(model, topology, config)
    stats = comm_stats(model) if config.comm_stats else None
    opt = common.make_optimizer(model.parameters())
    loader = list(common.make_loader(topology.world_size, micro_batch, accum, STEPS))
    snapshots, seen, losses = [], [], []
    if stats is not None:
        stats.reset()  # count from the first step on (sync_replicas only broadcasts anyway)
    for step in range(STEPS):
        with count_collectives(topology) as counts:
            for m in range(accum):
                x, y = loader[step * accum + m]
                with lightning_mics.micro_step(
                    model, is_last=m == accum - 1, mode=config.accumulation
                ):
                    loss = GPT.loss(model(x), y)
                    (loss / accum).backward()
                losses.append(loss.item())
            opt.step()
            opt.zero_grad()
        seen.append(dict(counts))
        if stats is not None:
            snapshots.append(stats.snapshot())
            stats.reset()
    # NOTE: averaged outside the counted steps, whose collectives must all be FSDP's.
    return snapshots, seen, model, [common.mean_over_world(v) for v in losses]


def check_plain(accum: int, micro_batch: int) -> dict[str, Any]:
    world = dist.get_world_size()
    out: dict[str, Any] = {}
    for name, (p, mode, rafw) in PLAIN.items():
        topology = MiCSTopology.create(world, RANKS_PER_NODE, p)
        # NOTE: flat collectives: the expected figures below are the flat path's
        # (hierarchical accounting is tested in tests/test_hierarchical.py).
        config = MiCSConfig(accumulation=mode, reshard_after_forward=rafw, hierarchical=False)
        snapshots, seen, _, _ = train_plain(topology, config, accum, micro_batch, PADDED)
        out[name] = {
            "partition_size": p,
            "mode": mode,
            "snapshots": all_ranks(snapshots),  # [rank][step]
            "dist_counts": all_ranks(seen),  # [rank][step]
        }
    return out


def check_numerics(accum: int, micro_batch: int) -> dict[str, Any]:
    world = dist.get_world_size()
    out = {}
    for p in (2, 4):
        topology = MiCSTopology.create(world, RANKS_PER_NODE, p)
        states = {}
        for on in (True, False):
            _, _, model, losses = train_plain(
                topology, MiCSConfig(comm_stats=on), accum, micro_batch
            )
            states[on] = common.full_state(model)
            if on:
                out[f"p{p}"] = common.compare_with_reference(
                    losses, states[on], world, micro_batch, accum, STEPS
                )
        if dist.get_rank() == 0:
            out[f"p{p}"]["bitwise_equal_without_stats"] = all(
                torch.equal(states[True][k], states[False][k]) for k in states[True]
            )
            no_stats = lightning_mics.accounting.find_comm_stats(model)
            out[f"p{p}"]["stats_found_when_off"] = no_stats is not None
    return out


def check_trainer(accum: int, micro_batch: int, log_dir: Path) -> dict[str, Any]:
    world = dist.get_world_size()
    monitor = CommStatsMonitor(prog_bar=True)
    trainer = Trainer(
        strategy=MiCSStrategy(partition_size=2, ranks_per_node=RANKS_PER_NODE),
        accelerator="cpu",
        devices=world,
        max_epochs=1,
        accumulate_grad_batches=accum,
        logger=CSVLogger(str(log_dir), name="acc", version=0),
        callbacks=[monitor],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(LitGPT(), common.make_loader(world, micro_batch, accum, STEPS))
    dist.barrier()
    rows = []
    if dist.get_rank() == 0:
        with open(log_dir / "acc" / "version_0" / "metrics.csv") as f:
            rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return {
        "global_step": trainer.global_step,
        "rows": rows,
        "history": all_ranks(monitor.history),
        "summary": monitor.summary(),
        "progress_bar_keys": sorted(trainer.progress_bar_metrics),
    }


def main() -> None:
    args = common.parser().parse_args()
    accum, mb = args.accum, args.micro_batch
    results = {
        "accum": accum,
        "plain": check_plain(accum, mb),
        "numerics": check_numerics(accum, mb),
        "trainer": check_trainer(TRAINER_ACCUM, mb, Path(args.out).parent / "logs"),
    }
    common.report(args.out, **results)


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    main()
    common.finish()
