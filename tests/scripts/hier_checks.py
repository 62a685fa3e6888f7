"""Hierarchical collectives (`lightning_mics.collectives`) on 8 ranks, one launch.

Two emulated layouts: ``n2k4p8`` = 2 nodes x 4 ranks, partition 8 (1 replica), and
``n4k2p4`` = 4 nodes x 2 ranks, partition 4 (2 replicas). Reported for
``tests/test_hierarchical.py`` to check:

- ``unit``: the comm objects called directly on FSDP-shaped buffers (uint8, bf16, fp32;
  padding; empty trailing shards; empty chunks), against the flat collectives;
- ``train``: training runs of the tiny GPT with a padded vocabulary, 2 micro-steps per
  optimizer step: flat vs hierarchical all-gather only (bitwise, fp32 and bf16 compute),
  flat vs fully hierarchical (all-gather + reduce-scatter; tolerance), fully
  hierarchical vs the single-process reference, per-step `CommStats` snapshots;
- ``rafw``: an int ``reshard_after_forward`` (the backward all-gather falls back flat);
- ``errors``: ``hierarchical=True`` where it is impossible.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from lightning_mics import MiCSConfig, MiCSTopology, apply_mics, collectives, micro_step
from lightning_mics import topology as layout_rules
from lightning_mics.accounting import comm_stats
from lightning_mics.collectives import HierarchicalAllGather, HierarchicalReduceScatter
from lightning_mics.process_groups import get_device_mesh, get_hierarchical_groups
from lightning_mics.topology import MiCSTopologyError
from recipes.gpt import GPT
from tests.scripts import common

# name -> (ranks per node, partition size)
LAYOUTS = {"n2k4p8": (4, 8), "n4k2p4": (2, 4)}
ACCUM = 2
STEPS = 3
MICRO_BATCH = 2
RAFW = 4
#: Like common.TINY with a vocabulary (first dim of the embedding and the head) that
#: neither 4 nor 8 divides, so that FSDP pads.
PADDED = dataclasses.replace(common.TINY, vocab_size=common.TINY.vocab_size + 1)
CPU = torch.device("cpu")


class CountingStagedWork(collectives.StagedWork):
    """`StagedWork` that counts its instances: asynchronous hierarchical all-gathers."""

    created = 0

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        CountingStagedWork.created += 1


@contextlib.contextmanager
def intra_stage(variant: str) -> Iterator[None]:
    """Run hierarchical collectives with their intra-node stage ``"batched"`` (one
    collective, whatever the size) or ``"per_node"`` (one per node, whatever the size)."""
    saved = layout_rules.BATCHED_INTRA_STAGE_MAX_BYTES
    layout_rules.BATCHED_INTRA_STAGE_MAX_BYTES = {"batched": float("inf"), "per_node": -1}[variant]
    try:
        yield
    finally:
        layout_rules.BATCHED_INTRA_STAGE_MAX_BYTES = saved


class CallLog:
    """A stand-in `CommStats`: the (kind, group size) of every recorded collective."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def record(self, kind: str, nbytes: int, group: dist.ProcessGroup) -> None:
        self.calls.append((kind, group.size()))


def all_ranks(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------- unit checks
def _shard_buffers(
    rows: int, cols: int, p: int, prank: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FSDP-shaped all-gather buffers for one ``rows x cols`` parameter.

    Returns (the full padded tensor every rank should end up with, this rank's output
    buffer, its input view into it). Dim 0 is padded to a multiple of ``p``; padding rows
    hold rank-specific garbage, which must be gathered faithfully too. With ``rows < p``
    the trailing ranks' shards are all padding (empty shards).
    """
    chunk_rows = -(-rows // p) if rows else 0
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(p * chunk_rows, cols, generator=gen)
    full[rows:] = torch.arange(p).repeat_interleave(chunk_rows)[rows:, None] + 100.0
    if dtype == torch.uint8:
        full_flat = full.reshape(-1).view(torch.uint8)  # 4 bytes per fp32 element
    else:
        full_flat = full.to(dtype).reshape(-1)
    c = full_flat.numel() // p
    output = torch.full_like(full_flat, 7)  # stale contents that must be overwritten
    inp = output.narrow(0, prank * c, c)
    inp.copy_(full_flat[prank * c : (prank + 1) * c])
    return full_flat, output, inp


def _check_variant(
    out: dict[str, Any],
    variant: str,
    topology: MiCSTopology,
    group: dist.ProcessGroup,
    groups: Any,
) -> None:
    """Unit checks of one intra-node stage variant, into ``out[...]["<variant>/<case>"]``."""
    rank = dist.get_rank()
    p = topology.partition_size
    prank = topology.partition_rank(rank)
    ag, rs = HierarchicalAllGather(groups), HierarchicalReduceScatter(groups)
    log = CallLog()
    ag.attach_stats(log)
    rs.attach_stats(log)
    shapes = [(3, 5), (13, 2), (2 * p, 3), (0, 4)]  # empty trailing shards, padding, exact, empty
    for dtype in (torch.uint8, torch.bfloat16, torch.float32):
        for rows, cols in shapes:
            key = f"{variant}/{str(dtype).removeprefix('torch.')}-{rows}x{cols}"
            full, output, inp = _shard_buffers(rows, cols, p, prank, dtype, seed=rows * 31 + cols)
            flat = torch.full_like(full, 9)
            dist.all_gather_single(flat, full[prank * inp.numel() :][: inp.numel()], group=group)
            log.calls.clear()
            returned = ag(output, inp, group)
            out["all_gather"][key] = {
                "equal_expected": bool(torch.equal(output, full)),
                "equal_flat": bool(torch.equal(output, flat)),
                "returned_none": returned is None,
                "dtype": str(output.dtype),
                "numel": output.numel(),
                "calls": list(log.calls),
            }
            # asynchronous: stage 1 in flight, the output untouched until wait()
            _, output, inp = _shard_buffers(rows, cols, p, prank, dtype, seed=rows * 31 + cols)
            before = output.clone()
            work = ag(output, inp, group, async_op=True)
            untouched = bool(torch.equal(output, before))
            if work is not None:
                work.wait()
                work.wait()  # a second wait is a no-op
            out["all_gather_async"][key] = {
                "work": "StagedWork" if isinstance(work, collectives.StagedWork) else repr(work),
                "untouched_before_wait": untouched,
                "equal_expected": bool(torch.equal(output, full)),
                "completed": work is None or work.is_completed(),
            }
    # reduce-scatter: random inputs per rank, SUM and AVG, against the flat collective
    for dtype in (torch.float32, torch.bfloat16):
        for chunk in (5, 0):
            gen = torch.Generator().manual_seed(1000 + rank)
            inp = torch.randn(p * chunk, generator=gen).to(dtype)
            for op_name, op in (("sum", dist.ReduceOp.SUM), ("avg", dist.ReduceOp.AVG)):
                hier = torch.full((chunk,), 3.0, dtype=dtype)
                log.calls.clear()
                returned = rs(hier, inp.clone(), group, op)
                calls = list(log.calls)
                flat = torch.empty(chunk, dtype=dtype)
                # gloo has no AVG: the flat reference sums, then divides
                dist.reduce_scatter_single(flat, inp.clone(), op=dist.ReduceOp.SUM, group=group)
                if op_name == "avg":
                    flat = flat / p
                # exact sum in float64 of the partition's inputs, an absolute reference
                all_inputs = [torch.empty_like(inp) for _ in range(dist.get_world_size())]
                dist.all_gather(all_inputs, inp)
                members = topology.partition_groups()[topology.partition_index(rank)]
                exact = sum(all_inputs[r].double() for r in members).reshape(p, chunk)[prank]
                if op_name == "avg":
                    exact = exact / p
                key = f"{variant}/{str(dtype).removeprefix('torch.')}-c{chunk}-{op_name}"
                out["reduce_scatter"][key] = {
                    "max_diff_flat": (hier.double() - flat.double()).abs().max().item()
                    if chunk
                    else 0.0,
                    "max_err_hier": (hier.double() - exact).abs().max().item() if chunk else 0.0,
                    "max_err_flat": (flat.double() - exact).abs().max().item() if chunk else 0.0,
                    "returned_none": returned is None,
                    "calls": calls,
                }


def check_comms(topology: MiCSTopology) -> dict[str, Any]:
    group = get_device_mesh(topology, CPU).get_group("shard")  # the partition group
    groups = get_hierarchical_groups(topology)
    out: dict[str, Any] = {"all_gather": {}, "all_gather_async": {}, "reduce_scatter": {}}
    for variant in ("batched", "per_node"):
        with intra_stage(variant):
            _check_variant(out, variant, topology, group, groups)
    ag = HierarchicalAllGather(groups)
    # a group other than the partition group (an int reshard_after_forward's) runs flat
    sub = groups.intra
    k = topology.ranks_per_node
    full, output, inp = _shard_buffers(5, 3, k, dist.get_rank(sub), torch.float32, seed=5)
    work = ag(output, inp, sub)
    if work is not None:
        work.wait()
    out["fallback"] = {
        "equal_expected": bool(torch.equal(output, full)),
        "flat_calls": ag.flat_calls,
    }
    return out


# ----------------------------------------------------------------------- training
def _install_all_gather_only(model: torch.nn.Module, topology: MiCSTopology) -> None:
    ag = HierarchicalAllGather(get_hierarchical_groups(topology))
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(ag)


def _installed_comms(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    ags, rss = set(), set()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                ag, rs = group._all_gather_comm, group._reduce_scatter_comm
                ags.add(type(getattr(ag, "inner", None) or ag).__name__)
                rss.add(type(getattr(rs, "inner", None) or rs).__name__)
    return ags, rss


def train(
    topology: MiCSTopology,
    config: MiCSConfig,
    *,
    all_gather_only: bool = False,
    intra: str | None = None,
) -> dict[str, Any]:
    """Train; ``intra`` forces the intra-node stage variant (see `intra_stage`)."""
    if intra is not None:
        with intra_stage(intra):
            return train(topology, config, all_gather_only=all_gather_only)
    world = topology.world_size
    model = common.make_model()
    apply_mics(model, topology, config)
    if all_gather_only:
        _install_all_gather_only(model, topology)
    stats = comm_stats(model) if config.comm_stats else None
    if stats is not None:
        stats.reset()  # sync_replicas broadcast at setup; count the steps only
    opt = common.make_optimizer(model.parameters())
    staged_before = CountingStagedWork.created
    losses, snapshots = [], []
    for i, (x, y) in enumerate(common.make_loader(world, MICRO_BATCH, ACCUM, STEPS)):
        is_last = (i + 1) % ACCUM == 0
        with micro_step(model, is_last=is_last, mode=config.accumulation):
            loss = GPT.loss(model(x), y)
            (loss / ACCUM).backward()
        losses.append(loss.item())
        if is_last:
            opt.step()
            opt.zero_grad()
            if stats is not None:
                snapshots.append(stats.snapshot())
                stats.reset()
    ags, rss = _installed_comms(model)
    flat_calls = 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                inner = getattr(group._all_gather_comm, "inner", None) or group._all_gather_comm
                flat_calls = max(flat_calls, getattr(inner, "flat_calls", 0))
    return {
        "losses": [common.mean_over_world(v) for v in losses],
        "state": common.full_state(model),
        "snapshots": all_ranks(snapshots),
        "all_gather_comms": sorted(ags),
        "reduce_scatter_comms": sorted(rss),
        "flat_calls": flat_calls,
        "async_all_gathers": CountingStagedWork.created - staged_before,
    }


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_training(topology: MiCSTopology) -> dict[str, Any]:
    world = topology.world_size
    runs = {
        "flat": MiCSConfig(hierarchical=False),
        "hier_ag": MiCSConfig(hierarchical=False, comm_stats=False),
        "flat_bf16": MiCSConfig(hierarchical=False, param_dtype="bf16", comm_stats=False),
        "hier_ag_bf16": MiCSConfig(hierarchical=False, param_dtype="bf16", comm_stats=False),
        "hier": MiCSConfig(),  # "auto": on, since partitions span nodes
        "flat_prefetch": MiCSConfig(hierarchical=False, forward_prefetch=True),
        "hier_prefetch": MiCSConfig(forward_prefetch=True),
        "hier_per_node": MiCSConfig(),
        "hier_prefetch_ac": MiCSConfig(forward_prefetch=True, activation_checkpointing=True),
    }
    results = {}
    for name, config in runs.items():
        results[name] = train(
            topology,
            config,
            all_gather_only=name.startswith("hier_ag"),
            intra="per_node" if name == "hier_per_node" else None,
        )
    out: dict[str, Any] = {}
    if dist.get_rank() == 0:
        flat, hier = results["flat"], results["hier"]
        out = {
            "bitwise_hier_all_gather_fp32": bitwise_equal(
                results["hier_ag"]["state"], flat["state"]
            )
            and results["hier_ag"]["losses"] == flat["losses"],
            "bitwise_hier_all_gather_bf16": bitwise_equal(
                results["hier_ag_bf16"]["state"], results["flat_bf16"]["state"]
            )
            and results["hier_ag_bf16"]["losses"] == results["flat_bf16"]["losses"],
            "bf16_differs_from_fp32": not bitwise_equal(
                results["flat_bf16"]["state"], flat["state"]
            ),
            "hier_vs_flat_param_diff": common.max_abs_diff(hier["state"], flat["state"]),
            "hier_vs_flat_loss_diff": max(
                abs(a - b) for a, b in zip(hier["losses"], flat["losses"], strict=True)
            ),
            "per_node_vs_batched_param_diff": common.max_abs_diff(
                results["hier_per_node"]["state"], hier["state"]
            ),
            "per_node_vs_batched_loss_diff": max(
                abs(a - b)
                for a, b in zip(results["hier_per_node"]["losses"], hier["losses"], strict=True)
            ),
            "per_node_snapshots": results["hier_per_node"]["snapshots"],
            # recomputation in backward re-runs forward hooks: prefetching must cope
            "prefetch_ac_vs_hier_param_diff": common.max_abs_diff(
                results["hier_prefetch_ac"]["state"], hier["state"]
            ),
            "reference": common.compare_with_reference(
                hier["losses"], hier["state"], world, MICRO_BATCH, ACCUM, STEPS
            ),
            # asynchronous unshard changes when collectives run, not what they compute
            "bitwise_prefetch": {
                name: bitwise_equal(results[f"{name}_prefetch"]["state"], results[name]["state"])
                and results[f"{name}_prefetch"]["losses"] == results[name]["losses"]
                and results[f"{name}_prefetch"]["snapshots"] == results[name]["snapshots"]
                for name in ("flat", "hier")
            },
            "async_all_gathers": {name: r["async_all_gathers"] for name, r in results.items()},
            "flat_snapshots": flat["snapshots"],
            "hier_snapshots": hier["snapshots"],
            "comms": {
                name: [r["all_gather_comms"], r["reduce_scatter_comms"]]
                for name, r in results.items()
            },
        }
    else:
        common.compare_with_reference([], {}, world, MICRO_BATCH, ACCUM, STEPS)
    return out


def check_rafw(topology: MiCSTopology) -> dict[str, Any]:
    result = train(topology, MiCSConfig(hierarchical=True, reshard_after_forward=RAFW))
    prefetch = train(
        topology,
        MiCSConfig(hierarchical=True, reshard_after_forward=RAFW, forward_prefetch=True),
    )
    ref = common.compare_with_reference(
        result["losses"], result["state"], topology.world_size, MICRO_BATCH, ACCUM, STEPS
    )
    return {
        **ref,
        "flat_calls": all_ranks(result["flat_calls"]),
        # the post-forward group's flat all-gather runs asynchronously too
        "prefetch_bitwise": bitwise_equal(prefetch["state"], result["state"])
        and prefetch["losses"] == result["losses"],
        "comms": [result["all_gather_comms"], result["reduce_scatter_comms"]],
        "snapshots": result["snapshots"],
    }


def check_errors(world: int) -> dict[str, str]:
    out = {}
    cases = {
        # partition = one node: nothing to split
        "inside_node": (MiCSTopology.create(world, 4, 4), MiCSConfig(hierarchical=True)),
        # a ready-made mesh and no ranks_per_node: the nodes are unknown
        "unknown_nodes": (
            get_device_mesh(MiCSTopology.create(world, 4, 8), CPU),
            MiCSConfig(hierarchical=True),
        ),
    }
    for name, (layout, config) in cases.items():
        model = common.make_model()
        try:
            apply_mics(model, layout, config)
            out[name] = "no error"
        except MiCSTopologyError as err:
            out[name] = str(err)
        # the error comes before the model is touched
        out[f"{name}_left_unsharded"] = not any(isinstance(m, FSDPModule) for m in model.modules())
    # "auto" with the same ready-made mesh stays flat (no error, no sub-groups needed)
    model = apply_mics(common.make_model(), cases["unknown_nodes"][0], MiCSConfig())
    out["auto_unknown_nodes_comms"] = str(_installed_comms(model))
    # "auto" with a ready-made mesh and ranks_per_node: hierarchical
    model = apply_mics(common.make_model(), cases["unknown_nodes"][0], MiCSConfig(ranks_per_node=4))
    out["auto_mesh_with_ranks_per_node_comms"] = str(_installed_comms(model))
    return out


def main() -> None:
    args = common.parser().parse_args()
    world = dist.get_world_size()
    results: dict[str, Any] = {"world": world}
    for name, (k, p) in LAYOUTS.items():
        topology = MiCSTopology.create(world, k, p)
        results.setdefault("unit", {})[name] = all_ranks(check_comms(topology))
        results.setdefault("train", {})[name] = check_training(topology)
    results["rafw"] = check_rafw(MiCSTopology.create(world, 4, 8))
    results["errors"] = check_errors(world)
    common.report(args.out, **results)
    common.finish()


if __name__ == "__main__":
    # NOTE: every model here, the shared reference run's included, is built by
    # `common.make_model()` = `GPT(common.TINY)`; point it at the padded model (only when
    # run as a script: tests import this module for its constants).
    common.TINY = PADDED
    collectives.StagedWork = CountingStagedWork  # looked up by the all-gather at call time
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    main()
