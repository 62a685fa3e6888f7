"""A stand-in for ``srun`` on one machine: start a job's tasks with the ``SLURM_*``
variables srun would give them.

    python tests/scripts/launch_srun.py --nodes 2 --ntasks-per-node 2 --job-id 4242 \
        -- python recipes/train.py experiment=laptop_gpt trainer.num_nodes=2 trainer.devices=2

Starts ``nodes x ntasks_per_node`` processes, task ``i`` on emulated node
``i // ntasks_per_node`` (block distribution, as ``srun --distribution=block``), each with
``SLURM_PROCID`` / ``SLURM_LOCALID`` / ``SLURM_NODEID``, the job's ``SLURM_JOB_ID``,
``SLURM_NTASKS``, ``SLURM_NNODES``, ``SLURM_NTASKS_PER_NODE`` and friends (what
Lightning's ``SLURMEnvironment`` reads), ``MASTER_ADDR`` / ``MASTER_PORT`` and
``LIGHTNING_MICS_NODE_ID`` (the emulated node's name, which lightning-mics uses instead
of the hostname to check the node layout).

Like srun it forwards SIGUSR1, SIGUSR2, SIGTERM and SIGINT to every task (Slurm's
``--signal=SIGUSR1@90`` reaches all tasks of the job), kills the other tasks when one
fails (``--kill-on-bad-exit``) and exits with the first non-zero task status.

``--task`` instead turns the torch.distributed variables of one already started rank
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``; what
``benchmarks/emulated_cluster.py`` and torchrun set) into the ``SLURM_*`` ones and runs
the command in its place, so the emulated multi-node cluster can host a Slurm-style job.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_env(
    *,
    job_id: str,
    job_name: str,
    nodes: int,
    ntasks_per_node: int,
    procid: int,
    restart_count: int | None,
) -> dict[str, str]:
    """The variables srun sets for task ``procid`` of a block-distributed job."""
    ntasks = nodes * ntasks_per_node
    nodeid = procid // ntasks_per_node
    nodelist = f"lmics-node[0-{nodes - 1}]" if nodes > 1 else "lmics-node0"
    env = {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOBID": job_id,
        "SLURM_JOB_NAME": job_name,
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NODELIST": nodelist,
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NTASKS": str(ntasks),
        "SLURM_NPROCS": str(ntasks),
        "SLURM_NTASKS_PER_NODE": str(ntasks_per_node),
        "SLURM_TASKS_PER_NODE": f"{ntasks_per_node}(x{nodes})",
        "SLURM_STEP_NUM_TASKS": str(ntasks),
        "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % ntasks_per_node),
        "SLURM_NODEID": str(nodeid),
        "SLURMD_NODENAME": f"lmics-node{nodeid}",
        "SLURM_DISTRIBUTION": "block",
        "LIGHTNING_MICS_NODE_ID": f"lmics-node{nodeid}",
    }
    if restart_count is not None:
        # NOTE: Slurm sets it only in a job that was requeued (and restarted).
        env["SLURM_RESTART_COUNT"] = str(restart_count)
    return env


def run_tasks(args: argparse.Namespace, command: list[str]) -> int:
    ntasks = args.nodes * args.ntasks_per_node
    port = str(args.master_port or free_port())
    tasks: list[subprocess.Popen] = []
    for procid in range(ntasks):
        env = {
            **os.environ,
            **slurm_env(
                job_id=args.job_id,
                job_name=args.job_name,
                nodes=args.nodes,
                ntasks_per_node=args.ntasks_per_node,
                procid=procid,
                restart_count=args.restart_count,
            ),
            "MASTER_ADDR": args.master_addr,
            "MASTER_PORT": port,
        }
        tasks.append(subprocess.Popen(command, env=env))

    def forward(signum: int, frame: object) -> None:
        for task in tasks:
            if task.poll() is None:
                task.send_signal(signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)

    status = 0
    while True:
        codes = [task.poll() for task in tasks]
        failed = [c for c in codes if c not in (None, 0)]
        if failed and status == 0:
            status = failed[0]
            # --kill-on-bad-exit: a failed task ends the step.
            for task in tasks:
                if task.poll() is None:
                    task.kill()
        if all(c is not None for c in codes):
            return status
        time.sleep(0.1)


def run_as_task(args: argparse.Namespace, command: list[str]) -> int:
    """Turn this rank's torch.distributed variables into srun's and exec ``command``."""
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    env = {
        **os.environ,
        **slurm_env(
            job_id=args.job_id,
            job_name=args.job_name,
            nodes=world // per_node,
            ntasks_per_node=per_node,
            procid=rank,
            restart_count=args.restart_count,
        ),
    }
    if "LIGHTNING_MICS_NODE_ID" in os.environ:
        env["LIGHTNING_MICS_NODE_ID"] = os.environ["LIGHTNING_MICS_NODE_ID"]
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK"):
        env.pop(name, None)
    os.execvpe(command[0], command, env)
    return 127  # not reached


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--ntasks-per-node", type=int, default=1)
    parser.add_argument("--job-id", default="4242")
    parser.add_argument("--job-name", default="lmics-test")
    parser.add_argument("--restart-count", type=int, default=None)
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=None)
    parser.add_argument("--task", action="store_true", help="convert one torchrun-style rank")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    return run_as_task(args, command) if args.task else run_tasks(args, command)


if __name__ == "__main__":
    sys.exit(main())
