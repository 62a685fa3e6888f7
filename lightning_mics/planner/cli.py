"""``lightning-mics plan``: choose a MiCS partition size and project the run.

    lightning-mics plan --model gpt_100b --cluster p4d_24xlarge --nodes 64
    lightning-mics plan --experiment gpt_175b_p4de
    lightning-mics plan --model gpt_13b --cluster p4d_24xlarge --nodes 4 --micro-batch 4 \\
        --seq-len 1024 --accumulation 8 --precision bf16-mixed trainer.max_steps=10

Reads the recipes' Hydra configs (``conf/``, or ``--config-dir``); any further
``key=value`` arguments are Hydra overrides of ``conf/train.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_plan_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``plan`` sub-command to ``commands`` (an ``add_subparsers()`` result)."""
    plan = commands.add_parser(
        "plan",
        help="choose a partition size and predict step time, TFLOPS and scaling",
        description=__doc__.split("\n")[0],
    )
    plan.add_argument("--model", help="conf/model option, e.g. gpt_100b")
    plan.add_argument("--cluster", help="conf/cluster option, e.g. p4d_24xlarge")
    plan.add_argument("--nodes", type=int, help="number of nodes (trainer.num_nodes)")
    plan.add_argument("--experiment", help="conf/experiment option, e.g. gpt_100b_p4d")
    plan.add_argument(
        "--config-dir", default=None, help="the recipes' Hydra config directory (default: ./conf)"
    )
    plan.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="sequences per GPU per micro-step (default: the config's, or less if it "
        "does not fit; the sequences per step are kept by raising the accumulation)",
    )
    plan.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    plan.add_argument(
        "--accumulation", type=int, default=None, help="micro-steps per optimizer step"
    )
    plan.add_argument(
        "--precision", default=None, help="trainer.precision, e.g. bf16-mixed, 32-true"
    )
    plan.add_argument("--param-dtype", default=None, help="strategy.param_dtype, e.g. bf16")
    plan.add_argument("--reduce-dtype", default=None, help="strategy.reduce_dtype, e.g. fp32")
    plan.add_argument(
        "--activation-checkpointing",
        choices=("auto", "on", "off"),
        default=None,
        help="default: the experiment's setting with --experiment, else auto (only if needed)",
    )
    plan.add_argument(
        "--partition-size", type=int, default=None, help="evaluate this size instead of choosing"
    )
    plan.add_argument(
        "--flat", action="store_true", help="no hierarchical collectives (hierarchical=false)"
    )
    plan.add_argument(
        "--scaling-nodes",
        default=None,
        help="comma-separated node counts for the weak-scaling table (default: N/4,N/2,N)",
    )
    plan.add_argument(
        "--set",
        dest="cost_overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="cost-model parameter of the cluster, e.g. compute_efficiency=0.55 or "
        "inter_node_latency_us=30 (see lightning_mics.planner.ClusterSpec)",
    )
    plan.add_argument("overrides", nargs="*", help="Hydra overrides, key=value")
    return plan


#: Each command-line option and the config key it overrides.
_OPTION_KEYS = {
    "experiment": "experiment",
    "model": "model",
    "cluster": "cluster",
    "nodes": "trainer.num_nodes",
    "micro_batch": "data.micro_batch_size",
    "seq_len": "data.seq_len",
    "accumulation": "trainer.accumulate_grad_batches",
    "precision": "trainer.precision",
    "param_dtype": "strategy.param_dtype",
    "reduce_dtype": "strategy.reduce_dtype",
}


def _hydra_overrides(args: argparse.Namespace) -> list[str]:
    out = [
        f"{key}={getattr(args, option)}"
        for option, key in _OPTION_KEYS.items()
        if getattr(args, option) not in (None, "")
    ]
    if args.accumulation is not None:
        # NOTE: an explicit accumulation replaces the global batch the config derives it from.
        out.append("data.global_batch_size=null")
    return out + list(args.overrides)


def _cost_overrides(items: list[str]) -> dict[str, Any]:
    """``--set FIELD=VALUE`` items as `ClusterSpec` keyword arguments."""
    from dataclasses import fields

    from lightning_mics.planner.specs import ClusterSpec

    allowed = {f.name for f in fields(ClusterSpec)} - {"name", "nodes", "ranks_per_node"}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise ValueError(f"--set expects FIELD=VALUE with FIELD one of {sorted(allowed)}")
        out[key] = value.strip() if key == "backend" else float(value)
    return out


def run_plan(args: argparse.Namespace) -> int:
    """Compose the config, plan, print. Returns the exit status (1: nothing fits, 2: bad
    input)."""
    from lightning_mics.planner.configs import compose, specs_from_config
    from lightning_mics.planner.planner import PlanError, format_plan, make_plan
    from lightning_mics.planner.reference import find_reference

    if not args.experiment and not args.model:
        print(
            "lightning-mics plan: error: give --model (and --cluster, --nodes) or --experiment",
            file=sys.stderr,
        )
        return 2
    try:
        overrides = _hydra_overrides(args)
        cfg = compose(args.config_dir, overrides)
        if int(cfg.data.seq_len) > int(cfg.model.block_size):
            # a longer sequence than the model's positions: grow them (learned embeddings)
            cfg = compose(args.config_dir, [*overrides, f"model.block_size={cfg.data.seq_len}"])
        model, cluster, training = specs_from_config(cfg, **_cost_overrides(args.cost_overrides))
        ckpt_flag = args.activation_checkpointing
        if ckpt_flag is None:
            ckpt_flag = "on" if (args.experiment and training.activation_checkpointing) else "auto"
        ckpt = {"auto": None, "on": True, "off": False}[ckpt_flag]
        scaling = (
            [int(n) for n in args.scaling_nodes.split(",") if n.strip()]
            if args.scaling_nodes
            else None
        )
        cluster_name = str(cfg.hydra.runtime.choices.get("cluster", cluster.name))
        plan = make_plan(
            model,
            cluster,
            training,
            micro_batch=args.micro_batch,
            activation_checkpointing=ckpt,
            partition_size=args.partition_size,
            hierarchical=not args.flat,
            scaling_nodes=scaling,
            reference=find_reference(model.name, cluster_name),
        )
    except (PlanError, ValueError, FileNotFoundError) as err:
        print(f"lightning-mics plan: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Hydra's own errors: a missing config option, a bad override
        if type(err).__module__.startswith(("hydra", "omegaconf")):
            print(f"lightning-mics plan: error: {err}", file=sys.stderr)
            return 2
        raise
    print(format_plan(plan))
    return 0 if plan.choice.fits else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-mics")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    return run_plan(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
