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
from lightning_mics.topology import check_hierarchical, inter_node_groups, intra_node_groups
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
    for rank, result in enumerate(per_rank):
        checks = result["all_gather"]
        assert {key.split("-")[0] for key in checks} == {"uint8", "bfloat16", "float32"}
        for key, check in checks.items():
            assert check["equal_expected"] and check["equal_flat"], (layout, rank, key, check)
            assert check["returned_none"], (layout, rank, key)
        # the uint8 buffers really are bytes (4 per fp32 element)
        assert checks["uint8-3x5"]["dtype"] == "torch.uint8"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reduce_scatter_matches_the_flat_one(report, layout):
    for rank, result in enumerate(report["unit"][layout]):
        for key, check in result["reduce_scatter"].items():
            assert check["returned_none"], (layout, rank, key)
            if key.startswith("float32"):
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
    ref = train["reference"]
    assert ref["num_losses"] == ACCUM * STEPS
    assert ref["param_diff"] <= TOL and ref["loss_diff"] <= TOL, ref


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_inter_node_volume(report, layout):
    k, p = LAYOUTS[layout]
    n = p // k
    train = report["train"][layout]
    all_gather, reduce_scatter = flat_volumes(p)
    _, blocks = unit_numels(p)
    flat_calls_ag = ACCUM * (1 + 2 * len(blocks))
    flat_calls_rs = ACCUM * (1 + len(blocks))
    for rank in range(WORLD):
        for step in range(STEPS):
            flat = train["flat_snapshots"][rank][step]
            hier = train["hier_snapshots"][rank][step]
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
            per_node = k * hier["all_gather_inter_node_bytes"] * (n - 1) // n
            assert per_node * p == all_gather * (p - k)
            # one inter-node + n intra-node collectives per all-gather / reduce-scatter
            assert (
                hier["all_gather_count"]
                == (1 + n) * flat_calls_ag
                == (1 + n) * flat["all_gather_count"]
            )
            assert hier["reduce_scatter_count"] == (1 + n) * flat_calls_rs
            # the cross-replica all-reduce is untouched
            for key in ("all_reduce_count", "all_reduce_bytes", "all_reduce_inter_node_bytes"):
                assert hier[key] == flat[key]
            assert (hier["all_reduce_count"] > 0) == (WORLD // p > 1)


def test_int_reshard_after_forward_falls_back_to_flat(report):
    rafw = report["rafw"]
    assert rafw["comms"] == [["HierarchicalAllGather"], ["HierarchicalReduceScatter"]]
    assert rafw["param_diff"] <= TOL and rafw["loss_diff"] <= TOL, rafw
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
