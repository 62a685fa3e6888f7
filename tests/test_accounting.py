"""Communication accounting: every collective recorded with its logical bytes and reach.

One launch of ``tests/scripts/accounting_checks.py`` on 4 ranks = 2 nodes x 2 ranks.
Expected values are computed here from the parameter sizes and FSDP2's schedule:

- per micro-step, every FSDP unit is all-gathered in forward, and every unit that
  reshards after forward (the blocks; the root keeps its parameters) again in backward;
- every synchronising micro-step reduce-scatters every unit; the cross-replica
  all-reduce runs once per unit per optimizer step in ``two_hop`` (every micro-step in
  ``every_micro_step``) and only when there are replicas;
- bytes are ``numel * 4`` (fp32) of the full buffer: all-gather output and
  reduce-scatter input = the unit's parameters with dim 0 padded to a multiple of the
  group size; all-reduce tensor = that divided by the partition size.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_mics import MiCSConfig
from lightning_mics.accounting import KINDS, LOG_KEYS, CommStats, format_summary, mean_snapshot
from recipes.gpt import GPT, GPTConfig
from tests.launch import run_script
from tests.scripts import common
from tests.scripts.accounting_checks import (
    PADDED,
    PLAIN,
    RANKS_PER_NODE,
    STEPS,
    TRAINER_ACCUM,
)

WORLD = 4
ACCUM = 3
FP32 = 4


@pytest.fixture(scope="module")
def report():
    return run_script(
        "accounting_checks.py",
        WORLD,
        "--accum",
        ACCUM,
        timeout=300,
    )


# ---------------------------------------------------------------- expected values
def padded_numel(param: nn.Parameter, group_size: int) -> int:
    rows = param.shape[0]
    return math.ceil(rows / group_size) * group_size * (param.numel() // rows)


def unit_numels(config: GPTConfig, group_size: int) -> tuple[int, list[int]]:
    """Padded unsharded numel of the root unit and of each block unit."""
    with torch.device("meta"):
        model = GPT(config)
    in_blocks = {id(q) for block in model.transformer.h for q in block.parameters()}
    root = sum(padded_numel(q, group_size) for q in model.parameters() if id(q) not in in_blocks)
    blocks = [sum(padded_numel(q, group_size) for q in b.parameters()) for b in model.transformer.h]
    return root, blocks


def expected(
    config: GPTConfig, p: int, mode: str, accum: int, backward_group: int | None = None
) -> dict[str, int]:
    """Counters of one optimizer step on every rank (2 nodes x 2 ranks)."""
    backward_group = backward_group or p
    root, blocks = unit_numels(config, p)
    _, blocks_bwd = unit_numels(config, backward_group)
    units = 1 + len(blocks)
    replicas = WORLD // p
    syncing_micro_steps = 1 if mode == "last_micro_step_only" else accum
    all_reduces = (accum if mode == "every_micro_step" else 1) if replicas > 1 else 0
    partition_crosses = p > RANKS_PER_NODE
    ag_fwd = accum * (root + sum(blocks)) * FP32
    ag_bwd = accum * sum(blocks_bwd) * FP32
    ag_bwd_crosses = backward_group > RANKS_PER_NODE
    out = {
        "all_gather_count": accum * (units + len(blocks)),
        "all_gather_bytes": ag_fwd + ag_bwd,
        "reduce_scatter_count": syncing_micro_steps * units,
        "reduce_scatter_bytes": syncing_micro_steps * (root + sum(blocks)) * FP32,
        "all_reduce_count": all_reduces * units,
        "all_reduce_bytes": all_reduces * (root + sum(blocks)) // p * FP32,
    }
    out["all_gather_inter_node_bytes"] = ag_fwd * partition_crosses + ag_bwd * ag_bwd_crosses
    out["reduce_scatter_inter_node_bytes"] = out["reduce_scatter_bytes"] * partition_crosses
    # the replication group {r, r + p, ...} always spans nodes here
    out["all_reduce_inter_node_bytes"] = out["all_reduce_bytes"]
    for kind in KINDS:
        out[f"{kind}_intra_node_bytes"] = out[f"{kind}_bytes"] - out[f"{kind}_inter_node_bytes"]
    out["inter_node_bytes"] = sum(out[f"{kind}_inter_node_bytes"] for kind in KINDS)
    out["intra_node_bytes"] = sum(out[f"{kind}_intra_node_bytes"] for kind in KINDS)
    return out


def test_padding_is_exercised():
    # The plain checks' model has rows that 2 and 4 do not divide: padding counts.
    assert unit_numels(PADDED, 4)[0] > unit_numels(PADDED, 1)[0]


# ------------------------------------------------------------------- plain API
@pytest.mark.parametrize("name", list(PLAIN))
def test_counts_and_bytes_per_optimizer_step(report, name):
    p, mode, rafw = PLAIN[name]
    result = report["plain"][name]
    want = expected(PADDED, p, mode, ACCUM, backward_group=None if rafw is True else rafw)
    assert len(result["snapshots"]) == WORLD
    for rank, steps in enumerate(result["snapshots"]):
        assert len(steps) == STEPS
        for step, snapshot in enumerate(steps):
            assert snapshot == want, (name, rank, step)


def test_intra_node_partitions_keep_gathers_inside_nodes(report):
    # (a) partition 2 = one node, 2 replicas: only the all-reduce leaves the node.
    snap = report["plain"]["p2-two_hop"]["snapshots"][0][0]
    assert snap["all_gather_inter_node_bytes"] == snap["reduce_scatter_inter_node_bytes"] == 0
    assert snap["all_gather_intra_node_bytes"] > 0 and snap["reduce_scatter_intra_node_bytes"] > 0
    assert snap["all_reduce_intra_node_bytes"] == 0 and snap["all_reduce_inter_node_bytes"] > 0
    assert snap["inter_node_bytes"] == snap["all_reduce_bytes"]


def test_partitions_spanning_nodes_gather_across_nodes(report):
    # (b) partition 4 = both nodes, 1 replica: gathers and scatters cross nodes, and
    # there is no all-reduce at all.
    snap = report["plain"]["p4-two_hop"]["snapshots"][0][0]
    assert snap["intra_node_bytes"] == 0
    assert snap["all_gather_inter_node_bytes"] == snap["all_gather_bytes"] > 0
    assert snap["reduce_scatter_inter_node_bytes"] == snap["reduce_scatter_bytes"] > 0
    assert snap["all_reduce_count"] == 0


def test_post_forward_group_is_classified_by_the_group_used(report):
    # reshard_after_forward=2: backward re-gathers run in node-local pairs.
    snap = report["plain"]["p4-two_hop-rafw2"]["snapshots"][0][0]
    blocks = common.TINY.n_layer
    assert snap["all_gather_intra_node_bytes"] > 0
    assert snap["all_gather_inter_node_bytes"] > 0
    _, block_numels = unit_numels(PADDED, 2)
    assert snap["all_gather_intra_node_bytes"] == ACCUM * sum(block_numels) * FP32
    assert snap["all_gather_count"] == ACCUM * (2 * blocks + 1)


@pytest.mark.parametrize("name", list(PLAIN))
def test_recorded_counts_match_what_torch_distributed_saw(report, name):
    # An independent count: the torch.distributed functions FSDP calls, wrapped.
    result = report["plain"][name]
    for steps, seen_steps in zip(result["snapshots"], result["dist_counts"], strict=True):
        for snap, seen in zip(steps, seen_steps, strict=True):
            by_kind = dict.fromkeys(KINDS, 0)
            for key, count in seen.items():
                by_kind[key.split(":")[0]] += count
            assert {k: snap[f"{k}_count"] for k in KINDS} == by_kind, (snap, seen)


@pytest.mark.parametrize("p", [2, 4])
def test_numerics_unchanged(report, p):
    result = report["numerics"][f"p{p}"]
    assert result["param_diff"] <= 1e-5 and result["loss_diff"] <= 1e-5, result
    assert result["bitwise_equal_without_stats"], result
    assert result["stats_found_when_off"] is False


# --------------------------------------------------------------------- Trainer
def test_trainer_logs_per_optimizer_step(report):
    trainer = report["trainer"]
    want = expected(common.TINY, 2, "two_hop", TRAINER_ACCUM)
    assert trainer["global_step"] == STEPS
    rows = trainer["rows"]
    assert [row["step"] for row in rows] == list(range(STEPS))
    for row in rows:
        for key in LOG_KEYS:
            assert row[f"comm/{key}"] == want[key], (key, row)
        assert row["comm/inter_node_MB"] == pytest.approx(want["inter_node_bytes"] / 1e6)
    for history in trainer["history"]:  # every rank
        assert history == [want] * STEPS
    assert trainer["summary"] == {k: float(v) for k, v in want.items()}
    assert trainer["progress_bar_keys"] == ["comm/inter_node_MB"]


# ------------------------------------------------------------------ in process
def test_comm_stats_recorder():
    stats = CommStats.for_ranks_per_node(4, 2)
    stats.record_bytes("all_gather", 100, inter_node=False)
    stats.record_bytes("all_gather", 50, inter_node=True)
    stats.record_bytes("all_reduce", 7, inter_node=True)
    assert stats.all_gather_count == 2 and stats.all_gather_bytes == 150
    assert stats.all_reduce_count == 1 and stats.reduce_scatter_count == 0
    assert stats.inter_node_bytes == 57 and stats.intra_node_bytes == 100
    logged = stats.log_dict("x/", reset=True)
    assert set(logged) == {f"x/{k}" for k in LOG_KEYS}
    assert logged["x/all_gather_bytes"] == 150.0
    assert stats.snapshot() == dict.fromkeys(stats.snapshot(), 0)
    with pytest.raises(ValueError, match="kind"):
        stats.record_bytes("broadcast", 1, inter_node=False)


def test_summary_formatting():
    stats = CommStats([0, 0, 1, 1])
    stats.record_bytes("reduce_scatter", 3_000_000, inter_node=True)
    mean = mean_snapshot([stats.snapshot(), dict.fromkeys(stats.snapshot(), 0)])
    assert mean["reduce_scatter_bytes"] == 1_500_000
    text = format_summary(mean)
    assert "reduce-scatter" in text and "inter-node 1.50 MB" in text


def test_config_flag():
    assert MiCSConfig().comm_stats is True
    with pytest.raises(ValueError, match="comm_stats"):
        MiCSConfig(comm_stats="false")
