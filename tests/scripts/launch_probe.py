"""A Trainer callback the launch tests add to ``recipes/train.py`` through Hydra:

    +callbacks.launch_probe._target_=tests.scripts.launch_probe.LaunchProbe
    +callbacks.launch_probe.out_dir=/tmp/x +callbacks.launch_probe.hold_at_step=2

Every rank writes what it saw to ``out_dir`` as JSON: at train start (its cluster
environment, ranks, node, world, MiCS layout, the global step it starts from, the run
directory) and at train end (the global step reached). In a first start (no
``SLURM_RESTART_COUNT``) it holds every rank once ``global_step`` reaches
``hold_at_step``: it writes ``ready_rank<r>`` and waits for the file ``go``, which the test
writes after sending the requeue signal, so the signal always lands mid-run, between two
batches, whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

HOLD_TIMEOUT_S = 300


class LaunchProbe(Callback):
    def __init__(self, out_dir: str, hold_at_step: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.hold_at_step = hold_at_step
        self._held = False
        self.restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))

    def _write(self, name: str, data: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(data))
        tmp.replace(self.out_dir / name)

    def on_train_start(self, trainer, pl_module) -> None:
        strategy = trainer.strategy
        env = strategy.cluster_environment
        # NOTE: the MiCS runtime's layout; None for other strategies.
        topology = getattr(getattr(strategy, "mics", None), "topology", None)
        self._write(
            f"start{self.restart}_rank{trainer.global_rank}.json",
            {
                "cluster_environment": type(env).__name__,
                "strategy": type(strategy).__name__,
                "global_rank": trainer.global_rank,
                "local_rank": trainer.local_rank,
                "node_rank": trainer.node_rank,
                "world_size": trainer.world_size,
                "num_nodes": trainer.num_nodes,
                "num_devices": trainer.num_devices,
                "main_port": env.main_port if env is not None else None,
                "partition_size": getattr(topology, "partition_size", None),
                "ranks_per_node": getattr(topology, "ranks_per_node", None),
                "replication_size": getattr(topology, "replication_size", None),
                "global_step": trainer.global_step,
                # NOTE: a sharded parameter (DTensor) counts its full size.
                "parameters": sum(p.numel() for p in pl_module.parameters()),
                "default_root_dir": str(Path(trainer.default_root_dir).resolve()),
                "ckpt_path": trainer.ckpt_path,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "pid": os.getpid(),
            },
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.restart or self._held or self.hold_at_step is None:
            return
        if trainer.global_step < self.hold_at_step:
            return
        self._held = True
        rank = trainer.global_rank
        self._write(f"ready_rank{rank}", {"global_step": trainer.global_step, "pid": os.getpid()})
        deadline = time.monotonic() + HOLD_TIMEOUT_S
        while not (self.out_dir / "go").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {rank}: no 'go' from the test in {HOLD_TIMEOUT_S} s")
            time.sleep(0.05)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(
            f"end{self.restart}_rank{trainer.global_rank}.json",
            {"global_step": trainer.global_step},
        )
