"""Render a Slurm batch file from the composed Hydra config of ``recipes/train.py``.

The ``#SBATCH`` geometry is derived from the same config the ranks will compose, so
nodes, tasks per node and GPUs agree with ``trainer.num_nodes`` and ``trainer.devices``
by construction::

    python -m recipes.slurm experiment=gpt_175b_p4de trainer.num_nodes=16 [--submit]

Everything on the command line that does not start with ``--`` is a Hydra override,
passed unchanged to ``srun python recipes/train.py`` in the rendered file.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"
TEMPLATE = Path(__file__).with_name("train.sbatch.template")

#: Lightning's requeue signal and the conventional lead time before the time limit.
REQUEUE_SIGNAL = "SIGUSR1"
DEFAULT_SIGNAL_LEAD_S = 90
MAX_SIGNAL_LEAD_S = 65535
#: ``--partition`` value that asks for the cluster's default partition (no ``--partition``).
DEFAULT_PARTITION = "default"

#: vCPUs of the AWS instance types the cluster configs name, for ``--cpus-per-task``
#: (dataloader workers). Without it Slurm may bind each rank to a single core.
INSTANCE_VCPUS = {
    "p3dn.24xlarge": 96,
    "p4d.24xlarge": 96,
    "p4de.24xlarge": 96,
    "p5.48xlarge": 192,
}

_GPU_ACCELERATORS = {"gpu", "cuda"}
#: Strategy configs built on lightning_mics.MiCSStrategy (partition_size, ranks_per_node).
MICS_STRATEGIES = ("mics", "hsdp")


class SlurmConfigError(ValueError):
    """The composed config cannot be launched on Slurm as asked; the message says why."""


@dataclass
class SlurmOptions:
    """Scheduler settings that are not part of the training config."""

    # Default: the instance family (p4d, p4de, p5, p3dn), the queues of recipes/pcluster;
    # "default": none, the cluster's default partition.
    partition: str | None = None
    time: str | None = None  # sbatch --time, e.g. "48:00:00"; default: the partition's
    job_name: str | None = None  # default: the experiment name
    account: str | None = None
    qos: str | None = None
    signal_lead_s: int = DEFAULT_SIGNAL_LEAD_S
    python: str = sys.executable
    workdir: Path = REPO
    extra_sbatch: list[str] = field(default_factory=list)  # e.g. ["--mail-type=END"]


@dataclass
class SlurmPlan:
    """What the batch file asks Slurm for, derived from the config."""

    nodes: int
    ntasks_per_node: int
    gpus_per_node: int  # 0: no --gres
    cpus_per_task: int | None
    instance_type: str | None
    partition: str | None
    job_name: str
    world_size: int
    layout: str  # one line: the MiCS layout, or the strategy


# ------------------------------------------------------------------------ config
def compose(overrides: Sequence[str], config_dir: Path = CONF_DIR) -> Any:
    """The config ``recipes/train.py`` composes for ``overrides`` (with the ``hydra`` node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return hydra_compose(
                config_name="train", overrides=list(overrides), return_hydra_config=True
            )
    except (HydraException, OmegaConfBaseException) as err:
        raise SlurmConfigError(f"The config does not compose: {err}") from err


def cluster_configs(config_dir: Path = CONF_DIR) -> list[str]:
    """The names ``cluster=...`` accepts."""
    return sorted(path.stem for path in (config_dir / "cluster").glob("*.yaml"))


def _positive_int(value: Any, key: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SlurmConfigError(f"{key}={value!r}: a Slurm job needs a positive integer. {hint}")
    return value


def plan(cfg: Any, options: SlurmOptions | None = None) -> SlurmPlan:
    """Check that ``cfg`` can run as one Slurm task per device and derive the geometry.

    Raises :class:`SlurmConfigError` with what to change.
    """
    options = options or SlurmOptions()
    if not 0 < options.signal_lead_s <= MAX_SIGNAL_LEAD_S:
        raise SlurmConfigError(
            f"--signal-lead={options.signal_lead_s}: Slurm takes 1 to {MAX_SIGNAL_LEAD_S} s."
        )
    trainer, cluster = cfg.trainer, cfg.cluster
    nodes = _positive_int(
        trainer.num_nodes, "trainer.num_nodes", "Set it to the number of nodes to allocate."
    )
    devices = _positive_int(
        trainer.devices,
        "trainer.devices",
        "Under Slurm it is the tasks per node (one per GPU); set it explicitly, e.g. "
        f"trainer.devices={cluster.get('gpus_per_node') or 8}.",
    )
    accelerator = str(trainer.accelerator)
    gpus_per_node = int(cluster.get("gpus_per_node") or 0)
    instance_type = cluster.get("instance_type")

    if accelerator in _GPU_ACCELERATORS or (accelerator == "auto" and gpus_per_node):
        if not gpus_per_node:
            raise SlurmConfigError(
                f"trainer.accelerator={accelerator} but cluster={cluster.name} declares no GPUs "
                "(cluster.gpus_per_node). Pick a GPU cluster config (one of "
                f"{cluster_configs()}) or set cluster.gpus_per_node."
            )
        if devices != gpus_per_node:
            raise SlurmConfigError(
                f"trainer.devices={devices} but cluster={cluster.name} has {gpus_per_node} GPUs "
                f"per node. Slurm starts one task per GPU (--ntasks-per-node) and MiCS's node "
                f"is trainer.devices ranks, so they must agree: set "
                f"trainer.devices={gpus_per_node}, or choose another cluster config."
            )
    elif accelerator == "cpu":
        gpus_per_node = 0
    else:
        raise SlurmConfigError(
            f"trainer.accelerator={accelerator!r} is not supported by the Slurm renderer; "
            "use gpu (GPU clusters) or cpu."
        )

    world = nodes * devices
    layout = _check_strategy(cfg, world, devices)

    family = instance_type.split(".")[0] if instance_type else None
    choices = cfg.get("hydra", {}).get("runtime", {}).get("choices", {})
    job_name = options.job_name or choices.get("experiment") or str(cfg.get("task_name", "train"))
    vcpus = INSTANCE_VCPUS.get(instance_type) if instance_type else None
    return SlurmPlan(
        nodes=nodes,
        ntasks_per_node=devices,
        gpus_per_node=gpus_per_node,
        cpus_per_task=vcpus // devices if vcpus else None,
        instance_type=instance_type,
        partition=None if options.partition == DEFAULT_PARTITION else options.partition or family,
        job_name=re.sub(r"[^A-Za-z0-9_.-]", "_", job_name),
        world_size=world,
        layout=layout,
    )


def _check_strategy(cfg: Any, world: int, devices: int) -> str:
    """Check the strategy's layout against the Slurm geometry; describe it in one line."""
    strategy = cfg.strategy
    name = str(strategy.get("name", ""))
    if name not in MICS_STRATEGIES:
        return f"strategy={name}: {world} ranks = {cfg.trainer.num_nodes} nodes x {devices}"
    from lightning_mics import MiCSTopology, MiCSTopologyError

    ranks_per_node = strategy.get("ranks_per_node") or devices
    partition_size = strategy.partition_size
    if isinstance(partition_size, str) and partition_size.isdigit():
        partition_size = int(partition_size)
    try:
        topology = MiCSTopology.create(world, ranks_per_node, partition_size)
    except MiCSTopologyError as err:
        raise SlurmConfigError(
            f"strategy.partition_size={strategy.partition_size!r} does not fit "
            f"trainer.num_nodes={cfg.trainer.num_nodes} x trainer.devices={devices}: {err}"
        ) from err
    if ranks_per_node != devices:
        raise SlurmConfigError(
            f"strategy.ranks_per_node={ranks_per_node} but a Slurm node runs "
            f"trainer.devices={devices} ranks. Emulated nodes (cluster=local_cpu) are for one "
            "machine; for CPU-only Slurm nodes use cluster=cpu_nodes (or set "
            "cluster.ranks_per_node=null)."
        )
    return f"strategy={name}: {topology.describe()}"


# ------------------------------------------------------------------------ render
def slurm_log_dir(cfg: Any, options: SlurmOptions) -> Path:
    """Where Slurm writes the job's output (must exist before ``sbatch``)."""
    return Path(options.workdir) / str(cfg.paths.log_dir) / "slurm"


JOB_ID_PLACEHOLDER = "<SLURM_JOB_ID>"


def run_dir(cfg: Any, options: SlurmOptions | None = None) -> Path:
    """The job's run directory, with ``<SLURM_JOB_ID>`` standing for the job id.

    Raises :class:`SlurmConfigError` when ``hydra.run.dir`` is a timestamp: every rank
    composes its own config under srun, and a requeued job starts again, so a directory
    named by the clock would split the ranks and lose the ``hpc_ckpt_*.ckpt``.
    """
    import os

    from omegaconf import OmegaConf

    options = options or SlurmOptions()
    raw = str(OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"])
    saved = os.environ.get("SLURM_JOB_ID")
    os.environ["SLURM_JOB_ID"] = JOB_ID_PLACEHOLDER
    try:
        resolved = str(OmegaConf.select(cfg, "hydra.run.dir"))
    finally:
        if saved is None:
            del os.environ["SLURM_JOB_ID"]
        else:
            os.environ["SLURM_JOB_ID"] = saved
    if JOB_ID_PLACEHOLDER not in resolved and "now:" in raw:
        raise SlurmConfigError(
            f"hydra.run.dir={raw} is named by the clock, not by SLURM_JOB_ID: the ranks "
            "started by srun would each get their own directory, and a requeued job would "
            "not find its hpc_ckpt_*.ckpt. Key it on the job, e.g. "
            "hydra.run.dir='outputs/train/${oc.env:SLURM_JOB_ID}'."
        )
    return Path(options.workdir) / resolved


def _sbatch_options(cfg: Any, p: SlurmPlan, options: SlurmOptions) -> list[str]:
    lines = [
        f"--job-name={p.job_name}",
        f"--nodes={p.nodes}",
        f"--ntasks-per-node={p.ntasks_per_node}",
    ]
    if p.gpus_per_node:
        lines.append(f"--gres=gpu:{p.gpus_per_node}")
    if p.cpus_per_task:
        lines.append(f"--cpus-per-task={p.cpus_per_task}")
    if p.partition:
        lines.append(f"--partition={p.partition}")
    if options.time:
        lines.append(f"--time={options.time}")
    if options.account:
        lines.append(f"--account={options.account}")
    if options.qos:
        lines.append(f"--qos={options.qos}")
    lines += [
        "--exclusive",
        "--wait-all-nodes=1",
        "--requeue",
        f"--signal={REQUEUE_SIGNAL}@{options.signal_lead_s}",
        "--open-mode=append",  # a requeued job appends to the same log
        f"--output={slurm_log_dir(cfg, options)}/%x_%j.out",
    ]
    lines += options.extra_sbatch
    return lines


def render(
    cfg: Any,
    overrides: Sequence[str],
    options: SlurmOptions | None = None,
    sbatch_path: Path | None = None,
    render_command: str | None = None,
) -> str:
    """The batch file's text for the composed ``cfg`` (validated by :func:`plan`)."""
    options = options or SlurmOptions()
    p = plan(cfg, options)
    sbatch_lines = ["#SBATCH " + line for line in _sbatch_options(cfg, p, options)]
    srun = ["--kill-on-bad-exit=1", "--distribution=block"]
    if p.cpus_per_task:
        # NOTE: since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch.
        srun.append(f"--cpus-per-task={p.cpus_per_task}")
    values = {
        "title": f"lightning-mics: {p.job_name} on {p.nodes} x {p.instance_type or 'node'} "
        f"({p.world_size} ranks)",
        "render_command": render_command
        or shlex.join(["python", "-m", "recipes.slurm", *overrides]),
        "sbatch_path": str(sbatch_path or f"{p.job_name}.sbatch"),
        "nodes": str(p.nodes),
        "ntasks_per_node": str(p.ntasks_per_node),
        "run_dir": str(run_dir(cfg, options)),
        "sbatch_options": "\n".join(sbatch_lines),
        "workdir": shlex.quote(str(options.workdir)),
        "python": _double_quoted(options.python),
        "instance_type": shlex.quote(str(p.instance_type or "none")),
        "instance_type_comment": p.instance_type or "a non-AWS cluster (none)",
        "world_comment": p.layout,
        "srun_options": " ".join(srun),
        "overrides": " ".join(shlex.quote(o) for o in overrides),
    }
    return _fill(TEMPLATE.read_text(), values)


def _double_quoted(text: str) -> str:
    """``text`` escaped for use inside a double-quoted shell word."""
    return re.sub(r'(["$`\\])', r"\\\1", text)


def _fill(template: str, values: dict[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"{TEMPLATE.name}: no value for placeholder {{{{{key}}}}}")
        return values[key]

    return re.sub(r"\{\{(\w+)\}\}", sub, template)


# --------------------------------------------------------------------- validation
def validate_training_config(cfg: Any) -> None:
    """The training recipe's own checks (model, data, batch sizes, memory), as
    ``recipes/train.py`` runs them on every rank before training."""
    from recipes.train import validate_config

    try:
        validate_config(cfg)
    except ValueError as err:  # NOTE: the recipe's ConfigError is a ValueError
        raise SlurmConfigError(str(err)) from err
