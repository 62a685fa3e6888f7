"""Sharding options through the plain API vs the single-process reference.

Each ``--options`` entry is a Python dict literal of MiCSConfig keyword arguments; all
run in this one launch on 2 emulated nodes x 2 ranks, partition 2 (two replicas), with
two-hop accumulation over ``--accum`` micro-steps. Reported per entry, besides the
differences from the reference:

- ``comms``: the dtype of every buffer FSDP handed to ``torch.distributed`` during the
  micro-steps, per collective (`comm_recorder`): the parameter all-gathers, the gradient
  reduce-scatters and the cross-replica all-reduces;
- ``offload``: what FSDP's offload policy looks like on every FSDP module and parameter
  group, and where the sharded parameters, their gradients (before ``zero_grad``) and the
  optimizer state live.
"""

from __future__ import annotations

import ast
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lightning_mics import MiCSConfig, MiCSTopology, apply_mics, micro_step
from recipes.gpt import GPT
from tests.scripts import common
from tests.scripts.comm_recorder import Recorder


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def offload_report(
    model: nn.Module, optimizer: torch.optim.Optimizer, grad_devices: list[str]
) -> dict[str, Any]:
    policies, offload_to_cpu, pin_memory, groups = set(), set(), set(), 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                groups += 1
                policies.add(type(group.offload_policy).__name__)
                offload_to_cpu.update(fp.offload_to_cpu for fp in group.fsdp_params)
                pin_memory.update(fp.pin_memory for fp in group.fsdp_params)
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    params = list(model.parameters())
    return {
        "param_groups": groups,
        "policies": sorted(policies),
        "offload_to_cpu": sorted(offload_to_cpu),
        "pin_memory": sorted(pin_memory),
        "param_devices": sorted({_local(p).device.type for p in params}),
        "num_params": len(params),
        "grad_devices": sorted(set(grad_devices)),
        "num_grads": len(grad_devices),
        "optimizer_state_devices": sorted({_local(v).device.type for v in state}),
        "num_optimizer_states": len(state),
    }


def main() -> None:
    p = common.parser()
    p.add_argument("--options", nargs="+", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    recorder = Recorder(kinds=("all_gather", "reduce_scatter", "all_reduce"))
    results = {}
    for text in args.options:
        options = ast.literal_eval(text)
        model = common.make_model()
        apply_mics(model, MiCSTopology.create(world, 2, 2), MiCSConfig(**options))
        optimizer = common.make_optimizer(model.parameters())
        recorder.ops.clear()
        losses, grad_devices = [], []
        loader = common.make_loader(world, args.micro_batch, args.accum, args.steps)
        for i, (x, y) in enumerate(loader):
            is_last = (i + 1) % args.accum == 0
            with recorder.recording(), micro_step(model, is_last=is_last):
                loss = GPT.loss(model(x), y)
                (loss / args.accum).backward()
            losses.append(common.mean_over_world(loss.item()))
            if is_last:
                grad_devices = [
                    _local(q.grad).device.type for q in model.parameters() if q.grad is not None
                ]
                optimizer.step()
                optimizer.zero_grad()
        results[text] = {
            **common.compare_with_reference(
                losses, common.full_state(model), world, args.micro_batch, args.accum, args.steps
            ),
            "comms": recorder.dtypes(),
            "offload": offload_report(model, optimizer, grad_devices),
        }
    common.report(args.out, **results)
    common.finish()


if __name__ == "__main__":
    main()
