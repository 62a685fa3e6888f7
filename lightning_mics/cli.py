"""``lightning-mics`` console script.

``lightning-mics consolidate CKPT OUT [--torch-out FILE] [--model-key KEY]
[--submodule NAME]`` writes the model of a checkpoint (sharded directory, full file, or
a directory of checkpoints: the newest complete one) as one safetensors file that loads
into the unsharded model with ``load_state_dict(strict=True)``. With ``--submodule
model``, only the submodule ``model`` is written, under its own parameter names, so it
loads into the bare network (e.g. a Hugging Face model a LightningModule holds as
``self.model``). Runs in one process, without a process group.

``lightning-mics plan --model gpt_100b --cluster p4d_24xlarge --nodes 64`` chooses a
partition size and predicts the run (`lightning_mics.planner.cli`).
"""

from __future__ import annotations

import argparse
import sys

from lightning_mics.checkpoint import CheckpointError, consolidate_checkpoint
from lightning_mics.planner.cli import add_plan_parser, run_plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-mics", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    consolidate = commands.add_parser(
        "consolidate", help="write a checkpoint's model as one safetensors file"
    )
    consolidate.add_argument("checkpoint", help="checkpoint, or a directory of checkpoints")
    consolidate.add_argument("out", help="output .safetensors file")
    consolidate.add_argument(
        "--torch-out", default=None, help="also write a plain torch.save state dict here"
    )
    consolidate.add_argument(
        "--model-key",
        default=None,
        help="entry holding the model (default: the one recorded at save time)",
    )
    consolidate.add_argument(
        "--submodule",
        "--prefix",
        dest="submodule",
        default=None,
        metavar="NAME",
        help="write only this submodule (dotted attribute path, e.g. 'model'), with its "
        "prefix removed from the names, so it loads into the bare submodule",
    )
    add_plan_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "plan":
        return run_plan(args)
    try:
        state = consolidate_checkpoint(
            args.checkpoint,
            args.out,
            torch_out=args.torch_out,
            model_key=args.model_key,
            submodule=args.submodule,
        )
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"lightning-mics: error: {exc}", file=sys.stderr)
        return 1
    numel = sum(t.numel() for t in state.values())
    print(f"wrote {len(state)} tensors ({numel} elements) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
