"""The plain-PyTorch API (`apply_mics` + `micro_step`) on several ranks.

Three launches: parity with a single-process reference at world 4 and at world 8 (one
launch per world size, looping over configurations inside the script), and one launch
of property checks at world 4 = 2 nodes x 2 ranks, partition 2, so 2 replicas.
"""

from __future__ import annotations

import pytest

from tests.launch import run_script
from tests.scripts import common

TOL = 1e-5
STEPS = 3

# (ranks_per_node : partition_size : accumulation [: mode]); world 4 = 2 nodes x 2 ranks.
WORLD4 = [
    "2:1:1",  # partition 1, 4 replicas (pure data parallel on FSDP)
    "2:2:4:two_hop",  # one node per partition, 2 replicas
    "2:2:4:every_micro_step",
    "2:2:4:last_micro_step_only",
    "2:4:4:every_micro_step",  # one partition spanning both nodes, 1 replica
]
# world 8: replication > 1, one of them with partitions spanning nodes.
WORLD8 = [
    "2:4:4:two_hop",  # 4 nodes x 2, partitions of 2 nodes, 2 replicas
    "4:2:4:last_micro_step_only",  # 2 nodes x 4, 4 replicas
    "2:2:1:every_micro_step",  # 4 nodes x 2, 4 replicas
]
CHECKS_TOPOLOGY = dict(world=4, ranks_per_node=2, partition_size=2)
COUNT_ACCUM = 3
MAX_NORM = 0.05


@pytest.fixture(scope="module")
def parity():
    reports = {}

    def get(world: int) -> dict:
        if world not in reports:
            configs = WORLD4 if world == 4 else WORLD8
            reports[world] = run_script(
                "plain_parity.py", world, "--configs", ",".join(configs), "--steps", STEPS
            )
        return reports[world]

    return get


@pytest.mark.parametrize(
    "world,config", [(4, c) for c in WORLD4] + [(8, c) for c in WORLD8], ids=lambda v: str(v)
)
def test_parity_with_single_process(parity, world, config):
    (cfg,) = common.parse_configs(config)
    result = parity(world)["configs"][str(cfg)]
    assert result["optimizer_steps"] == STEPS
    assert result["num_losses"] == STEPS * cfg.accum
    replication = world // cfg.partition_size
    assert result["replication_size"] == replication
    expected_mesh = [cfg.partition_size] if replication == 1 else [replication, cfg.partition_size]
    assert result["mesh"] == expected_mesh
    assert result["param_diff"] <= TOL, result
    assert result["loss_diff"] <= TOL, result


# ------------------------------------------------------------------------- property checks
@pytest.fixture(scope="module")
def checks():
    return run_script(
        "plain_checks.py",
        CHECKS_TOPOLOGY["world"],
        "--ranks-per-node",
        CHECKS_TOPOLOGY["ranks_per_node"],
        "--partition-size",
        CHECKS_TOPOLOGY["partition_size"],
        "--count-accum",
        COUNT_ACCUM,
        "--max-norm",
        MAX_NORM,
    )


def test_checks_topology(checks):
    assert checks["topology"] == {
        "world_size": 4,
        "ranks_per_node": 2,
        "partition_size": 2,
        "replication_size": 2,
    }


@pytest.mark.parametrize(
    "mode,reduce_scatters,all_reduces",
    [
        # per FSDP unit and optimizer step of s micro-steps
        ("two_hop", COUNT_ACCUM, 1),
        ("every_micro_step", COUNT_ACCUM, COUNT_ACCUM),
        ("last_micro_step_only", 1, 1),
    ],
)
def test_collective_counts(checks, mode, reduce_scatters, all_reduces):
    assert checks["counts"]["accum"] == COUNT_ACCUM
    result = checks["counts"][mode]
    units = result["units"]
    assert units == common.TINY.n_layer + 1  # one unit per block + the root
    counts = dict(result["counts"])
    # Parameter all-gathers stay inside the partition group (there are some every step).
    assert counts.pop("all_gather:partition", 0) >= 2 * units - 1
    # Gradients: reduce-scatter inside the partition group, all-reduce across replicas,
    # and nothing else anywhere (no world-wide or other collectives).
    assert counts == {
        "reduce_scatter:partition": reduce_scatters * units,
        "all_reduce:replication": all_reduces * units,
    }, result


@pytest.mark.parametrize("kind", ["param", "grad", "state"])
def test_memory_is_sharded(checks, kind):
    memory = checks["memory"]
    p = memory["partition_size"]
    assert len(memory["per_rank"]) == CHECKS_TOPOLOGY["world"]
    for rank in memory["per_rank"]:
        full = rank["full_state"] if kind == "state" else rank["full_param"]
        local = rank[f"local_{kind}"]
        assert full > 0
        # 1/p of the full size up to padding: less than one dim-0 row per tensor.
        padding = rank["row_numel"] * (full // rank["full_param"])
        assert abs(local - full / p) < padding, rank
        assert rank["over_bound"] == 0, rank  # no tensor shard above ceil(dim0 / p) rows
        assert rank["sums_ok"], rank  # shards of each param add up to it exactly
    if kind == "state":  # AdamW keeps two moments per parameter
        assert memory["per_rank"][0]["full_state"] == 2 * memory["per_rank"][0]["full_param"]


def test_replicas_start_identical(checks):
    synced = checks["replicas"]["sync"]
    assert synced["num_buffers"] == 1
    assert synced["params_bitwise_equal"] and synced["param_diff"] == 0.0, synced
    assert synced["buffers_bitwise_equal"] and synced["buffer_diff"] == 0.0, synced


def test_replicas_differ_without_sync(checks):
    # The control: the same check sees the difference when replicas are not synced.
    unsynced = checks["replicas"]["no_sync"]
    assert not unsynced["params_bitwise_equal"] and unsynced["param_diff"] > 1e-3, unsynced
    assert not unsynced["buffers_bitwise_equal"] and unsynced["buffer_diff"] > 1e-3, unsynced


def test_meta_device_init(checks):
    meta = checks["meta"]
    assert meta["meta_params"] == 0
    assert meta["not_finite_params"] == 0
    assert meta["wrong_shape_params"] == 0
    # The model's own init (GPT-2, std 0.02) wins over its children's defaults
    # (nn.Embedding would give std 1).
    assert 0.015 < meta["wte_std"] < 0.025, meta
    assert meta["replicas"]["params_bitwise_equal"], meta
    assert len(meta["losses"]) == 2 and meta["losses_finite"], meta


@pytest.mark.parametrize(
    "variant,pending",
    [
        ("two_hop", True),
        ("last_micro_step_only", True),
        ("two_hop-skipped_forward", True),  # the skipped micro-step ran its forward
        ("last_micro_step_only-skipped_forward", True),
        ("every_micro_step", False),  # nothing is ever parked: the flush is a no-op
    ],
)
def test_flush_after_skipped_last_micro_step(checks, variant, pending):
    result = checks["skip_last"][variant]
    # Window 1 left gradients parked (except every_micro_step); window 2, a normal one,
    # left none.
    assert result["flushed"] == [pending, False], result
    first, second = result["window_diffs"]
    assert first <= TOL, result  # applied exactly micro-batches 0 and 1
    assert second <= TOL, result  # nothing leaked into the next window


def test_skipped_last_micro_step_without_flush_is_wrong(checks):
    # The control: without the flush the parked gradients are lost or leak.
    result = checks["skip_last"]["two_hop-no_flush"]
    assert min(result["window_diffs"]) > 1e-4, result


def test_clip_grad_norm_matches_unsharded(checks):
    clip = checks["clip"]
    assert clip["max_norm"] == MAX_NORM
    assert len(clip["norms"]) == 3
    assert min(clip["ref_norms"]) > 2 * MAX_NORM  # it really clips
    assert clip["norm_rel_diff"] <= 1e-5, clip
    assert clip["norm_spread_over_ranks"] == 0.0, clip  # every rank gets the same norm


def test_training_with_clipping_matches_reference(checks):
    clip = checks["clip"]
    assert clip["param_diff"] <= TOL, clip
    assert clip["param_diff_vs_unclipped"] > 1e-3, clip  # clipping changed the result
