"""Bad input fails fast, with a clear message, on every rank, through the Trainer strategy
and through the plain API; nothing hangs.

The multi-process checks run ``tests/scripts/bad_input.py`` under torchrun (4 ranks,
gloo); see that script for how one launch tries several bad inputs in turn.
"""

from __future__ import annotations

import re
import time

import pytest
import torch.distributed as dist

from lightning_mics import MiCSStrategy, MiCSTopologyError
from tests.launch import run_script

WORLD = 4
TIMEOUT_S = 120  # a hang shows up as subprocess.TimeoutExpired

#: case -> fragments that its message must contain (what is wrong, and how to fix it)
EXPECTED = {
    "not_dividing": ["partition_size=3 does not divide world_size=4", "[1, 2, 4]"],
    "cyclic": [
        "not node-contiguous",
        "node 'a' holds ranks [0] and [2]",
        "--distribution=cyclic",
        "--distribution=block",
    ],
    "unequal": ["different numbers of ranks", "{'a': 3, 'b': 1}", "same number of processes"],
}


def _lines(stderr: str) -> dict[tuple[str, int], str]:
    """(case, rank) -> message, from the script's ``MICS-ERROR`` lines."""
    found = {}
    # NOTE: ranks share one stderr, so one rank's line can start in the middle of
    # another's; match anywhere and stop at the next marker.
    pattern = r"MICS-ERROR case=(\w+) rank=(\d+) (.*?)(?=MICS-|$)"
    for m in re.finditer(pattern, stderr, re.MULTILINE):
        found[(m.group(1), int(m.group(2)))] = m.group(3)
    return found


@pytest.mark.parametrize("api", ["trainer", "plain"])
def test_bad_input_raises_on_every_rank(api):
    start = time.monotonic()
    proc = run_script("bad_input.py", WORLD, "--api", api, timeout=TIMEOUT_S, expect_failure=True)
    elapsed = time.monotonic() - start
    assert "MICS-NO-ERROR" not in proc.stderr, proc.stderr[-6000:]
    found = _lines(proc.stderr)
    for case, fragments in EXPECTED.items():
        for rank in range(WORLD):
            assert (case, rank) in found, (
                f"rank {rank} reported no error for {case!r} ({elapsed:.0f} s):\n"
                f"{proc.stderr[-6000:]}"
            )
            for fragment in fragments:
                assert fragment in found[(case, rank)], (case, rank, found[(case, rank)])


def test_uncaught_node_layout_error_ends_the_trainer_run():
    """The error found after the process group exists (the hang-prone spot) kills the
    run through Lightning's own exception handling, without anyone catching it."""
    proc = run_script(
        "bad_input.py",
        WORLD,
        "--api",
        "trainer",
        "--cases",
        "cyclic",
        "--uncaught",
        timeout=TIMEOUT_S,
        expect_failure=True,
    )
    assert "MiCSTopologyError: Ranks are not node-contiguous" in proc.stderr, proc.stderr[-6000:]
    assert "--distribution=cyclic" in proc.stderr


def test_trainer_strategy_checks_partition_size_before_any_process_group():
    """In-process: building the Trainer validates the arithmetic, so a bad partition
    size fails before any process is launched or any process group exists."""
    from lightning.pytorch import Trainer

    with pytest.raises(MiCSTopologyError) as err:
        Trainer(strategy=MiCSStrategy(partition_size=2), accelerator="cpu", devices=3)
    assert "partition_size=2 does not divide world_size=3" in str(err.value)
    assert "[1, 3]" in str(err.value)
    assert not dist.is_initialized()


def test_trainer_strategy_ranks_per_node_not_dividing_devices():
    from lightning.pytorch import Trainer

    with pytest.raises(
        MiCSTopologyError, match="world_size=3 is not a multiple of ranks_per_node=2"
    ):
        Trainer(strategy=MiCSStrategy(ranks_per_node=2), accelerator="cpu", devices=3)
    assert not dist.is_initialized()


def test_fabric_strategy_checks_partition_size_at_construction():
    from lightning.fabric import Fabric

    from lightning_mics.fabric import MiCSStrategy as FabricMiCSStrategy

    with pytest.raises(MiCSTopologyError, match="partition_size=3 does not divide world_size=4"):
        Fabric(strategy=FabricMiCSStrategy(partition_size=3), accelerator="cpu", devices=4)
    assert not dist.is_initialized()


def test_trainer_strategy_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="partition_size must be a positive int or 'node'"):
        MiCSStrategy(partition_size=0)
    with pytest.raises(ValueError, match="accumulation='sometimes' is not one of"):
        MiCSStrategy(accumulation="sometimes")


def test_forcing_hierarchical_inside_one_node_fails_at_construction():
    from lightning.pytorch import Trainer

    with pytest.raises(MiCSTopologyError, match="hierarchical=True needs a partition group"):
        Trainer(strategy=MiCSStrategy(hierarchical=True), accelerator="cpu", devices=2)
    assert not dist.is_initialized()
