"""The cost model and planner (`lightning_mics.planner`, ``lightning-mics plan``).

Worked examples whose arithmetic is spelled out here: partition choice from a memory
budget, ring and hierarchical collectives, the overlap schedule; plus the command line
against the published reference points and ``strategy.partition_size=auto``. Pure
arithmetic: the whole file runs in seconds.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from lightning_mics.planner import (
    ClusterSpec,
    GroupLayout,
    Kind,
    ModelSpec,
    StrategySpec,
    TrainingSpec,
    choose_partition,
    hierarchical,
    make_plan,
    memory_breakdown,
    predict_step,
    ring,
    valid_partition_sizes,
)
from lightning_mics.planner.cost_model import _schedule, _Unit, padded_numel
from lightning_mics.planner.specs import GIB

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# GPT-3 XL's shape: 24 layers x 2048, 16 heads, vocabulary 50304, sequence 2048, biases,
# tied embedding. Every dimension is divisible by 16, so FSDP pads nothing at p <= 16.
H, L, V, T = 2048, 24, 50304, 2048
XL = ModelSpec("gpt", n_layer=L, n_head=16, n_embd=H, vocab_size=V, block_size=T)
BLOCK = 12 * H * H + 13 * H  # qkv 3h^2+3h, proj h^2+h, fc 4h^2+4h, proj 4h^2+h, 2 LNs 4h
ROOT = V * H + T * H + 2 * H  # token + position embeddings, final LN (head tied)
N = L * BLOCK + ROOT
#: bf16 gathered parameters and compute, fp32 master weights and gradient reduction.
RUN = TrainingSpec(
    micro_batch=1,
    seq_len=T,
    precision="32-true",
    param_dtype="bf16",
    reduce_dtype="fp32",
    activation_checkpointing=True,
)


def gpu_cluster(nodes: int, k: int, memory_gib: float, reserved_gib: float) -> ClusterSpec:
    return ClusterSpec(
        name="test",
        nodes=nodes,
        ranks_per_node=k,
        peak_tflops=312,
        intra_node_gbps=2400,
        inter_node_gbps=400,
        gpu_memory_gib=memory_gib,
        reserved_gib=reserved_gib,
        fragmentation=0.0,
    )


# ------------------------------------------------------------------------------ model
def test_parameter_count_and_flops_formulas():
    assert XL.block_params == BLOCK == 50_358_272
    assert XL.root_params == ROOT == 107_220_992
    assert XL.num_params == N == 1_315_819_520
    # forward FLOPs of a block: 24 t h^2 (weight matmuls) + 4 b s^2 h (attention)
    assert XL.block_forward_flops(1, T) == 24 * T * H * H + 4 * T * T * H
    # Megatron-LM: 72 b s l h^2 (1 + s/6h + V/12lh) model FLOPs per micro-batch
    megatron = 72 * T * L * H * H * (1 + T / (6 * H) + V / (12 * L * H))
    assert XL.model_flops(1, T) == pytest.approx(megatron, rel=1e-12)
    # recomputation adds one forward of every block: 96 b s l h^2 (1 + s/6h + V/16lh)
    megatron_ckpt = 96 * T * L * H * H * (1 + T / (6 * H) + V / (16 * L * H))
    assert XL.hardware_flops(1, T, True) == pytest.approx(megatron_ckpt, rel=1e-12)


def test_parameter_shapes_match_the_recipes_networks():
    """The shapes per FSDP unit are the recipes' GPT and BERT exactly."""
    torch = pytest.importorskip("torch")
    from recipes.bert import BERT, BERTConfig
    from recipes.gpt import GPT, GPTConfig

    for bias, tie in ((True, True), (False, False)):
        spec = ModelSpec("gpt", 3, 4, 64, 300, 32, bias=bias, tie_weights=tie)
        with torch.device("meta"):
            net = GPT(GPTConfig(300, 32, 3, 4, 64, bias=bias, tie_weights=tie))
        block = [tuple(p.shape) for p in net.transformer.h[0].parameters()]
        assert block == spec.block_shapes()
        assert net.num_parameters() == spec.num_params
    spec = ModelSpec("bert", 2, 4, 64, 300, 32, tie_weights=True)
    with torch.device("meta"):
        net = BERT(BERTConfig(300, 32, 2, 2, 4, 64))
    assert [tuple(p.shape) for p in net.encoder[0].parameters()] == spec.block_shapes()
    assert net.num_parameters() == spec.num_params


def test_padding_is_fsdp_dim0_padding():
    # a (10, 3) matrix over 4 shards: dim 0 padded to 12 -> 36 elements; a (5,) bias -> 8
    assert padded_numel([(10, 3), (5,)], 4) == 12 * 3 + 8


def test_specs_validate_themselves():
    with pytest.raises(ValueError, match="n_embd"):
        ModelSpec("gpt", 2, 3, 64, 100, 16)
    with pytest.raises(ValueError, match="arch"):
        ModelSpec("t5", 2, 2, 64, 100, 16)
    with pytest.raises(ValueError, match="inter_node_efficiency"):
        replace(gpu_cluster(1, 8, 40, 1), inter_node_efficiency=1.5)
    with pytest.raises(ValueError, match="backend"):
        replace(gpu_cluster(1, 8, 40, 1), backend="mpi")
    with pytest.raises(ValueError, match="micro_batch"):
        TrainingSpec(micro_batch=0, seq_len=16)
    with pytest.raises(ValueError, match="dtype"):
        TrainingSpec(micro_batch=1, seq_len=16, param_dtype="fp8")
    with pytest.raises(ValueError, match="activation_checkpointing"):
        TrainingSpec(micro_batch=1, seq_len=16, activation_checkpointing="yes")
    with pytest.raises(ValueError, match="partition_size"):
        StrategySpec("mics")
    with pytest.raises(ValueError, match="accumulation"):
        StrategySpec("mics", partition_size=8, accumulation="sometimes")


# --------------------------------------------------------------------------- memory
#: What every partition size needs besides the sharded states, in the examples below
#: (bytes, micro-batch 1 x 2048 tokens, bf16 activations c = 2):
#: activations with checkpointing: block inputs L s h c + one block recomputed 34 s h
#: + logits s V (c + 8, fp32 log-softmax and its gradient) + embedding output s h c
ACT_CKPT = L * T * H * 2 + 34 * T * H + T * V * 10 + T * H * 2
#: activations without: L x 34 s h + the same output layer
ACT_FULL = L * 34 * T * H + T * V * 10 + T * H * 2
#: the root and two blocks gathered in bf16
GATHERED = (ROOT + 2 * BLOCK) * 2
#: the root's bf16 gradients, one block's bf16 gradients and fp32 reduce-scatter input
GRAD_BUFFERS = ROOT * 2 + BLOCK * (2 + 4)
STATES = 16 * N  # fp32 weights, gradients, two AdamW moments


def test_memory_breakdown_arithmetic():
    assert ACT_CKPT == 1_382_547_456
    assert ACT_FULL == 4_461_166_592
    cluster = gpu_cluster(1, 8, 40, 1)
    mem = memory_breakdown(XL, cluster, RUN, StrategySpec.mics(4))
    assert mem.parameters == N / 4 * 4
    assert mem.optimizer_states == N / 4 * 8
    assert mem.model_states == STATES / 4
    assert mem.activations == ACT_CKPT
    assert mem.activations_without_checkpointing == ACT_FULL
    assert mem.gathered_parameters == GATHERED
    assert mem.gradient_buffers == GRAD_BUFFERS
    assert mem.communication_buffers == 0  # inside a node: no hierarchical staging
    assert mem.total == STATES / 4 + ACT_CKPT + GATHERED + GRAD_BUFFERS
    assert mem.capacity == 39 * GIB


def test_planner_picks_smallest_partition_that_fits_in_a_node():
    """16 GiB GPUs, 1 GiB reserved: 15 GiB = 16,106,127,360 B usable.

    p = 1: 21.05e9 (states) + 2.32e9 (activations + buffers) = 23.37e9: too big.
    p = 2: 10.53e9 + 2.32e9 = 12.84e9: fits.
    """
    cluster = gpu_cluster(4, 8, 16, 1)
    fixed = ACT_CKPT + GATHERED + GRAD_BUFFERS
    assert fixed == 2_315_014_144
    assert STATES / 1 + fixed > 15 * GIB
    assert STATES / 2 + fixed <= 15 * GIB
    choice = choose_partition(XL, cluster, RUN, micro_batch=1, activation_checkpointing=True)
    assert choice.partition_size == 2
    assert not choice.hierarchical
    assert choice.memory.total == STATES / 2 + fixed
    assert "partition_size=1 would need" in choice.explanation


def test_planner_auto_checkpointing_and_micro_batch():
    """Same cluster, the planner choosing checkpointing and micro-batch.

    Without checkpointing at p = 2: 10.53e9 + 4.46e9 (activations) + 0.93e9 (buffers)
    = 15.92e9 <= 16.11e9: fits, so checkpointing stays off. Asking for micro-batch 2:
    without checkpointing 2 x 4.46e9 activations do not fit at p = 2; with it
    2 x 1.38e9 do (14.2e9), and the planner prefers the larger micro-batch.
    """
    cluster = gpu_cluster(4, 8, 16, 1)
    buffers = GATHERED + GRAD_BUFFERS
    assert STATES / 2 + ACT_FULL + buffers == 15_920_189_440 <= 15 * GIB
    choice = choose_partition(XL, cluster, RUN, activation_checkpointing=None)
    assert (choice.partition_size, choice.training.activation_checkpointing) == (2, False)

    two = replace(RUN, micro_batch=2, accumulation=4)
    assert STATES / 2 + 2 * ACT_FULL + buffers > 15 * GIB
    assert STATES / 2 + 2 * ACT_CKPT + buffers <= 15 * GIB
    choice = choose_partition(XL, cluster, two, activation_checkpointing=None)
    assert choice.partition_size == 2
    assert choice.training.micro_batch == 2
    assert choice.training.activation_checkpointing is True
    assert choice.training.accumulation == 4


def test_planner_spans_nodes_when_a_node_is_too_small():
    """2 GPUs per node of 5 GiB, 0.5 GiB reserved: 4.5 GiB = 4,831,838,208 B usable.

    Partitions spanning nodes use hierarchical collectives, whose staging buffers hold
    1/k of two gathered blocks (bf16) and of one reduce-scatter input (fp32):
    (2 x 2 + 4) x BLOCK / 2 = 201,433,088 B.
    p = 8:  16 N / 8  + 2,315,014,144 + 201,433,088 = 5,148,086,272: too big;
    p = 16: 16 N / 16 + 2,315,014,144 + 201,433,088 = 3,832,266,752: fits.
    """
    cluster = gpu_cluster(16, 2, 5, 0.5)
    staging = (2 * 2 + 4) * BLOCK // 2
    fixed = ACT_CKPT + GATHERED + GRAD_BUFFERS + staging
    assert STATES / 8 + fixed == 5_148_086_272 > 4.5 * GIB
    assert STATES / 16 + fixed == 3_832_266_752 <= 4.5 * GIB
    choice = choose_partition(XL, cluster, RUN, micro_batch=1, activation_checkpointing=True)
    assert choice.partition_size == 16
    assert choice.hierarchical
    assert choice.memory.communication_buffers == staging
    assert choice.memory.total == STATES / 16 + fixed


def test_planner_reports_when_nothing_fits():
    cluster = gpu_cluster(1, 2, 2, 0.5)
    choice = choose_partition(XL, cluster, RUN)
    assert choice.partition_size is None
    assert "nothing fits" in choice.explanation


def test_valid_partition_sizes_are_mics_layouts():
    assert valid_partition_sizes(32, 8) == [1, 2, 4, 8, 16, 32]
    assert valid_partition_sizes(48, 8) == [1, 2, 4, 8, 16, 24, 48]


# ---------------------------------------------------------------------- collectives
def link_cluster(backend: str = "nccl", nodes: int = 4, k: int = 2) -> ClusterSpec:
    """1 Gbps = 125e6 B/s per node, 80 Gbps = 1e10 B/s per GPU inside a node, 10 us per
    inter-node ring step, 1 us inside a node, links at 100% of nominal."""
    return ClusterSpec(
        name="links",
        nodes=nodes,
        ranks_per_node=k,
        peak_tflops=1,
        intra_node_gbps=80,
        inter_node_gbps=1,
        intra_node_efficiency=1.0,
        inter_node_efficiency=1.0,
        intra_node_latency_us=1,
        inter_node_latency_us=10,
        collective_overhead_us=0,
        backend=backend,
    )


B = 1_000_000  # bytes


def test_ring_all_gather_across_nodes():
    """4 ranks on 2 nodes: 3 steps x 10 us; each node sends (3/4) B = 750 kB over its
    1 Gbps link: 6 ms; inside a node a rank sends 750 kB at 10 GB/s (75 us, hidden)."""
    c = link_cluster()
    cost = ring(Kind.ALL_GATHER, B, GroupLayout.strided(4, 1, 2), c)
    assert cost.steps == 3
    assert cost.inter_node_bytes_per_node == 750_000
    assert cost.intra_node_bytes_per_rank == 750_000
    assert cost.time == pytest.approx(3 * 10e-6 + 750_000 / 125e6)


def test_ring_all_gather_inside_a_node():
    """2 ranks of one node: 1 step x 1 us + (1/2) B at 10 GB/s; no inter-node bytes."""
    cost = ring(Kind.ALL_GATHER, B, GroupLayout.strided(2, 1, 2), link_cluster())
    assert cost.inter_node_bytes_per_node == 0
    assert cost.time == pytest.approx(1e-6 + 500_000 / 1e10)


def test_reduce_scatter_is_an_all_reduce_on_gloo():
    """NCCL: a ring reduce-scatter, (g-1)/g B; gloo: an all-reduce, 2 (g-1)/g B, 2 (g-1)
    steps."""
    layout = GroupLayout.strided(4, 1, 2)
    nccl = ring(Kind.REDUCE_SCATTER, B, layout, link_cluster("nccl"))
    gloo = ring(Kind.REDUCE_SCATTER, B, layout, link_cluster("gloo"))
    assert (nccl.steps, nccl.inter_node_bytes_per_node) == (3, 750_000)
    assert (gloo.steps, gloo.inter_node_bytes_per_node) == (6, 1_500_000)
    assert gloo.time == pytest.approx(6 * 10e-6 + 1_500_000 / 125e6)


def test_hierarchical_all_gather_sends_p_minus_k_over_p():
    """p = 8 on 4 nodes of k = 2. Flat ring: each node sends (7/8) B = 875 kB, 7 steps.
    Hierarchical: stage 1, k = 2 inter-node rings of n = 4 ranks per node, each of output
    B/k, so a node sends 2 x (3/4) x 500 kB = 750 kB = (p-k)/p B in 3 steps; stage 2, as
    lightning_mics.collectives issues it: B = 1 MB <= 1 MiB, so one intra-node
    all-gather over 2 ranks of B (1 step, (1/2) B at 10 GB/s); a 4 MB buffer takes
    n = 4 of B/n each (one per node's block): 4 x 1 step, 4 x (1/2) B/4."""
    c = link_cluster()
    flat = ring(Kind.ALL_GATHER, B, GroupLayout.strided(8, 1, 2), c)
    assert flat.inter_node_bytes_per_node == 875_000
    assert flat.time == pytest.approx(7 * 10e-6 + 875_000 / 125e6)
    hier = hierarchical(Kind.ALL_GATHER, B, 8, c)
    assert hier.inter_node_bytes_per_node == 750_000 == (8 - 2) / 8 * B
    stage1 = 3 * 10e-6 + 750_000 / 125e6
    stage2 = 1e-6 + 500_000 / 1e10
    assert hier.time == pytest.approx(stage1 + stage2)
    big = hierarchical(Kind.ALL_GATHER, 4 * B, 8, c)
    assert big.inter_node_bytes_per_node == 4 * 750_000
    stage1 = 3 * 10e-6 + 4 * 750_000 / 125e6
    stage2 = 4 * (1e-6 + 500_000 / 1e10)
    assert big.time == pytest.approx(stage1 + stage2)
    # each collective call also pays the fixed overhead: 1 inter + 1 (4) intra calls
    slow = replace(c, collective_overhead_us=100)
    assert hierarchical(Kind.ALL_GATHER, B, 8, slow).time == pytest.approx(hier.time + 2e-4)
    assert hierarchical(Kind.ALL_GATHER, 4 * B, 8, slow).time == pytest.approx(big.time + 5e-4)
    assert ring(Kind.ALL_GATHER, B, GroupLayout.strided(8, 1, 2), slow).time == pytest.approx(
        flat.time + 1e-4
    )
    # reduce-scatter mirrors it (intra first), the same bytes and time on NCCL
    rs = hierarchical(Kind.REDUCE_SCATTER, B, 8, c)
    assert rs.inter_node_bytes_per_node == 750_000
    assert rs.time == pytest.approx(hier.time)


def test_replica_all_reduce_layouts():
    """Replication groups of partitions of p = 4 on nodes of k = 2 (world 16): R = 4
    members with stride 4, each on its own node, 2 groups per node (one per local index):
    a node sends 2 x 2 (R-1)/R x S. With p = 1 < k the 2 members per node sit together:
    8 nodes, 1 crossing per node and group, p = 1 group."""
    c = link_cluster(nodes=8, k=2)
    layout = GroupLayout.strided(4, 4, 2)
    assert (layout.members_per_node, layout.nodes, layout.groups_per_node) == (1, 4, 2)
    cost = ring(Kind.ALL_REDUCE, B, layout, c)
    assert cost.inter_node_bytes_per_node == 2 * 2 * 3 / 4 * B
    assert cost.steps == 6
    layout = GroupLayout.strided(16, 1, 2)
    assert (layout.members_per_node, layout.nodes, layout.groups_per_node) == (2, 8, 1)


def test_schedule_overlaps_on_nccl_and_serialises_on_gloo():
    """Three units, all-gather 1 and compute 2 each: prefetch hides all but the first
    all-gather (1 + 3 x 2 = 7); communication-bound (3 and 1): 3 x 3 + the last compute
    (10). Serial (gloo): the plain sum."""
    units = [_Unit(gather=1, compute=2) for _ in range(3)]
    assert _schedule(units, overlap=True) == 7
    assert _schedule(units, overlap=False) == 9
    units = [_Unit(gather=3, compute=1) for _ in range(3)]
    assert _schedule(units, overlap=True) == 10
    # a reduction issued after a unit's compute delays the next unit's all-gather
    units = [_Unit(gather=1, compute=2, reduce=5), _Unit(gather=1, compute=2, prefetch=False)]
    assert _schedule(units, overlap=True) == 1 + 2 + 5 + 1 + 2
    # gloo with asynchronous unshard: the next all-gather (prefetched at t=1) overlaps,
    # but the compute waits for its reduce-scatter (3..6) before the next unit (6..8)
    units = [_Unit(gather=1, compute=2, reduce=3), _Unit(gather=1, compute=2)]
    assert _schedule(units, overlap=True, blocking_reduce=True) == 8
    assert _schedule(units, overlap=True, blocking_reduce=False) == 6


def test_gloo_step_is_compute_plus_every_collective():
    c = link_cluster("gloo")
    t = TrainingSpec(2, 64, accumulation=2, precision="32-true")
    m = ModelSpec("gpt", 2, 2, 64, 128, 64)
    pred = predict_step(m, c, t, StrategySpec.mics(4, hierarchical=True))
    assert pred.step_time == pytest.approx(pred.compute_time + pred.communication_time)
    # two-hop: 2 replicas, the cross-replica all-reduces only on the last micro-step
    counts = {col.name: col.count for col in pred.collectives}
    assert counts["all-gather block (forward)"] == 2 * 2
    assert counts["all-gather block (backward)"] == 2 * 2
    assert counts["reduce-scatter block"] == 2 * 2
    assert counts["all-reduce block (replicas)"] == 2
    assert "all-gather root (backward)" not in counts
    hsdp = predict_step(m, c, t, StrategySpec.hsdp(2))
    assert {col.name: col.count for col in hsdp.collectives}["all-reduce block (replicas)"] == 4


def test_inter_node_bytes_match_the_benchmark_wire_model():
    """Same bytes as benchmarks.analytic (the model the kernel counters validated)."""
    analytic = pytest.importorskip("benchmarks.analytic")
    m = ModelSpec("gpt", 4, 4, 128, 260, 128)
    units = analytic.gpt_units(260, 128, 4, 128, bias=True, tie_weights=True)
    for nodes, k in ((2, 2), (4, 2)):
        c = link_cluster("gloo", nodes, k)
        world = nodes * k
        for acc in (1, 4):
            t = TrainingSpec(8, 128, acc, precision="32-true")
            ddp = predict_step(m, c, t, StrategySpec.ddp()).inter_node_bytes
            assert ddp == analytic.ddp_step_bytes(units, nodes, k).total
            cases = [
                (StrategySpec.zero3(), world, False, "every_micro_step"),
                (StrategySpec.hsdp(k), k, False, "every_micro_step"),
                (StrategySpec.mics(k), k, False, "two_hop"),
                (StrategySpec.mics(2 * k, hierarchical=False), 2 * k, False, "two_hop"),
                (StrategySpec.mics(2 * k, hierarchical=True), 2 * k, True, "two_hop"),
            ]
            for spec, p, hier, mode in cases:
                layout = analytic.Layout(nodes, k, p, hier)
                expected = analytic.fsdp_step_bytes(units, layout, acc, mode, "gloo").total
                assert predict_step(m, c, t, spec).inter_node_bytes == pytest.approx(expected)


def test_mics_beats_zero3_where_the_network_is_slow():
    """Partition = node: only the once-per-step all-reduce crosses nodes, so MiCS sends
    far fewer inter-node bytes than ZeRO-3 and, communication-bound, is faster."""
    c = replace(link_cluster("nccl", nodes=4, k=8), peak_tflops=100)
    t = TrainingSpec(1, 1024, accumulation=8, precision="bf16-mixed", param_dtype="bf16")
    m = ModelSpec("gpt", 12, 12, 768, 50304, 1024)
    mics = predict_step(m, c, t, StrategySpec.mics(8))
    zero3 = predict_step(m, c, t, StrategySpec.zero3())
    assert mics.inter_node_bytes < zero3.inter_node_bytes / 5
    assert mics.step_time < zero3.step_time


# --------------------------------------------------------------------- plan + CLI
def test_plan_weak_scaling_is_near_linear_for_mics():
    cluster = gpu_cluster(64, 8, 40, 1.5)
    big = ModelSpec("gpt", 80, 80, 10240, 50304, 2048)
    t = replace(RUN, accumulation=4)
    plan = make_plan(big, cluster, t, micro_batch=1, activation_checkpointing=True)
    assert plan.choice.partition_size is not None
    assert [r.nodes for r in plan.scaling] == [16, 32, 64]
    mics = plan.weak_scaling("mics")
    zero3 = plan.weak_scaling("zero3_deepspeed")
    assert mics[-1] > 0.97
    assert zero3[-1] < mics[-1]


def test_cli_plan_prints_the_reference_comparison(capsys):
    pytest.importorskip("hydra")
    from lightning_mics.cli import main

    code = main(
        ["plan", "--model", "gpt_100b", "--cluster", "p4d_24xlarge", "--nodes", "64",
         "--config-dir", str(CONF)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "partition_size = " in out
    assert "hierarchical all-gathers/reduce-scatters ON" in out
    assert "Memory per GPU" in out and "optimizer states (AdamW, sharded)" in out
    assert "without checkpointing" in out
    assert "fsdp (ZeRO-3)" in out and "mics p=" in out
    assert "Weak scaling" in out
    assert "published 170 TFLOPS per GPU (54.5% of peak)" in out
    assert "weak scaling 128 -> 512 GPUs: published MiCS 99.4%, ZeRO-3 72%" in out
    assert "strategy.param_dtype=bf16" in out  # bf16-mixed gathers fp32 parameters
    code = main(["plan", "--experiment", "gpt_100b_p4d", "--config-dir", str(CONF)])
    out = capsys.readouterr().out
    assert code == 0
    assert "published MiCS 99.4%, ZeRO-3 72%; predicted MiCS" in out
    assert "why: per micro-step each node sends" in out


def test_cli_plan_experiment_175b(capsys):
    pytest.importorskip("hydra")
    from lightning_mics.cli import main

    code = main(["plan", "--experiment", "gpt_175b_p4de", "--config-dir", str(CONF)])
    out = capsys.readouterr().out
    assert code == 0
    assert "partition_size = 64" in out  # 175B x 16 B = 2.8 TB: 32 x 80 GB do not hold it
    assert "published 169 TFLOPS per GPU" in out


def test_cli_plan_overrides_and_errors(capsys):
    pytest.importorskip("hydra")
    from lightning_mics.cli import main

    code = main(
        ["plan", "--model", "gpt_1b3", "--cluster", "p4d_24xlarge", "--nodes", "2",
         "--micro-batch", "4", "--seq-len", "1024", "--accumulation", "2",
         "--precision", "bf16-mixed", "--param-dtype", "bf16", "--activation-checkpointing",
         "off", "--set", "compute_efficiency=0.5", "--config-dir", str(CONF)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "micro-batch 4 x 1024 tokens x 2 micro-steps" in out
    assert "activation checkpointing off" in out
    assert "Published reference" not in out
    assert main(["plan", "--model", "no_such_model", "--config-dir", str(CONF)]) == 2
    assert main(["plan", "--cluster", "p4d_24xlarge", "--config-dir", str(CONF)]) == 2
    assert main(["plan", "--model", "gpt_1b3", "--set", "warp=9", "--config-dir", str(CONF)]) == 2
    # a sequence longer than the model's positions grows them
    assert main(["plan", "--model", "gpt_125m", "--seq-len", "4096", "--config-dir", str(CONF),
                 "cluster=p4d_24xlarge"]) == 0  # fmt: skip
    assert "x 4096 tokens" in capsys.readouterr().out


def test_choose_partition_size_from_a_recipe_config():
    pytest.importorskip("hydra")
    from lightning_mics.planner.configs import choose_partition_size, compose

    cfg = compose(CONF, ["experiment=gpt_175b_p4de"])
    p, why, choice = choose_partition_size(cfg)
    assert p == 64
    assert choice.hierarchical
    assert "partition_size=64" in why


def test_validation_script_on_a_synthetic_result(tmp_path):
    """The validator reads the benchmark's schema: a result whose 'measurements' are the
    cost model's own predictions validates exactly."""
    validate = pytest.importorskip("benchmarks.validate_cost_model")
    machine = validate.Machine()  # the a-priori constants: `--calibrate none` is exact
    model_config = dict(vocab_size=260, block_size=64, n_layer=2, n_head=2, n_embd=64)
    runs = []
    for bw in (25e6, 125e6):
        for strategy, p, hier, mode in (
            ("ddp", 1, False, "no_sync"),
            ("fsdp", 4, False, "every_micro_step"),
            ("hsdp", 2, False, "every_micro_step"),
            ("mics", 2, False, "two_hop"),
            ("mics", 4, True, "two_hop"),
        ):
            record = dict(
                strategy=strategy, label=f"{strategy} p={p}", nodes=2, ranks_per_node=2,
                world_size=4, partition_size=p, hierarchical=hier, accumulation=2,
                accumulation_mode=mode, bandwidth=f"{bw * 8 / 1e6:g}mbit",
                bandwidth_bytes_per_s=bw, model="tiny", model_config=model_config,
                micro_batch=4, seq_len=64,
            )  # fmt: skip
            pred = validate.predict(record, 2, machine)
            record["median_step_time_s"] = pred.step_time
            record["inter_node_bytes_per_step"] = {"kernel": pred.inter_node_bytes}
            runs.append(record)
    path = tmp_path / "strategies_2x2.json"
    path.write_text(json.dumps({"machine": {"cpus": 2}, "runs": runs}))
    assert validate.main([str(path)]) == 0
    rows, machines, _ = validate.validate([path], "none")
    assert all(abs(r.bytes_error) < 1e-9 for r in rows)
    assert all(abs(r.time_error) < 1e-9 for r in rows)
    # fitted on the fast runs only, the slow ones out of sample
    rows, machines, _ = validate.validate([path], "fastest")
    assert {r.calibration for r in rows if r.bandwidth == "1000mbit"} == {True}
    assert {r.calibration for r in rows if r.bandwidth == "200mbit"} == {False}
    assert all(abs(r.time_error) < 0.1 for r in rows)
    assert (tmp_path / "strategies_2x2_cost_model.md").read_text().count("| tiny") == 0
    assert math.isfinite(machines[path.name].core_gflops)


def test_partition_size_auto_in_the_recipes():
    """``strategy.partition_size=auto`` resolves, in the recipes' config check, to the
    planner's choice: 64 for GPT-3 175B on 16 p4de (80 GB), one emulated node on the
    laptop config (no GPU memory to check)."""
    pytest.importorskip("hydra")
    from lightning_mics.planner.configs import compose
    from recipes.config import ConfigError, validate_config

    cfg = compose(CONF, ["experiment=gpt_175b_p4de", "strategy.partition_size=auto"])
    plan = validate_config(cfg)
    assert cfg.strategy.partition_size == 64
    assert (plan.shard_size, plan.replicas) == (64, 2)

    cfg = compose(CONF, ["experiment=laptop_gpt", "strategy.partition_size=auto"])
    validate_config(cfg)
    assert cfg.strategy.partition_size == 2  # cluster.ranks_per_node of local_cpu

    # nothing fits: 175B on 2 p4de nodes (16 x 80 GB < 2.8 TB of model states)
    cfg = compose(
        CONF, ["experiment=gpt_175b_p4de", "strategy.partition_size=auto", "trainer.num_nodes=2"]
    )
    with pytest.raises(ConfigError, match="nothing fits"):
        validate_config(cfg)
