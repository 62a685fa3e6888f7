"""The reduce ops FSDP takes on NCCL (``AVG``, ``PREMUL_SUM``), end to end on CPU.

Every other multi-rank test runs on gloo, where `apply_mics` forces sum-only reductions
and the hierarchical reduce-scatter sums twice and divides once; the paths NCCL takes
(``AVG`` in FSDP's reduce-scatter and cross-replica all-reduce, ``AVG`` in both stages of
the hierarchical reduce-scatter, ``PREMUL_SUM(1/f)`` in its first stage only) would
otherwise never run without GPUs. ``tests/scripts/emulated_nccl.py`` is a test-only
process-group backend (gloo plus ``AVG`` and ``PREMUL_SUM``) under which the whole stack
behaves as on NCCL; one launch of 8 ranks (4 emulated nodes x 2) trains flat (partition 2,
4 replicas) and hierarchical (partition 4 spanning 2 nodes, 2 replicas) MiCS with two-hop
accumulation over 2 micro-steps, with FSDP's default ops and with a custom gradient
divide factor (``PREMUL_SUM``). The same script runs on GPUs with NCCL from ``tests/gpu/``.
"""

from __future__ import annotations

import pytest
import torch

from lightning_mics.topology import BATCHED_INTRA_STAGE_MAX_BYTES
from recipes.gpt import GPT
from tests.launch import run_script
from tests.scripts.common import TINY
from tests.scripts.reduce_op_checks import STEPS, Config, expected_ops

WORLD = 8
ACCUM = 2
CONFIGS = [
    Config(2, 2, ACCUM, "default"),  # flat, 4 replicas: AVG, AVG
    Config(2, 4, ACCUM, "default"),  # hierarchical (2 nodes x 2), 2 replicas: AVG per stage
    Config(2, 2, ACCUM, "divide"),  # flat: PREMUL_SUM(1/8), then SUM across replicas
    Config(2, 4, ACCUM, "divide"),  # hierarchical: PREMUL_SUM(1/8) intra, SUM inter, SUM
]
TOL = 1e-5  # fp32: only the grouping of the additions differs from the reference
UNITS = TINY.n_layer + 1  # one FSDP unit per block, plus the root


def unit_bytes() -> list[int]:
    """fp32 bytes of the tiny model's FSDP units (the root's own parameters, each block)."""
    with torch.device("meta"):
        model = GPT(TINY)
    blocks = [sum(q.numel() for q in b.parameters()) for b in model.transformer.h]
    return [4 * (sum(q.numel() for q in model.parameters()) - sum(blocks))] + [
        4 * b for b in blocks
    ]


@pytest.fixture(scope="module")
def report() -> dict:
    configs = ",".join(
        f"{c.ranks_per_node}:{c.partition_size}:{c.accum}:{c.reduction}" for c in CONFIGS
    )
    return run_script("reduce_op_checks.py", WORLD, "--configs", configs, timeout=600)


def test_backend_is_not_gloo(report: dict) -> None:
    # gloo would force sum-only reductions: the NCCL paths would not run
    assert report["backend"] == "emulated_ccl"


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_matches_reference(report: dict, cfg: Config) -> None:
    result = report[str(cfg)]
    assert result["num_losses"] == ACCUM * STEPS
    assert result["param_diff"] <= TOL, result
    assert result["loss_diff"] <= TOL, result


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_reductions_are_the_nccl_ones(report: dict, cfg: Config) -> None:
    """Exactly the ops, groups and dtypes that divide by the data-parallel size once."""
    result = report[str(cfg)]
    expected = expected_ops(WORLD, cfg)
    assert set(result["ops"]) == expected, result["ops"]
    assert result["expected_ops"] == sorted(expected)  # rank 0's own view agrees
    hierarchical = cfg.partition_size > cfg.ranks_per_node
    assert result["comms"] == [
        "HierarchicalReduceScatter" if hierarchical else "RecordingReduceScatter"
    ]
    # two-hop: a reduce-scatter (per stage: 1 intra-node, as every unit of the tiny model
    # is under the batching threshold, and 1 inter-node) every micro-step, the all-reduce
    # once per optimizer step
    assert max(unit_bytes()) <= BATCHED_INTRA_STAGE_MAX_BYTES
    for key, count in result["ops"].items():
        kind = key.split(" ")[0]
        calls = UNITS * STEPS * (ACCUM if kind == "reduce_scatter" else 1)
        assert count == calls, (key, count, calls)
    assert sum(key.startswith("all_reduce") for key in result["ops"]) == 1


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_nccl_ops_reached_the_backend(report: dict, cfg: Config) -> None:
    emulated = report[str(cfg)]["emulated"]
    if cfg.reduction == "divide":
        assert set(emulated) == {"PREMUL_SUM(0.125) x2"}, emulated
    else:
        assert "AVG x2" in emulated, emulated
        assert all(key.startswith("AVG") for key in emulated), emulated


def test_expected_ops_follow_the_semantics() -> None:
    """The expectation itself, on layouts the launch does not run."""
    # one partition spanning the world: FSDP's factor equals the group size, so AVG
    assert expected_ops(8, Config(2, 8, 1, "divide")) == {
        "reduce_scatter AVG [0, 1] float32",
        "reduce_scatter AVG [0, 2, 4, 6] float32",
    }
    # pure replication (partition 1): no reduce-scatter at all
    assert expected_ops(4, Config(1, 1, 1)) == {"all_reduce AVG [0, 1, 2, 3] float32"}
    # one process: sums, nothing issued
    assert expected_ops(1, Config(1, 1, 1)) == set()
    # another rank's groups
    assert expected_ops(8, Config(2, 4, 1), rank=5) == {
        "reduce_scatter AVG [4, 5] float32",
        "reduce_scatter AVG [5, 7] float32",
        "all_reduce AVG [1, 5] float32",
    }
