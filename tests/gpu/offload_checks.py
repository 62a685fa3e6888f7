"""``cpu_offload=True`` on GPUs (NCCL): what offload promises, measured.

Two trainings of the same GPT (2 optimizer steps of 2 two-hop micro-steps, AdamW), with
and without offload, one partition over all ranks. Reported per run, for
``tests/gpu/test_gpu.py``: FSDP's offload policy on every parameter group; the devices
(and pinning) of the sharded parameters, their gradients before ``zero_grad`` and the
optimizer state; the CUDA memory still allocated after the last step (relative to before
the model existed; the model and optimizer alive) and the peak during training; the bytes
of this rank's shards and of the largest block; the final unsharded state (for offload vs
no offload parity).

``--device cpu`` runs the same code on gloo without the memory figures (a smoke test of
this script on machines without GPUs; nothing is asserted from it).
"""

from __future__ import annotations

import gc
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lightning_mics import MiCSConfig, MiCSTopology, apply_mics, micro_step
from recipes.gpt import GPT, GPTConfig
from tests.scripts import common

#: ~3.3 M parameters (~13 MB in fp32): large enough that the model states dominate
#: whatever small buffers CUDA keeps.
MODEL = GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=256)
STEPS = 2
ACCUM = 2
BATCH = 4


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + dist.get_rank())
    tokens = torch.randint(0, MODEL.vocab_size, (BATCH, MODEL.block_size + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _allocated(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    gc.collect()
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def run(offload: bool, device: torch.device) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    world = dist.get_world_size()
    start = _allocated(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = GPT(MODEL)  # on the host: FSDP moves (or offloads) the shards
    largest_block = max(
        sum(q.numel() * q.element_size() for q in block.parameters())
        for block in model.transformer.h
    )
    apply_mics(
        model,
        MiCSTopology.create(world, world, world),
        MiCSConfig(cpu_offload=offload),
        device=device,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    grad_devices: list[str] = []
    for step in range(STEPS):
        for micro in range(ACCUM):
            x, y = _batch(step, micro)
            with micro_step(model, is_last=micro == ACCUM - 1):
                (GPT.loss(model(x.to(device)), y.to(device)) / ACCUM).backward()
        grad_devices = [
            _local(p.grad).device.type for p in model.parameters() if p.grad is not None
        ]
        optimizer.step()
        optimizer.zero_grad()
    params = [_local(p) for p in model.parameters()]
    state = [
        v
        for s in optimizer.state.values()
        for k, v in s.items()
        if k != "step" and isinstance(v, torch.Tensor)
    ]
    policies, offload_flags = set(), set()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                policies.add(type(group.offload_policy).__name__)
                offload_flags.update(fp.offload_to_cpu for fp in group.fsdp_params)
    report = {
        "policies": sorted(policies),
        "offload_to_cpu": sorted(offload_flags),
        "param_devices": sorted({p.device.type for p in params}),
        "params_pinned": sorted({p.is_pinned() for p in params}) if offload else [],
        "grad_devices": sorted(set(grad_devices)),
        "num_grads": len(grad_devices),
        "num_params": len(params),
        "optimizer_state_devices": sorted({_local(v).device.type for v in state}),
        "num_optimizer_states": len(state),
        "shard_bytes": sum(p.numel() * p.element_size() for p in params),
        "largest_block_bytes": largest_block,
    }
    del params, state
    # what stays on the compute device between optimizer steps, the model alive
    report["resident_bytes"] = _allocated(device) - start
    report["peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    full = {k: v.cpu() for k, v in common.full_state(model).items()}
    return report, full


def main() -> None:
    p = common.parser()
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = p.parse_args()
    if args.device == "cuda":
        device = common.init_nccl()
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    results: dict[str, Any] = {"world": dist.get_world_size()}
    fulls = {}
    for offload in (True, False):
        results[f"offload={offload}"], fulls[offload] = run(offload, device)
        gc.collect()
    results["offload_vs_plain_param_diff"] = common.max_abs_diff(fulls[True], fulls[False])
    common.report(args.out, **results)
    common.finish()


if __name__ == "__main__":
    main()
