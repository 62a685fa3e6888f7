"""The strategy benchmark (`benchmarks.strategies`): its analytic byte formulas against
hand-computed values, and one tiny configuration end to end on the emulated cluster.

No timing assertions: wall times on a shared CPU machine say nothing reliable. The end-
to-end test checks that the runner completes, that the results file has the documented
schema, that the markdown table and the PNG are written, and that the kernel-counted
inter-node bytes agree with the analytic figure and with `CommStats`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import analytic as A
from benchmarks import emulated_cluster as emu
from benchmarks import strategies as S
from tests.launch import REPO

MB = 1e6


# ------------------------------------------------------------------- ring model
@pytest.mark.parametrize(
    ("ranks", "k", "crossings"),
    [
        ([0, 1, 2, 3], 2, 2),  # world of 2 nodes x 2: 1->2 and 3->0
        ([0, 2], 2, 2),  # a cross-node pair: both hops
        ([0, 1], 2, 0),  # inside a node
        ([0, 2, 4, 6], 2, 4),  # one rank per node
        (list(range(8)), 2, 4),  # world of 4 nodes x 2
        ([3], 2, 0),
    ],
)
def test_ring_crossings(ranks: list[int], k: int, crossings: int) -> None:
    assert A.ring_crossings(ranks, k) == crossings


def test_collective_wire_bytes_match_the_documented_gloo_measurements() -> None:
    """`docs/emulated_cluster.md`'s table (2 nodes x 2 ranks, buffer ``S``), per node's
    uplink; the model gives all nodes together, i.e. twice those."""
    s = 4 * 2**20
    world = [0, 1, 2, 3]
    assert A.all_reduce_wire(s, world, 2) == 2 * 1.5 * s  # 1.5 S per node
    assert A.all_gather_wire(s, world, 2) == 2 * 0.75 * s  # 0.75 S per node
    assert A.all_gather_wire(s, [0, 1], 2) == 0  # node group: loopback only
    # cross-node pairs {0,2} and {1,3}: S per node in all
    assert A.all_gather_wire(s, [0, 2], 2) + A.all_gather_wire(s, [1, 3], 2) == 2 * s
    # gloo's reduce-scatter is an all-reduce of the input: 1.5 S per node, a ring 0.75 S
    assert A.reduce_scatter_wire(s, world, 2, "gloo") == 2 * 1.5 * s
    assert A.reduce_scatter_wire(s, world, 2, "nccl") == 2 * 0.75 * s


def test_wire_factor_per_recorded_byte() -> None:
    """`docs/emulated_cluster.md`: 3/8 for the flat partition group of 4 over 2 nodes, 1/2
    for the hierarchical inter-node pairs; twice that for all-reduce/gloo reduce-scatter."""
    assert A.wire_factor("all_gather", [0, 1, 2, 3], 2) == pytest.approx(3 / 8)
    assert A.wire_factor("all_gather", [0, 2], 2) == pytest.approx(1 / 2)
    assert A.wire_factor("reduce_scatter", [0, 2], 2) == pytest.approx(1.0)
    assert A.wire_factor("reduce_scatter", [0, 2], 2, "nccl") == pytest.approx(1 / 2)
    assert A.wire_factor("all_reduce", [0, 2, 4, 6], 2) == pytest.approx(2 * 4 * 3 / 4 / 4)
    assert A.wire_factor("all_gather", [0, 1], 2) == 0.0


# ----------------------------------------------------------------------- units
def test_padding_of_a_unit() -> None:
    unit = A.Unit("root", ((260, 128), (128,), (7, 3)), False)
    assert unit.numel == 260 * 128 + 128 + 21
    # dim 0 padded to a multiple of the shard count: 260 -> 264 and 7 -> 8 over 8 shards
    assert unit.padded_numel(8) == 264 * 128 + 128 + 8 * 3
    assert unit.padded_numel(4) == 260 * 128 + 128 + 8 * 3
    assert unit.padded_numel(1) == unit.numel


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_gpt_units_match_the_module(tie: bool, bias: bool) -> None:
    from recipes.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=260, block_size=32, n_layer=3, n_head=2, n_embd=32, bias=bias,
                    tie_weights=tie)  # fmt: skip
    model = GPT(cfg)
    units = A.gpt_units(260, 32, 3, 32, bias=bias, tie_weights=tie)
    assert [u.name for u in units] == ["block0", "block1", "block2", "root"]
    for unit, block in zip(units, model.transformer.h, strict=False):
        assert list(unit.shapes) == [tuple(p.shape) for p in block.parameters()]
        assert unit.regathered_in_backward
    assert sum(u.numel for u in units) == model.num_parameters()
    assert not units[-1].regathered_in_backward


# ------------------------------------------------------------------- step bytes
#: A toy model whose dims divide every shard count used below (no padding): two blocks of
#: 64 x 32 and a root of 96 x 32 elements.
TOY = [
    A.Unit("block0", ((64, 32),), True),
    A.Unit("block1", ((64, 32),), True),
    A.Unit("root", ((96, 32),), False),
]
NB, NR = 64 * 32 * 4, 96 * 32 * 4  # bytes of one block, of the root
TOTAL = 2 * NB + NR


def test_zero3_over_two_nodes() -> None:
    """p = world = 4 on 2 nodes x 2: a ring over the world crosses 2 node boundaries,
    each carrying 3/4 of an all-gather output: 1.5 B per gathered buffer; gathered:
    every unit in forward, the two blocks again in backward; gloo's reduce-scatter:
    2 x 1.5 = 3 B of every unit's gradients. No replicas, no all-reduce."""
    b = A.fsdp_step_bytes(TOY, A.Layout(2, 2, 4), accumulation=1, mode="every_micro_step")
    assert b.all_gather == pytest.approx(1.5 * (TOTAL + 2 * NB))
    assert b.reduce_scatter == pytest.approx(3 * TOTAL)
    assert b.all_reduce == 0
    # accumulation 4: all of it every micro-step
    b4 = A.fsdp_step_bytes(TOY, A.Layout(2, 2, 4), accumulation=4, mode="every_micro_step")
    assert b4.total == pytest.approx(4 * b.total)
    # a ring reduce-scatter (NCCL) sends half of gloo's
    ring = A.fsdp_step_bytes(TOY, A.Layout(2, 2, 4), 1, "every_micro_step", backend="nccl")
    assert ring.reduce_scatter == pytest.approx(1.5 * TOTAL)


def test_hierarchical_over_two_nodes() -> None:
    """Hierarchical p=4 on 2 x 2: stage 1 on the pairs {0,2}, {1,3}, output B/2 each, both
    hops cross: 2 x 1/2 x B/2 = B/2 per pair, B in all (flat: 1.5 B, one third more);
    reduce-scatter stage 2 on the same pairs, as all-reduces on gloo: 2 B."""
    b = A.fsdp_step_bytes(TOY, A.Layout(2, 2, 4, hierarchical=True), 1, "two_hop")
    assert b.all_gather == pytest.approx(1.0 * (TOTAL + 2 * NB))
    assert b.reduce_scatter == pytest.approx(2 * TOTAL)
    flat = A.fsdp_step_bytes(TOY, A.Layout(2, 2, 4), 1, "two_hop")
    assert 1 - b.all_gather / flat.all_gather == pytest.approx(1 / 3)


def test_partition_of_a_node_two_hop_and_every_micro_step() -> None:
    """p = 2 = one node on 2 x 2: all-gathers and reduce-scatters stay in the node; the
    replication groups {0,2}, {1,3} all-reduce each rank's half of the gradients: per
    group 2 x 2 x 1/2 x T/2 = T, 2 T in all; two-hop once per optimizer step, HSDP
    (every_micro_step) on every micro-step."""
    two_hop = A.fsdp_step_bytes(TOY, A.Layout(2, 2, 2), accumulation=4, mode="two_hop")
    assert two_hop.all_gather == two_hop.reduce_scatter == 0
    assert two_hop.all_reduce == pytest.approx(2 * TOTAL)
    hsdp = A.fsdp_step_bytes(TOY, A.Layout(2, 2, 2), accumulation=4, mode="every_micro_step")
    assert hsdp.all_reduce == pytest.approx(4 * 2 * TOTAL)


def test_four_nodes() -> None:
    """4 nodes x 2, p = 4 (2 replicas): flat partition rings {0..3}, {4..7} cross 2
    boundaries each: 2 x 1.5 B = 3 B; hierarchical pairs {0,2},{1,3},{4,6},{5,7}:
    4 x B/2 = 2 B; replication groups {0,4},...,{3,7} all-reduce T/4 each: 4 x 2 x 2 x
    1/2 x T/4 = 2 T. ZeRO-3 over all 8: 4 crossings x 7/8 = 3.5 B."""
    flat = A.fsdp_step_bytes(TOY, A.Layout(4, 2, 4), 1, "two_hop")
    hier = A.fsdp_step_bytes(TOY, A.Layout(4, 2, 4, hierarchical=True), 1, "two_hop")
    gathered = TOTAL + 2 * NB
    assert flat.all_gather == pytest.approx(3 * gathered)
    assert hier.all_gather == pytest.approx(2 * gathered)
    assert flat.all_reduce == hier.all_reduce == pytest.approx(2 * TOTAL)
    zero3 = A.fsdp_step_bytes(TOY, A.Layout(4, 2, 8), 1, "every_micro_step")
    assert zero3.all_gather == pytest.approx(3.5 * gathered)
    assert zero3.all_reduce == 0


def test_ddp() -> None:
    """One all-reduce of the unpadded gradients over the world: 2 x 2 x 3/4 = 3 T on
    2 x 2, 2 x 4 x 7/8 = 7 T on 4 x 2."""
    assert A.ddp_step_bytes(TOY, 2, 2).total == pytest.approx(3 * TOTAL)
    assert A.ddp_step_bytes(TOY, 4, 2).total == pytest.approx(7 * TOTAL)


def test_matches_the_documented_mics_step_measurement() -> None:
    """`docs/emulated_cluster.md` measured one step of a 1.85 M-parameter GPT (n_embd
    256, 2 layers, vocabulary 512, block 16, untied) on 2 x 2, partition 4: step
    all-gathers 20.566 MB flat / 13.713 MB hierarchical, reduce-scatters 22.167 MB
    (kernel). The model gives them within 0.2%."""
    units = A.gpt_units(512, 16, 2, 256, bias=True, tie_weights=False)
    flat = A.fsdp_step_bytes(units, A.Layout(2, 2, 4), 1, "two_hop")
    hier = A.fsdp_step_bytes(units, A.Layout(2, 2, 4, hierarchical=True), 1, "two_hop")
    assert flat.all_gather / MB == pytest.approx(20.566, rel=2e-3)
    assert hier.all_gather / MB == pytest.approx(13.713, rel=2e-3)
    assert flat.reduce_scatter / MB == pytest.approx(22.167, rel=2e-3)


def test_model_state_bytes() -> None:
    mem = A.model_state_bytes(TOY, shards=4)
    per = math.ceil((2 * 64 * 32 + 96 * 32) / 4) * 4
    assert mem == {"params": per, "grads": per, "optimizer_state": 2 * per, "total": 4 * per}
    assert A.model_state_bytes(TOY, 1)["total"] == 4 * mem["total"]


# ------------------------------------------------------------------ the runner
def test_time_stats() -> None:
    st = S.time_stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert st["median_s"] == 3.0 and st["min_s"] == 1.0 and st["max_s"] == 100.0
    assert st["q1_s"] == 2.0 and st["q3_s"] == 4.0 and st["rel_iqr"] == pytest.approx(2 / 3)


def test_plan_runs() -> None:
    runs = S.plan_runs(2, 2, [1, 4])
    labels = [(r["label"], r["accumulation"]) for r in runs]
    assert labels[:6] == [
        ("ddp", 1), ("fsdp (ZeRO-3, p=4)", 1), ("hsdp p=2", 1), ("mics p=2", 1),
        ("mics p=4 flat", 1), ("mics p=4 hier", 1),
    ]  # fmt: skip
    assert len(runs) == 12
    hsdp = next(r for r in runs if r["strategy"] == "hsdp")
    assert hsdp["mode"] == "every_micro_step" and hsdp["partition_size"] == 2
    four = S.plan_runs(4, 2, [1], overlap=True)
    assert [r["label"] for r in four][-2:] == ["mics p=4 flat +async", "mics p=4 hier +async"]
    assert next(r for r in four if r["strategy"] == "fsdp")["partition_size"] == 8
    with pytest.raises(SystemExit):
        S.plan_runs(4, 2, [1], span_partitions=[6])


def test_gpt_tiny_config() -> None:
    model = S.load_model_config("gpt_tiny")
    assert {"vocab_size", "block_size", "n_layer", "n_head", "n_embd"} <= model.keys()
    assert isinstance(model["vocab_size"], int)


# ------------------------------------------------------------------- end to end
def test_runner_end_to_end_on_the_emulated_cluster(tmp_path: Path) -> None:
    """One tiny configuration (2 nodes x 2 ranks, 1 Gbit/s, every strategy and the
    ``--overlap`` pair, accumulation 1, one step) through the command line: exit 0, the documented schema, the markdown
    table and the PNG; kernel bytes within 5% of the analytic figure and of CommStats."""
    try:
        emu.check_available()
    except emu.EmulationUnavailable as err:
        pytest.skip(f"emulated cluster unavailable: {err}")
    cmd = [
        sys.executable, "-m", "benchmarks.strategies", "--nodes", "2", "--ranks-per-node", "2",
        "--bandwidth", "1gbit", "--accumulation", "1", "--repeats", "1", "--steps", "1",
        "--seq-len", "16", "--micro-batch", "2", "--out", str(tmp_path),
        "--log-dir", str(tmp_path / "logs"), "--timeout", "150", "--overlap",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode == emu.SKIP_EXIT_CODE:
        pytest.skip(f"emulated cluster unavailable: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    doc = json.loads((tmp_path / "strategies_2x2.json").read_text())
    assert set(S.DOC_KEYS) <= doc.keys()
    assert doc["schema"] == S.SCHEMA and doc["schema_version"] == S.SCHEMA_VERSION
    assert len(doc["runs"]) == 8  # 6 layouts + the spanning pair with forward_prefetch
    for run in doc["runs"]:
        assert set(S.RUN_KEYS) <= run.keys(), set(S.RUN_KEYS) - run.keys()
        assert run["nodes"] == 2 and run["ranks_per_node"] == 2 and run["bandwidth"] == "1gbit"
        assert run["global_batch"] == 2 * 4 * run["accumulation"] and run["seq_len"] == 16
        assert len(run["step_times_s"]) == 1 and len(run["step_times_s"][0]) == 1
        assert run["median_step_time_s"] > 0 and run["tokens_per_s"] > 0
        b = run["inter_node_bytes_per_step"]
        for key in ("kernel", "kernel_frames", "commstats_logical", "commstats_wire", "analytic"):
            assert isinstance(b[key], float | int), key
        assert b["kernel"] == pytest.approx(b["analytic"], rel=0.05), run["label"]
        assert b["commstats_wire"] == pytest.approx(b["analytic"], rel=0.01), run["label"]
        mem = run["memory_per_rank_bytes"]
        assert mem["total"] == mem["params"] + mem["grads"] + mem["optimizer_state"]
    # the model-state share shrinks as 1/partition_size (within padding)
    by_label = {r["label"]: r for r in doc["runs"]}
    ddp = by_label["ddp"]["memory_per_rank_bytes"]["params"]
    for label, p in (("mics p=2", 2), ("fsdp (ZeRO-3, p=4)", 4), ("mics p=4 hier", 4)):
        assert by_label[label]["memory_per_rank_bytes"]["params"] == pytest.approx(
            ddp / p, rel=0.01
        )
    # forward_prefetch (+async) changes when the all-gathers run, not what they move
    for kind in ("flat", "hier"):
        blocking, prefetch = by_label[f"mics p=4 {kind}"], by_label[f"mics p=4 {kind} +async"]
        assert prefetch["async_unshard_prefetch"] and not blocking["async_unshard_prefetch"]
        assert prefetch["collectives_per_step"] == blocking["collectives_per_step"]
        assert (
            prefetch["inter_node_bytes_per_step"]["commstats_logical"]
            == blocking["inter_node_bytes_per_step"]["commstats_logical"]
        )
    md = (tmp_path / "strategies.md").read_text()
    assert "| strategy |" in md and "mics p=4 hier" in md
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (the dev extra)")
    png = (tmp_path / "strategies.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
