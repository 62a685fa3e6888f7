"""Checks that need CUDA GPUs and NCCL; skipped (with the reason) everywhere else.

Run them with ``tests/gpu/run_gpu_checks.sh`` on a machine with GPUs and a CUDA build of
torch. They use as many GPUs as there are, up to 8:

- 1 GPU: world 1 only (NCCL, CUDA compute, no cross-rank reduction);
- 2-3 GPUs: world 2: one partition of 2 (reduce-scatter ``AVG``) and pure replication
  (all-reduce ``AVG``);
- 4-7 GPUs: world 4: flat partitions of 2 with 2 replicas, and a hierarchical partition
  of 4 spanning 2 emulated nodes of 2;
- 8+ GPUs: world 8: the layouts of ``tests/test_reduce_ops.py`` (flat with 4 replicas,
  hierarchical with 2).

Each layout runs with FSDP's default ops and with a custom gradient divide factor
(``PREMUL_SUM``). Multi-rank reductions, and so every NCCL ``AVG`` / ``PREMUL_SUM``
path, need at least 2 GPUs; the hierarchical reduce-scatter needs at least 4.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.launch import run_script
from tests.scripts.reduce_op_checks import Config, expected_ops

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and dist.is_nccl_available()),
    reason="needs CUDA GPUs and NCCL (run tests/gpu/run_gpu_checks.sh on a GPU machine; "
    "multi-rank checks need >= 2 GPUs)",
)

#: GPU kernels vs the CPU reference (no TF32): rounding only. A reduction scaled twice
#: or not at all is off by ~3e-2 after these 3 steps (measured on CPU).
TOL = 1e-4


def gpu_world() -> int:
    count = torch.cuda.device_count()
    return 8 if count >= 8 else 4 if count >= 4 else 2 if count >= 2 else 1


def gpu_configs(world: int) -> list[Config]:
    if world == 1:
        layouts = [(1, 1)]
    elif world == 2:
        layouts = [(2, 2), (1, 1)]  # one partition of 2; pure replication over 2
    elif world == 4:
        layouts = [(2, 2), (2, 4)]  # flat, 2 replicas; hierarchical, 1 replica
    else:
        layouts = [(2, 2), (2, 4)]  # flat, 4 replicas; hierarchical, 2 replicas
    reductions = ["default"] if world == 1 else ["default", "divide"]
    return [Config(k, p, 2, r) for k, p in layouts for r in reductions]


def test_nccl_reduce_ops_match_reference() -> None:
    world = gpu_world()
    configs = gpu_configs(world)
    text = ",".join(
        f"{c.ranks_per_node}:{c.partition_size}:{c.accum}:{c.reduction}" for c in configs
    )
    report = run_script(
        "reduce_op_checks.py", world, "--backend", "nccl", "--configs", text, timeout=600
    )
    assert report["backend"] == "nccl" and report["world"] == world
    for cfg in configs:
        result = report[str(cfg)]
        assert result["param_diff"] <= TOL and result["loss_diff"] <= TOL, (str(cfg), result)
        assert set(result["ops"]) == expected_ops(world, cfg), (str(cfg), result["ops"])
        hierarchical = cfg.partition_size > cfg.ranks_per_node > 1
        if cfg.partition_size > 1:
            expected = "HierarchicalReduceScatter" if hierarchical else "RecordingReduceScatter"
            assert result["comms"] == [expected], (str(cfg), result["comms"])


def test_nccl_forward_prefetch_matches_reference() -> None:
    """``forward_prefetch=True`` on NCCL: asynchronous unshard (FSDP issues all-gathers on
    the current stream and waits on the returned ``Work``; the hierarchical all-gather
    runs its intra-node stage inside ``wait()``) trains like the reference."""
    world = gpu_world()
    if world < 2:
        pytest.skip("needs >= 2 GPUs (the hierarchical all-gather: >= 4)")
    configs = [Config(2, 2, 2)] + ([Config(2, 4, 2)] if world >= 4 else [])
    text = ",".join(f"{c.ranks_per_node}:{c.partition_size}:{c.accum}" for c in configs)
    report = run_script(
        "reduce_op_checks.py",
        world,
        "--backend",
        "nccl",
        "--configs",
        text,
        "--forward-prefetch",
        timeout=600,
    )
    for cfg in configs:
        result = report[str(cfg)]
        assert result["param_diff"] <= TOL and result["loss_diff"] <= TOL, (str(cfg), result)


def test_cpu_offload_on_gpu() -> None:
    """Offload keeps sharded parameters (pinned), gradients and optimizer state on the
    host, computes on the GPU, and frees the GPU copies after use."""
    world = gpu_world()
    report = run_script("../gpu/offload_checks.py", world, timeout=600)
    off, plain = report["offload=True"], report["offload=False"]
    assert off["policies"] == ["CPUOffloadPolicy"] and off["offload_to_cpu"] == [True], off
    assert off["param_devices"] == ["cpu"] and off["params_pinned"] == [True], off
    assert off["grad_devices"] == ["cpu"] and off["num_grads"] == off["num_params"], off
    assert off["optimizer_state_devices"] == ["cpu"], off
    assert off["num_optimizer_states"] == 2 * off["num_params"], off  # AdamW: 2 per param
    # without offload the same states live on the GPU (the checks above can tell)
    assert plain["policies"] == ["OffloadPolicy"], plain
    for key in ("param_devices", "grad_devices", "optimizer_state_devices"):
        assert plain[key] == ["cuda"], (key, plain)
    shard = off["shard_bytes"]
    # freed after use: between steps, offload keeps none of the 3 shard-sized states
    # (parameters, exp_avg, exp_avg_sq) nor any gathered copy on the GPU ...
    assert plain["resident_bytes"] - off["resident_bytes"] >= 0.9 * 3 * shard, report
    # ... at most FSDP's last reduce-scatter buffer (one unit's gradients) stays
    assert off["resident_bytes"] <= 2 * off["largest_block_bytes"] + 2**20, off
    # ... while the compute did run on the GPU: a whole block was gathered there
    assert off["peak_bytes"] >= off["largest_block_bytes"], off
    assert report["offload_vs_plain_param_diff"] <= 1e-5, report


def test_trainer_checks_on_gpu() -> None:
    """``Trainer(sync_batchnorm=True)`` matches DDP, setup's peak memory stays below the
    unsharded model, and fit -> test -> fit keeps training on the GPU
    (``tests/gpu/trainer_checks.py``; the first two need >= 2 GPUs)."""
    import json
    import subprocess
    import sys

    from tests.launch import REPO

    world = min(torch.cuda.device_count(), 8)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world}",
            str(REPO / "tests" / "gpu" / "trainer_checks.py"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and results, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert all(r["ok"] for r in results), results
