"""Bad MiCS input through the Trainer or the plain API: every rank must raise the clear error.

Usage (under torchrun): ``bad_input.py --out PATH --api {trainer,plain} --cases C1,C2,...``
with cases from :data:`CASES`. Each case sets this rank's node identity
(``$LIGHTNING_MICS_NODE_ID``, so that one machine can fake any node layout) and runs a
fresh Trainer (or ``apply_mics``) with its options.

With ``--uncaught`` the first error simply kills the run, as it would for a user.
Otherwise a case's :class:`MiCSTopologyError` is caught, so that one launch can try several bad
inputs in turn: each rank prints ``MICS-ERROR case=C rank=R <message>`` to stderr, or
``MICS-NO-ERROR case=C rank=R`` when nothing was raised. A hang (a rank that missed the
error and waits in a collective) stalls the launch, which the test's timeout catches.
At the end every rank waits (bounded) until all ranks are done, then exits with status 1:
torchrun stops the other workers as soon as one exits with an error, and the test
checks the lines of *every* rank. That handshake uses files next to ``--out``, not the
process group, which may not exist or be unusable.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch.distributed as dist
from lightning.pytorch import Trainer

from lightning_mics import MiCSStrategy, MiCSTopology, apply_mics
from lightning_mics.topology import NODE_ID_ENV, MiCSTopologyError
from tests.scripts import common
from tests.scripts.lit import LitGPT

#: name -> (partition_size, ranks_per_node or None for one node of all ranks, node ids)
CASES: dict[str, tuple[int | str, int | None, str | None]] = {
    # Arithmetic: found before any process group exists (Trainer) / any collective (plain).
    "not_dividing": (3, None, None),
    # Node layout: found by the collective check once the process group exists.
    "cyclic": ("node", 2, "a,b,a,b"),
    "unequal": ("node", 2, "a,a,a,b"),
}
HANDSHAKE_TIMEOUT_S = 30.0


def main() -> None:
    p = common.parser()
    p.add_argument("--api", choices=["trainer", "plain"], required=True)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument(
        "--uncaught",
        action="store_true",
        help="let the first error propagate and kill the run, as it would for a user",
    )
    args = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    run = _trainer if args.api == "trainer" else _plain

    for case in args.cases.split(","):
        partition_size, ranks_per_node, node_ids = CASES[case]
        if node_ids is None:
            os.environ.pop(NODE_ID_ENV, None)
        else:
            ids = node_ids.split(",")
            assert len(ids) == world, f"case {case} needs {len(ids)} ranks, got {world}"
            os.environ[NODE_ID_ENV] = ids[rank]
        if args.uncaught:
            run(partition_size, ranks_per_node, world)
            continue
        try:
            run(partition_size, ranks_per_node, world)
        except MiCSTopologyError as err:
            message = " ".join(str(err).split())
            _say(f"MICS-ERROR case={case} rank={rank} {message}")
        else:
            _say(f"MICS-NO-ERROR case={case} rank={rank}")

    if dist.is_initialized():
        dist.destroy_process_group()
    _wait_for_all_ranks(Path(args.out).parent, rank, world)
    sys.exit(1)


def _trainer(partition_size: int | str, ranks_per_node: int | None, world: int) -> None:
    trainer = Trainer(
        strategy=MiCSStrategy(partition_size=partition_size, ranks_per_node=ranks_per_node),
        accelerator="cpu",
        devices=world,
        max_steps=1,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(LitGPT(), common.make_loader(world, 2, 1, 1))


def _plain(partition_size: int | str, ranks_per_node: int | None, world: int) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    topology = MiCSTopology.create(world, ranks_per_node or world, partition_size)
    apply_mics(common.make_model(), topology)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _wait_for_all_ranks(folder: Path, rank: int, world: int) -> None:
    (folder / f"bad_input_done.{rank}").touch()
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    while time.monotonic() < deadline:
        if all((folder / f"bad_input_done.{r}").exists() for r in range(world)):
            return
        time.sleep(0.05)


if __name__ == "__main__":
    main()
