"""Hierarchical all-gather / reduce-scatter (`lightning_mics.collectives`).

One launch of ``tests/scripts/hier_checks.py`` on 8 ranks, in two emulated layouts:
2 nodes x 4 ranks with partition 8, and 4 nodes x 2 ranks with partition 4 (2 replicas).
Expected communication volumes are computed here from the parameter sizes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_mics import MiCSConfig, MiCSTopology, MiCSTopologyError
from lightning_mics.collectives import _stage_ops
from lightning_mics.topology import (
    BATCHED_INTRA_STAGE_MAX_BYTES,
    check_hierarchical,
    inter_node_groups,
    intra_node_groups,
)
from recipes.gpt import GPT
from tests.launch import run_script
from tests.scripts.hier_checks import ACCUM, LAYOUTS, PADDED, RAFW, STEPS

WORLD = 8
TOL = 1e-5
FP32 = 4


@pytest.fixture(scope="module")
def report():
    return run_script("hier_checks.py", WORLD, timeout=600)


# ---------------------------------------------------------------- expected values
def padded_numel(param: nn.Parameter, group_size: int) -> int:
    rows = param.shape[0]
    return math.ceil(rows / group_size) * group_size * (param.numel() // rows)


def unit_numels(group_size: int) -> tuple[int, list[int]]:
    """Padded unsharded numel of the root unit and of each block unit of the model."""
    with torch.device("meta"):
        model = GPT(PADDED)
    in_blocks = {id(q) for block in model.transformer.h for q in block.parameters()}
    root = sum(padded_numel(q, group_size) for q in model.parameters() if id(q) not in in_blocks)
    blocks = [sum(padded_numel(q, group_size) for q in b.parameters()) for b in model.transformer.h]
    return root, blocks


def flat_volumes(p: int) -> tuple[int, int]:
    """Logical bytes per optimizer step of the flat all-gathers and reduce-scatters:
    every unit gathered in each forward, the blocks again in each backward; every unit
    reduce-scattered each micro-step (two_hop)."""
    root, blocks = unit_numels(p)
    all_gather = ACCUM * (root + 2 * sum(blocks)) * FP32
    reduce_scatter = ACCUM * (root + sum(blocks)) * FP32
    return all_gather, reduce_scatter


# ------------------------------------------------------------------- unit checks
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_all_gather_is_bitwise_the_flat_one(report, layout):
    per_rank = report["unit"][layout]
    assert len(per_rank) == WORLD
    k, p = LAYOUTS[layout]
    n = p // k
    for rank, result in enumerate(per_rank):
        checks = result["all_gather"]
        assert {tuple(key.split("-")[0].split("/")) for key in checks} == {
            (variant, dtype)
            for variant in ("batched", "per_node")
            for dtype in ("uint8", "bfloat16", "float32")
        }
        for key, check in checks.items():
            assert check["equal_expected"] and check["equal_flat"], (layout, rank, key, check)
            assert check["returned_none"], (layout, rank, key)
            # one inter-node collective (n ranks), then one or n intra-node ones (k ranks)
            if not key.endswith("-0x4"):
                intra = 1 if key.startswith("batched/") else n
                assert check["calls"] == [["all_gather", n]] + [["all_gather", k]] * intra
        # the uint8 buffers really are bytes (4 per fp32 element)
        assert checks["batched/uint8-3x5"]["dtype"] == "torch.uint8"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_async_all_gather_defers_the_intra_node_stage_to_wait(report, layout):
    for rank, result in enumerate(report["unit"][layout]):
        for key, check in result["all_gather_async"].items():
            if key.endswith("-0x4"):  # nothing to gather: nothing issued, nothing to wait on
                assert check["work"] == "None", (layout, rank, key)
                continue
            assert check["work"] == "StagedWork", (layout, rank, key)
            # stage 1 writes a temporary, stage 2 (in wait) the output
            assert check["untouched_before_wait"], (layout, rank, key)
            assert check["equal_expected"] and check["completed"], (layout, rank, key)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reduce_scatter_matches_the_flat_one(report, layout):
    k, p = LAYOUTS[layout]
    n = p // k
    for rank, result in enumerate(report["unit"][layout]):
        for key, check in result["reduce_scatter"].items():
            assert check["returned_none"], (layout, rank, key)
            if not key.endswith(("-c0-sum", "-c0-avg")):
                intra = 1 if key.startswith("batched/") else n
                assert check["calls"] == [["reduce_scatter", k]] * intra + [["reduce_scatter", n]]
            if "/float32" in key:
                # fp32: only the grouping of the additions differs
                assert check["max_diff_flat"] <= 1e-6, (layout, rank, key, check)
                assert check["max_err_hier"] <= 1e-6, (layout, rank, key, check)
            else:
                # bf16 sums of <= 8 standard normals: within an ulp (1/16) at magnitude 8
                assert check["max_err_hier"] <= 1 / 16, (layout, rank, key, check)
            if "-c0-" in key:
                assert check["max_diff_flat"] == 0.0


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_other_groups_fall_back_to_the_flat_all_gather(report, layout):
    for result in report["unit"][layout]:
        assert result["fallback"] == {"equal_expected": True, "flat_calls": 1}


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_with_hierarchical_all_gather_is_bitwise_flat(report, layout):
    train = report["train"][layout]
    assert train["comms"]["hier_ag"][0] == ["HierarchicalAllGather"]
    assert train["bitwise_hier_all_gather_fp32"]
    assert train["bitwise_hier_all_gather_bf16"]
    assert train["bf16_differs_from_fp32"]  # the bf16 runs really computed in bf16


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hierarchical_training_matches_flat_and_reference(report, layout):
    train = report["train"][layout]
    # "auto" turned both comms on: the partitions span nodes
    assert train["comms"]["hier"] == [["HierarchicalAllGather"], ["HierarchicalReduceScatter"]]
    assert train["comms"]["flat"] == [["RecordingAllGather"], ["RecordingReduceScatter"]]
    assert train["hier_vs_flat_param_diff"] <= TOL
    assert train["hier_vs_flat_loss_diff"] <= TOL
    # the two intra-node stage variants group the same sums the same way up to gloo
    assert train["per_node_vs_batched_param_diff"] <= TOL
    assert train["per_node_vs_batched_loss_diff"] <= TOL
    ref = train["reference"]
    assert ref["num_losses"] == ACCUM * STEPS
    assert ref["param_diff"] <= TOL and ref["loss_diff"] <= TOL, ref


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_prefetch_runs_every_hierarchical_all_gather_async_and_bitwise(report, layout):
    train = report["train"][layout]
    _, blocks = unit_numels(LAYOUTS[layout][1])
    # every unshard (the root's and each block's in forward, each block's in backward)
    # went through the asynchronous path, on rank 0; the others are checked by equality
    assert train["async_all_gathers"]["hier_prefetch"] == ACCUM * STEPS * (1 + 2 * len(blocks))
    assert all(n == 0 for name, n in train["async_all_gathers"].items() if "prefetch" not in name)
    # same parameters, losses and collectives (bytes, counts, reach) as without prefetch
    assert train["bitwise_prefetch"] == {"flat": True, "hier": True}
    # with activation checkpointing (forward re-run in backward) as well
    assert train["prefetch_ac_vs_hier_param_diff"] <= TOL
    assert train["async_all_gathers"]["hier_prefetch_ac"] > 0
    assert train["comms"]["hier_prefetch"] == train["comms"]["hier"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_inter_node_volume(report, layout):
    k, p = LAYOUTS[layout]
    n = p // k
    train = report["train"][layout]
    all_gather, reduce_scatter = flat_volumes(p)
    root, blocks = unit_numels(p)
    flat_calls_ag = ACCUM * (1 + 2 * len(blocks))
    flat_calls_rs = ACCUM * (1 + len(blocks))

    def calls(numel: int) -> int:  # inter-node stage + intra-node stage, by buffer size
        return 1 + (1 if numel * FP32 <= BATCHED_INTRA_STAGE_MAX_BYTES else n)

    batched_ag = ACCUM * (calls(root) + 2 * sum(calls(b) for b in blocks))
    batched_rs = ACCUM * (calls(root) + sum(calls(b) for b in blocks))
    # the tiny model's units are all small enough for the batched stage
    assert batched_ag == 2 * flat_calls_ag and batched_rs == 2 * flat_calls_rs
    for rank in range(WORLD):
        for step in range(STEPS):
            flat = train["flat_snapshots"][rank][step]
            hier = train["hier_snapshots"][rank][step]
            per_node = train["per_node_snapshots"][rank][step]
            # the flat figure, from the parameter sizes: all of it crosses nodes
            assert flat["all_gather_inter_node_bytes"] == all_gather
            assert flat["all_gather_intra_node_bytes"] == 0
            assert flat["reduce_scatter_inter_node_bytes"] == reduce_scatter
            # hierarchical: the inter-node stage moves n chunks of the p, i.e. 1/k of
            # the flat figure, and the intra-node stages the full buffer
            assert hier["all_gather_inter_node_bytes"] * p == all_gather * n
            assert hier["all_gather_intra_node_bytes"] == all_gather
            assert hier["reduce_scatter_inter_node_bytes"] * p == reduce_scatter * n
            assert hier["reduce_scatter_intra_node_bytes"] == reduce_scatter
            # per node: k ranks each receive (n-1) of the n chunks of their inter-node
            # stage from other nodes, i.e. (p-k)/p of a full buffer (MiCS Sec. 3.3)
            into_node = k * hier["all_gather_inter_node_bytes"] * (n - 1) // n
            assert into_node * p == all_gather * (p - k)
            # one inter-node + one (batched) or n (per node) intra-node collectives per
            # all-gather / reduce-scatter; the same bytes either way
            assert hier["all_gather_count"] == batched_ag
            assert hier["reduce_scatter_count"] == batched_rs
            assert flat["all_gather_count"] == flat_calls_ag
            assert per_node["all_gather_count"] == (1 + n) * flat_calls_ag
            assert per_node["reduce_scatter_count"] == (1 + n) * flat_calls_rs
            for key in hier:
                if key.endswith("bytes"):
                    assert per_node[key] == hier[key], key
            # the cross-replica all-reduce is untouched
            for key in ("all_reduce_count", "all_reduce_bytes", "all_reduce_inter_node_bytes"):
                assert hier[key] == flat[key]
            assert (hier["all_reduce_count"] > 0) == (WORLD // p > 1)


def test_int_reshard_after_forward_falls_back_to_flat(report):
    rafw = report["rafw"]
    assert rafw["comms"] == [["HierarchicalAllGather"], ["HierarchicalReduceScatter"]]
    assert rafw["param_diff"] <= TOL and rafw["loss_diff"] <= TOL, rafw
    assert rafw["prefetch_bitwise"]
    k, p = 4, 8
    _, blocks = unit_numels(p)
    # every backward re-gather of a block runs flat over the post-forward group
    assert rafw["flat_calls"] == [ACCUM * STEPS * len(blocks)] * WORLD
    root, blocks = unit_numels(p)
    _, blocks_post = unit_numels(RAFW)
    forward = ACCUM * (root + sum(blocks)) * FP32
    backward = ACCUM * sum(blocks_post) * FP32
    for steps in rafw["snapshots"]:
        for snap in steps:
            assert snap["all_gather_inter_node_bytes"] * k == forward
            # the post-forward group (RAFW = k consecutive ranks) is one node
            assert snap["all_gather_intra_node_bytes"] == forward + backward


def test_forcing_on_where_impossible_raises(report):
    errors = report["errors"]
    assert "spans nodes" in errors["inside_node"] and "partition_size=4" in errors["inside_node"]
    assert "ranks_per_node" in errors["unknown_nodes"]
    assert errors["inside_node_left_unsharded"] and errors["unknown_nodes_left_unsharded"]
    assert (
        errors["auto_unknown_nodes_comms"] == "({'RecordingAllGather'}, {'RecordingReduceScatter'})"
    )
    assert "HierarchicalAllGather" in errors["auto_mesh_with_ranks_per_node_comms"]


def test_launch_ran_every_check_on_every_rank(report):
    # one combined launch (to keep the suite small): every part reported, for all ranks
    assert report["world"] == WORLD
    assert set(report) == {"world", "unit", "train", "rafw", "errors"}
    for part in ("unit", "train"):
        assert set(report[part]) == set(LAYOUTS), part
    for layout in LAYOUTS:
        assert len(report["unit"][layout]) == WORLD
        assert len(report["train"][layout]["hier_snapshots"]) == WORLD
    assert len(report["rafw"]["snapshots"]) == WORLD


# -------------------------------------------------------------------- in process
def test_config_option():
    assert MiCSConfig().hierarchical == "auto"
    assert MiCSConfig(hierarchical=True).hierarchical is True
    assert MiCSConfig(hierarchical=False).hierarchical is False
    for bad in ("false", "yes", 1, 0, None, "AUTO"):
        with pytest.raises(ValueError, match="hierarchical"):
            MiCSConfig(hierarchical=bad)


def test_sub_groups_follow_the_node_major_layout():
    t = MiCSTopology.create(16, 4, 8)  # 4 nodes x 4, partitions of 2 nodes, 2 replicas
    inter = inter_node_groups(t)
    assert inter[:4] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert inter[4:] == [[8, 12], [9, 13], [10, 14], [11, 15]]
    assert intra_node_groups(t) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    # every rank is in exactly one group of each kind, inside its own partition group
    for groups in (inter, intra_node_groups(t)):
        assert sorted(r for g in groups for r in g) == list(range(16))
    for g in inter:
        assert len({t.partition_index(r) for r in g}) == 1
        assert len({r % 4 for r in g}) == 1


def test_check_hierarchical():
    check_hierarchical(MiCSTopology.create(8, 2, 4))
    for layout in ((8, 4, 4), (8, 4, 2), (8, 4, "node")):
        with pytest.raises(MiCSTopologyError, match="spans nodes"):
            check_hierarchical(MiCSTopology.create(*layout))
    with pytest.raises(MiCSTopologyError, match="ranks_per_node=1"):
        check_hierarchical(MiCSTopology.create(8, 1, 4))


def test_reduce_op_split_across_stages():
    sum_, avg = dist.ReduceOp.SUM, dist.ReduceOp.AVG
    premul = dist.ReduceOp.PREMUL_SUM(0.25)
    first, second, divide = _stage_ops(premul, "nccl")
    assert first is premul and second == sum_ and not divide  # scale every input once
    assert _stage_ops(avg, "nccl") == (avg, avg, False)  # mean over k, then over n
    assert _stage_ops(avg, "gloo") == (sum_, sum_, True)  # gloo has no AVG
    assert _stage_ops(sum_, "gloo") == (sum_, sum_, False)
