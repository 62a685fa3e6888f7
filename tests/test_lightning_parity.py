"""Trainer and Fabric runs under MiCS match a single-process run of the same global batch.

World 4 is emulated as 2 nodes x 2 ranks (partition 1 / 2 = one node / 4 = both nodes);
world 8 adds several replicas. fp32 tolerance: 1e-5 on every parameter and loss.
"""

from __future__ import annotations

import pytest

from tests.launch import run_script

TOL = 1e-5

CASES = {
    # script, world, configs (ranks_per_node:partition:accumulation[:mode]), extra flags
    "trainer-w4": ("trainer_parity.py", 4, "2:1:1,2:2:4,2:4:4", ()),
    "trainer-w8": ("trainer_parity.py", 8, "2:4:4,2:2:1", ()),
    "trainer-epoch-end-window": (
        "trainer_parity.py",
        4,
        "2:2:3,2:4:3:last_micro_step_only",
        ("--extra", 2),
    ),
    "trainer-clip": ("trainer_parity.py", 4, "2:2:2", ("--clip", 0.05)),
    "trainer-manual": ("trainer_parity.py", 4, "2:2:2,2:4:3:every_micro_step", ("--manual",)),
    "trainer-manual-skipped-step": (
        "trainer_parity.py",
        4,
        "2:2:3,2:4:3:last_micro_step_only",
        ("--manual", "--skip-last"),
    ),
    # asynchronous unshard one block ahead; partition 4 spans both nodes (hierarchical)
    "trainer-forward-prefetch": ("trainer_parity.py", 4, "2:4:2,2:2:1", ("--forward-prefetch",)),
    "fabric-w4": ("fabric_parity.py", 4, "2:1:4,2:2:1,2:4:4", ()),
    "fabric-w8": ("fabric_parity.py", 8, "2:4:1,4:4:4", ()),
    "fabric-by-name": ("fabric_parity.py", 4, "4:node:2", ("--by-name",)),
    "fabric-clip": ("fabric_parity.py", 4, "2:4:2", ("--clip", 0.05)),
    "fabric-forward-prefetch": ("fabric_parity.py", 4, "2:4:2,2:2:1", ("--forward-prefetch",)),
    "fabric-skipped-step-and-short-window": (
        "fabric_parity.py",
        4,
        "2:2:3,2:4:3:last_micro_step_only",
        ("--skip-last", "--extra", 1),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_single_process_reference(case: str) -> None:
    script, world, configs, flags = CASES[case]
    results = run_script(script, world, "--configs", configs, *flags, timeout=400)
    assert len(results) == len(configs.split(","))
    for name, result in results.items():
        assert result["param_diff"] <= TOL, (name, result)
        assert result["loss_diff"] <= TOL, (name, result)
