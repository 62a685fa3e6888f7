"""Properties of the plain-PyTorch MiCS API, checked in one launch and reported as numbers.

Run on ``world`` ranks laid out as nodes of ``--ranks-per-node`` ranks with partition
groups of ``--partition-size`` ranks (the test uses 4 ranks = 2 nodes x 2, p = 2, so
R = 2 replicas). Each check builds its own model and mesh:

- ``counts``: collectives per optimizer step of ``s`` micro-steps, per process group, in
  every accumulation mode (counted by wrapping the ``torch.distributed`` functions that
  FSDP2 calls).
- ``memory``: local parameter / gradient / AdamW-state sizes vs the full sizes.
- ``replicas``: differently seeded ranks end up with identical replicas (and do not when
  ``sync_replicas=False``).
- ``meta``: meta-device init is materialised sharded, identical across replicas, trainable.
- ``skip_last``: an accumulation window whose last micro-step has no backward, finished
  with ``flush_pending_gradients``, then a normal window, vs an unsharded reference.
- ``clip``: ``clip_grad_norm_`` vs ``torch.nn.utils.clip_grad_norm_`` on the reference.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

import lightning_mics
from lightning_mics import MiCSConfig, MiCSTopology, apply_mics, micro_step
from recipes.gpt import GPT
from tests.scripts import common

MODES = ("two_hop", "every_micro_step", "last_micro_step_only")


# ------------------------------------------------------------------------------ helpers
def world_max(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def mesh_of(model: nn.Module) -> DeviceMesh:
    return next(model.parameters()).device_mesh


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def spread(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[float, bool]:
    """(max abs difference to the other ranks of ``group``, bitwise equal to all of them)."""
    tensor = tensor.detach().contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor, group=group)
    if tensor.numel() == 0:
        return 0.0, True
    diff = max((g.double() - tensor.double()).abs().max().item() for g in gathered)
    return diff, all(torch.equal(g, tensor) for g in gathered)


def replica_spread(model: nn.Module) -> dict[str, Any]:
    """Differences between replicas: local shards over the replication group, buffers
    over the whole world. Maxima over all ranks."""
    group = mesh_of(model).get_group(lightning_mics.topology.REPLICATE_DIM)
    param_diff, param_equal = 0.0, True
    for param in model.parameters():
        diff, equal = spread(local(param), group)
        param_diff, param_equal = max(param_diff, diff), param_equal and equal
    buffer_diff, buffer_equal = 0.0, True
    for buffer in model.buffers():
        diff, equal = spread(buffer, None)
        buffer_diff, buffer_equal = max(buffer_diff, diff), buffer_equal and equal
    return {
        "param_diff": world_max(param_diff),
        "params_bitwise_equal": world_max(float(not param_equal)) == 0.0,
        "buffer_diff": world_max(buffer_diff),
        "buffers_bitwise_equal": world_max(float(not buffer_equal)) == 0.0,
        "num_buffers": sum(1 for _ in model.buffers()),
    }


def global_batches(world: int, micro_batch: int, accum: int, steps: int) -> list:
    dataset = common.make_dataset(world, micro_batch, accum, steps)
    return list(DataLoader(dataset, batch_size=world * micro_batch))


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def num_fsdp_units(model: nn.Module) -> int:
    return sum(isinstance(m, FSDPModule) for m in model.modules())


# ------------------------------------------------------------------- a. collective counts
_COUNTED = {
    "all_reduce": "all_reduce",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_gather_single": "all_gather",
    "all_gather_into_tensor": "all_gather",
}


@contextmanager
def count_collectives(topology: MiCSTopology) -> Iterator[Counter]:
    """Count ``torch.distributed`` collectives by kind and by process group.

    FSDP2 calls them as attributes of ``torch.distributed`` (``dist.reduce_scatter_single``
    in ``DefaultReduceScatter``, ``dist.all_reduce`` for the HSDP all-reduce,
    ``dist.all_gather_single`` in ``DefaultAllGather``), so wrapping the module attributes
    sees every call. Calls made inside a counted call are not counted again. A group is
    named by its ranks: ``partition`` (this rank's partition group), ``replication``,
    ``world``, else ``other``.

    NOTE: groups are identified by ranks, not by object: a DTensor parameter's
    ``device_mesh`` may be an equal mesh from an earlier ``apply_mics`` call (meshes
    compare by layout), whose process groups are not the ones FSDP uses.
    """
    rank = dist.get_rank()
    names = {
        tuple(topology.partition_groups()[topology.partition_index(rank)]): "partition",
        tuple(topology.replication_groups()[topology.partition_rank(rank)]): "replication",
        tuple(range(topology.world_size)): "world",
    }
    counts: Counter = Counter()
    depth = 0

    def wrap(fn: Callable, kind: str) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal depth
            if depth == 0:
                group = kwargs.get("group")
                ranks = (
                    range(dist.get_world_size())
                    if group is None
                    else dist.get_process_group_ranks(group)
                )
                name = names.get(tuple(ranks), "other")
                counts[f"{kind}:{name}"] += 1
            depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth -= 1

        return counted

    originals = {name: getattr(dist, name) for name in _COUNTED}
    try:
        for name, kind in _COUNTED.items():
            setattr(dist, name, wrap(originals[name], kind))
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def check_counts(topology: MiCSTopology, accum: int, micro_batch: int) -> dict[str, Any]:
    world = topology.world_size
    out: dict[str, Any] = {}
    for mode in MODES:
        model = common.make_model()
        apply_mics(model, topology, MiCSConfig(accumulation=mode))
        opt = common.make_optimizer(model.parameters())
        batches = list(common.make_loader(world, micro_batch, accum, 2))
        windows = []
        for step in range(2):  # step 0 warms up (lazy init), step 1 is the one that counts
            with count_collectives(topology) as counts:
                for m in range(accum):
                    x, y = batches[step * accum + m]
                    with micro_step(model, is_last=m == accum - 1, mode=mode):
                        (GPT.loss(model(x), y) / accum).backward()
                opt.step()
                opt.zero_grad()
            windows.append(dict(counts))
        out[mode] = {
            "counts": windows[1],
            "first_step_counts": windows[0],
            "units": num_fsdp_units(model),
        }
    out["accum"] = accum
    return out


# ------------------------------------------------------------------------------ b. memory
def check_memory(topology: MiCSTopology, micro_batch: int) -> dict[str, Any]:
    """Local numel of parameters, gradients and AdamW state vs the full model's."""
    p = topology.partition_size
    model = common.make_model()
    apply_mics(model, topology)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = next(iter(common.make_loader(topology.world_size, micro_batch, 1, 1)))
    GPT.loss(model(x), y).backward()
    opt.step()

    totals = Counter()
    over_bound = 0  # tensors whose local shard exceeds ceil(dim0 / p) rows
    shard_sums_ok = True  # every param's local numels sum over the partition group to its numel
    shard_group = mesh_of(model).get_group("shard")
    for param in model.parameters():
        full = param.numel()
        bound = math.ceil(param.shape[0] / p) * (full // max(param.shape[0], 1))
        states = [
            local(v)
            for v in opt.state[param].values()
            if isinstance(v, torch.Tensor) and v.shape == param.shape
        ]
        sizes = {
            "param": local(param).numel(),
            "grad": local(param.grad).numel(),
            "state": sum(s.numel() for s in states),
        }
        totals["full_param"] += full
        totals["row_numel"] += full // max(param.shape[0], 1)  # padding is < 1 row per shard
        totals["full_state"] += full * len(states)
        totals["num_params"] += 1
        for key, size in sizes.items():
            totals[f"local_{key}"] += size
        over_bound += sum(
            [sizes["param"] > bound, sizes["grad"] > bound, sizes["state"] > bound * len(states)]
        )
        summed = torch.tensor([sizes["param"]])
        dist.all_reduce(summed, group=shard_group)
        shard_sums_ok &= summed.item() == full
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {**totals, "over_bound": over_bound, "sums_ok": shard_sums_ok})
    return {"partition_size": p, "per_rank": per_rank}


# ---------------------------------------------------------------- c. replicas start equal
def check_replicas(topology: MiCSTopology) -> dict[str, Any]:
    out = {}
    for sync in (True, False):
        torch.manual_seed(dist.get_rank())
        model = GPT(common.TINY)
        model.register_buffer("marker", torch.rand(8))
        apply_mics(model, topology, MiCSConfig(sync_replicas=sync))
        out["sync" if sync else "no_sync"] = replica_spread(model)
    return out


# ----------------------------------------------------------------------------- d. meta init
def check_meta(topology: MiCSTopology, micro_batch: int) -> dict[str, Any]:
    p, rank = topology.partition_size, dist.get_rank()
    torch.manual_seed(rank)
    with torch.device("meta"):
        model = GPT(common.TINY)
    apply_mics(model, topology)
    part_rank = topology.partition_rank(rank)
    wrong_shape, not_finite, meta = 0, 0, 0
    for param in model.parameters():
        t = local(param)
        meta += t.is_meta
        not_finite += not bool(torch.isfinite(t).all())
        chunks = torch.chunk(torch.empty(param.shape, device="meta"), p, dim=0)
        expected = chunks[part_rank].shape if part_rank < len(chunks) else (0, *param.shape[1:])
        wrong_shape += tuple(t.shape) != tuple(expected)
    wte_std = model.transformer.wte.weight.full_tensor().std().item()
    spread_ = replica_spread(model)
    opt = common.make_optimizer(model.parameters())
    losses = []
    for x, y in common.make_loader(topology.world_size, micro_batch, 1, 2):
        loss = GPT.loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(common.mean_over_world(loss.item()))
    return {
        "meta_params": world_max(meta),
        "not_finite_params": world_max(not_finite),
        "wrong_shape_params": world_max(wrong_shape),
        "wte_std": wte_std,
        "replicas": spread_,
        "losses": losses,
        "losses_finite": all(math.isfinite(v) for v in losses),
    }


# -------------------------------------------------------------------- e. skipped micro-step
SKIP_ACCUM = 3


def reference_skip(world: int, micro_batch: int) -> list[dict[str, torch.Tensor]]:
    """Window 1 applies only micro-batches 0 and 1 (2 is skipped), window 2 all of 3-5."""
    model = common.make_model()
    opt = common.make_optimizer(model.parameters())
    batches = global_batches(world, micro_batch, SKIP_ACCUM, 2)
    states = []
    for window in ((0, 1), (3, 4, 5)):
        for i in window:
            x, y = batches[i]
            (GPT.loss(model(x), y) / SKIP_ACCUM).backward()
        opt.step()
        opt.zero_grad()
        states.append(state_of(model))
    return states


def run_skip(
    topology: MiCSTopology, micro_batch: int, mode: str, flush: bool, skipped_forward: bool
) -> dict[str, Any]:
    model = common.make_model()
    apply_mics(model, topology, MiCSConfig(accumulation=mode))
    opt = common.make_optimizer(model.parameters())
    batches = list(common.make_loader(topology.world_size, micro_batch, SKIP_ACCUM, 2))
    states, flushed = [], []
    for window in range(2):
        for m in range(SKIP_ACCUM):
            x, y = batches[window * SKIP_ACCUM + m]
            is_last = m == SKIP_ACCUM - 1
            if window == 0 and is_last:
                # The last micro-step produces no backward (e.g. a training_step that
                # returned None): optionally its forward runs, its backward never does.
                if skipped_forward:
                    GPT.loss(model(x), y)
                continue
            with micro_step(model, is_last=is_last, mode=mode):
                (GPT.loss(model(x), y) / SKIP_ACCUM).backward()
        flushed.append(lightning_mics.flush_pending_gradients(model) if flush else None)
        opt.step()
        opt.zero_grad()
        states.append(common.full_state(model))
    return {"states": states, "flushed": flushed}


def check_skip_last(topology: MiCSTopology, micro_batch: int) -> dict[str, Any]:
    reference = reference_skip(topology.world_size, micro_batch) if dist.get_rank() == 0 else None
    out = {}
    variants = [(mode, True, False) for mode in MODES]
    variants += [(mode, True, True) for mode in ("two_hop", "last_micro_step_only")]
    variants += [("two_hop", False, False)]  # the control: no flush
    for mode, flush, skipped_forward in variants:
        name = (
            f"{mode}{'' if flush else '-no_flush'}{'-skipped_forward' if skipped_forward else ''}"
        )
        result = run_skip(topology, micro_batch, mode, flush, skipped_forward)
        if reference is not None:
            out[name] = {
                "window_diffs": [
                    common.max_abs_diff(s, r)
                    for s, r in zip(result["states"], reference, strict=True)
                ],
                "flushed": result["flushed"],
            }
    return out


# ------------------------------------------------------------------------- f. clipping
CLIP_ACCUM = 2
CLIP_STEPS = 3


def reference_clip(world: int, micro_batch: int, max_norm: float):
    model = common.make_model()
    opt = common.make_optimizer(model.parameters())
    norms = []
    for i, (x, y) in enumerate(global_batches(world, micro_batch, CLIP_ACCUM, CLIP_STEPS)):
        (GPT.loss(model(x), y) / CLIP_ACCUM).backward()
        if (i + 1) % CLIP_ACCUM == 0:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
            opt.step()
            opt.zero_grad()
    return norms, state_of(model)


def check_clip(topology: MiCSTopology, micro_batch: int, max_norm: float) -> dict[str, Any]:
    world = topology.world_size
    model = common.make_model()
    apply_mics(model, topology)
    opt = common.make_optimizer(model.parameters())
    norms = []
    for i, (x, y) in enumerate(common.make_loader(world, micro_batch, CLIP_ACCUM, CLIP_STEPS)):
        is_last = (i + 1) % CLIP_ACCUM == 0
        with micro_step(model, is_last=is_last):
            (GPT.loss(model(x), y) / CLIP_ACCUM).backward()
        if is_last:
            norms.append(lightning_mics.clip_grad_norm_(model.parameters(), max_norm).item())
            opt.step()
            opt.zero_grad()
    norm_spread = max(spread(torch.tensor(norms, dtype=torch.float64), None)[0], 0.0)
    state = common.full_state(model)
    if dist.get_rank() != 0:
        return {}
    ref_norms, ref_state = reference_clip(world, micro_batch, max_norm)
    _, unclipped_state = common.reference_run(world, micro_batch, CLIP_ACCUM, CLIP_STEPS)
    return {
        "max_norm": max_norm,
        "norms": norms,
        "ref_norms": ref_norms,
        "norm_rel_diff": max(abs(a - b) / b for a, b in zip(norms, ref_norms, strict=True)),
        "norm_spread_over_ranks": norm_spread,
        "param_diff": common.max_abs_diff(state, ref_state),
        "param_diff_vs_unclipped": common.max_abs_diff(state, unclipped_state),
    }


def main() -> None:
    p = common.parser()
    p.add_argument("--count-accum", type=int, default=3)
    p.add_argument("--max-norm", type=float, default=0.05)
    args = p.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    topology = MiCSTopology.create(
        world, args.ranks_per_node, common.partition_size(args.partition_size)
    )
    if topology.replication_size < 2:
        raise SystemExit("plain_checks needs at least 2 replicas")
    mb = args.micro_batch
    results = {
        "topology": {
            "world_size": world,
            "ranks_per_node": topology.ranks_per_node,
            "partition_size": topology.partition_size,
            "replication_size": topology.replication_size,
        },
        "counts": check_counts(topology, args.count_accum, mb),
        "memory": check_memory(topology, mb),
        "replicas": check_replicas(topology),
        "meta": check_meta(topology, mb),
        "skip_last": check_skip_last(topology, mb),
        "clip": check_clip(topology, mb, args.max_norm),
    }
    dist.barrier()
    common.report(args.out, **results)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    main()
    common.finish()
