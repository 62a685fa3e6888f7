"""``python -m recipes.slurm [OPTIONS] [HYDRA OVERRIDES]``: render (and submit) an sbatch file.

    python -m recipes.slurm experiment=gpt_175b_p4de trainer.num_nodes=16
    python -m recipes.slurm experiment=gpt_100b_p4d --time=48:00:00 --submit

Options start with ``--``; every other argument is a Hydra override of ``conf/train.yaml``,
composed here exactly as ``recipes/train.py`` will compose it on every rank. The config is
checked first (tasks per node = GPUs per node, the MiCS partition fits the world, the run
directory is keyed on ``SLURM_JOB_ID``, the recipe's own checks); nothing is written when a
check fails. Exit status: 0 written (and submitted), 2 a config error, or sbatch's status.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from recipes.config import resolve_partition_size
from recipes.slurm.render import (
    DEFAULT_SIGNAL_LEAD_S,
    REPO,
    SlurmConfigError,
    SlurmOptions,
    compose,
    plan,
    render,
    run_dir,
    slurm_log_dir,
    validate_training_config,
)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.slurm",
        description="Render an sbatch file for recipes/train.py from the composed Hydra "
        "config (nodes, tasks per node and GPUs from trainer.num_nodes / trainer.devices / "
        "cluster.gpus_per_node). Arguments without a leading -- are Hydra overrides.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="sbatch file to write (default: <paths.log_dir>/slurm/<job name>.sbatch)",
    )
    parser.add_argument("--submit", action="store_true", help="run sbatch on the file")
    parser.add_argument(
        "--partition",
        help="Slurm partition (default: the instance family, e.g. p4de: the queue names of "
        "recipes/pcluster; 'default': no --partition, the cluster's default)",
    )
    parser.add_argument("--time", help="time limit, e.g. 48:00:00 (default: the partition's)")
    parser.add_argument("--job-name", help="default: the experiment name")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument(
        "--signal-lead",
        type=int,
        default=DEFAULT_SIGNAL_LEAD_S,
        metavar="S",
        help="seconds before the time limit at which SIGUSR1 asks for the "
        "requeue checkpoint (default %(default)s; raise it when saving the "
        "sharded checkpoint takes longer)",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="Python on the compute nodes (default: this one; $PYTHON at run time wins)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=REPO,
        help="the repository on shared storage (default: this checkout)",
    )
    parser.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra #SBATCH flag, e.g. --sbatch=--mail-type=END (repeatable)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDE",
        help="Hydra overrides, e.g. experiment=gpt_175b_p4de trainer.num_nodes=16",
    )
    args = parser.parse_intermixed_args(argv)
    return args, list(args.overrides)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    options = SlurmOptions(
        partition=args.partition,
        time=args.time,
        job_name=args.job_name,
        account=args.account,
        qos=args.qos,
        signal_lead_s=args.signal_lead,
        python=args.python,
        workdir=args.workdir.resolve(),
        extra_sbatch=list(args.sbatch),
    )
    try:
        cfg = compose(overrides)
        resolve_partition_size(cfg)  # strategy.partition_size=auto: the planner's choice
        slurm_plan = plan(cfg, options)
        validate_training_config(cfg)
        out = args.out or slurm_log_dir(cfg, options) / f"{slurm_plan.job_name}.sbatch"
        out = out.resolve()
        text = render(
            cfg,
            overrides,
            options,
            sbatch_path=out,
            render_command=shlex.join(
                ["python", "-m", "recipes.slurm", *(sys.argv[1:] if argv is None else argv)]
            ),
        )
    except SlurmConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: sbatch does not create the directory of --output; a missing one loses the log.
    slurm_log_dir(cfg, options).mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"{slurm_plan.layout}")
    print(
        f"{slurm_plan.nodes} node(s) x {slurm_plan.ntasks_per_node} task(s)"
        + (f", {slurm_plan.gpus_per_node} GPUs per node" if slurm_plan.gpus_per_node else "")
        + (f", partition {slurm_plan.partition}" if slurm_plan.partition else "")
    )
    print(f"run directory: {run_dir(cfg, options)}")
    print(f"wrote {out}")
    command = ["sbatch", str(out)]
    if not args.submit:
        print(shlex.join(command))
        return 0
    proc = subprocess.run(command, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
