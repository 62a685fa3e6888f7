"""GPU-only Trainer checks (run with a lent device; CPU CI cannot run them).

    torchrun --standalone --nproc-per-node=<GPUs> tests/gpu/trainer_checks.py

- ``sync_batchnorm``: ``Trainer(sync_batchnorm=True)`` under MiCS matches DDP (torch's
  SyncBatchNorm has no CPU kernels, so CPU tests only see the refusal).
- setup peak memory: ``setup()`` never holds the whole unsharded model on the GPU; the
  peak of allocated memory stays below the model's size when it is sharded over >= 2 GPUs
  (one block at a time is moved and sharded).
- teardown: fit -> test -> fit on one module keeps training the root's parameters on the
  GPU (no ``.cpu()`` behind FSDP's back).

Prints one JSON line per check on rank 0 and exits non-zero on a failed check.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from lightning_mics import MiCSStrategy

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("RANK", "0"))


class BNNet(LightningModule):
    def __init__(self, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU())
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 1)
        self.losses: list[float] = []

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(loss.item())
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data(n: int = 64, width: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, width, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def trainer(strategy, **kwargs) -> Trainer:
    return Trainer(
        strategy=strategy,
        accelerator="gpu",
        devices=WORLD,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().float().cpu()
        for k, v in module.state_dict().items()
    }


def check_sync_batchnorm() -> dict:
    runs = {}
    for name, strategy in (("ddp", "ddp"), ("mics", MiCSStrategy())):
        module = BNNet()
        trainer(strategy, sync_batchnorm=True).fit(module, data())
        runs[name] = (module.losses, state(module))
        converted = any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())
        assert converted, f"{name}: BatchNorm was not converted"
    diff = max((runs["ddp"][1][k] - runs["mics"][1][k]).abs().max().item() for k in runs["ddp"][1])
    return {"check": "sync_batchnorm", "param_diff": diff, "ok": diff <= 1e-4}


class Big(LightningModule):
    """About 400 MB of fp32 parameters in 8 blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(3584, 3584) for _ in range(8))

    def training_step(self, batch, batch_idx):
        x = batch[0]
        for block in self.blocks:
            x = block(x)
        return x.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-6)


class PeakAfterSetup(MiCSStrategy):
    def setup(self, trainer: Trainer) -> None:
        torch.cuda.reset_peak_memory_stats()
        super().setup(trainer)
        torch.cuda.synchronize()
        self.setup_peak = torch.cuda.max_memory_allocated()


def check_setup_peak() -> dict:
    module = Big()
    model_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    block_bytes = model_bytes // 8
    strategy = PeakAfterSetup()
    loader = DataLoader(TensorDataset(torch.randn(8, 3584)), batch_size=2)
    trainer(strategy, max_steps=1).fit(module, loader)
    bound = model_bytes / WORLD + 2 * block_bytes
    return {
        "check": "setup_peak",
        "peak_bytes": strategy.setup_peak,
        "model_bytes": model_bytes,
        "bound": bound,
        "ok": strategy.setup_peak <= bound,
    }


def check_refit() -> dict:
    module = BNNet()
    trainer(MiCSStrategy()).fit(module, data())
    before = state(module)["head.weight"].clone()
    trainer(MiCSStrategy()).test(module, data(16))
    trainer(MiCSStrategy()).fit(module, data())
    after = state(module)
    changed = (after["head.weight"] - before).abs().max().item()
    on_gpu = all(p.device.type == "cuda" for p in module.parameters())
    return {
        "check": "refit",
        "root_changed": changed,
        "on_gpu": on_gpu,
        "ok": changed > 0 and on_gpu,
    }


def main() -> None:
    results = []
    if WORLD >= 2:
        results.append(check_sync_batchnorm())
        results.append(check_setup_peak())
    results.append(check_refit())
    if RANK == 0:
        for r in results:
            print(json.dumps(r), flush=True)
    failed = [r for r in results if not r["ok"]]
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    os._exit(1 if failed else 0)


if __name__ == "__main__":
    main()
