"""Launch on Slurm and AWS ParallelCluster: the rendered sbatch files, the submitit
launcher config, the EFA environment, the ParallelCluster configs, and a 2-node
Slurm-style run of recipes/train.py on CPU (4 processes with srun's variables) through a
requeue signal and the resumed job."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "scripts"
AWS_ENV = REPO / "recipes" / "slurm" / "aws_env.sh"
PCLUSTER = REPO / "recipes" / "pcluster"


def compose(overrides: list[str]):
    """The config recipes/train.py composes (independently of the renderer's own compose)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)


def render(*args: str, capsys) -> tuple[int, str, str]:
    """``python -m recipes.slurm ARGS`` in this process: (exit status, stdout, stderr)."""
    from recipes.slurm.__main__ import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def render_cli(*args: str, cwd: Path, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "recipes.slurm", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def sbatch_options(text: str) -> dict[str, str | bool]:
    """``#SBATCH --key=value`` lines -> {key: value}; flags without a value -> True."""
    options: dict[str, str | bool] = {}
    for line in text.splitlines():
        m = re.match(r"#SBATCH --([\w-]+)(?:=(.*))?$", line)
        if m:
            assert m.group(1) not in options, f"#SBATCH --{m.group(1)} given twice"
            options[m.group(1)] = m.group(2) if m.group(2) is not None else True
    return options


def fake_bin(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


# -------------------------------------------------------------- rendered sbatch
#: CPU-only Slurm nodes (2 ranks each), for Slurm-style runs without GPUs.
CPU_NODES = ["cluster=cpu_nodes"]

RENDER_CASES = [
    # (overrides, expected partition)
    (["experiment=gpt_175b_p4de"], "p4de"),
    (["experiment=gpt_175b_p4de", "trainer.num_nodes=8"], "p4de"),
    (["experiment=gpt_175b_p4de", "trainer.num_nodes=32", "strategy.partition_size=128"], "p4de"),
    (["experiment=gpt_100b_p4d"], "p4d"),
    (["experiment=bert_10b_p3dn", "trainer.num_nodes=4"], "p3dn"),
    (["experiment=gpt_100b_p4d", "cluster=p5_48xlarge", "trainer.num_nodes=16"], "p5"),
    (["experiment=gpt_1b3_p4d", "strategy=fsdp", "~strategy.partition_size"], "p4d"),
    (["experiment=laptop_gpt", "trainer.num_nodes=3", *CPU_NODES], None),  # no GPUs, no partition
]


@pytest.mark.parametrize(
    "overrides, partition", RENDER_CASES, ids=[" ".join(c[0][:3]) for c in RENDER_CASES]
)
def test_rendered_sbatch_agrees_with_the_config(tmp_path, capsys, overrides, partition) -> None:
    overrides = [*overrides, f"paths.log_dir={tmp_path}/outputs"]
    out = tmp_path / "job.sbatch"
    code, stdout, stderr = render(*overrides, "--out", str(out), capsys=capsys)
    assert code == 0, stderr
    assert f"sbatch {out}" in stdout
    text = out.read_text()
    cfg = compose(overrides)
    opts = sbatch_options(text)

    assert opts["nodes"] == str(cfg.trainer.num_nodes)
    assert opts["ntasks-per-node"] == str(cfg.trainer.devices)
    if cfg.trainer.accelerator == "cpu":
        assert "gres" not in opts
    else:
        assert cfg.cluster.gpus_per_node == cfg.trainer.devices
        assert opts["gres"] == f"gpu:{cfg.cluster.gpus_per_node}"
    assert opts["signal"] == "SIGUSR1@90"
    assert opts["requeue"] is True and opts["exclusive"] is True
    assert opts.get("partition") == partition
    assert Path(opts["output"]).parent.is_dir(), "sbatch does not create the --output directory"

    # The ranks compose the same config: srun runs train.py with exactly these overrides.
    srun = [line for line in text.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1
    argv = shlex.split(srun[0])
    assert argv[argv.index("recipes/train.py") + 1 :] == overrides
    assert "--distribution=block" in argv  # node-contiguous ranks, as MiCS needs
    instance = cfg.cluster.instance_type or "none"
    assert f"source recipes/slurm/aws_env.sh {instance}" in text
    assert f"{tmp_path}/outputs/{cfg.task_name}/<SLURM_JOB_ID>" in text  # the run directory
    subprocess.run(["bash", "-n", str(out)], check=True)


def test_rendered_sbatch_runs_srun_with_the_efa_environment(tmp_path, capsys) -> None:
    """Run the batch script itself, with a recording ``srun``: it cds to the repository,
    exports the EFA/NCCL variables and hands srun the training command."""
    out = tmp_path / "job.sbatch"
    overrides = ["experiment=gpt_175b_p4de", "trainer.max_steps=5", f"paths.log_dir={tmp_path}"]
    assert render(*overrides, "--out", str(out), capsys=capsys)[0] == 0
    record = tmp_path / "srun.json"
    bin_dir = tmp_path / "bin"
    fake_bin(
        bin_dir,
        "srun",
        f'exec {shlex.quote(sys.executable)} -c "import json, os, sys; '
        f"json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': dict(os.environ)}}, "
        f'open({str(record)!r}, \'w\'))" "$@"\n',
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FI_", "NCCL_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID="77",
        SLURM_JOB_NUM_NODES="16",
        SLURM_JOB_NODELIST="p4de-st-[1-16]",
        PYTHON="python-on-the-nodes",
        NCCL_DEBUG="INFO",  # the user's own setting: kept
    )
    proc = subprocess.run(["bash", str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(record.read_text())
    assert seen["cwd"] == str(REPO)
    argv = seen["argv"]
    assert argv[argv.index("python-on-the-nodes") :] == [
        "python-on-the-nodes",
        "recipes/train.py",
        *overrides,
    ]
    assert seen["env"]["FI_PROVIDER"] == "efa"
    assert seen["env"]["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert seen["env"]["NCCL_DEBUG"] == "INFO"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["experiment=gpt_175b_p4de", "trainer.devices=4"], "set trainer.devices=8"),
        (["experiment=gpt_175b_p4de", "trainer.num_nodes=12"], "does not divide world_size=96"),
        (
            ["experiment=gpt_100b_p4d", "trainer.num_nodes=3", "strategy.partition_size=12"],
            "larger than a node .* multiple of 8",
        ),
        (["experiment=laptop_gpt", "trainer.num_nodes=2"], "use cluster=cpu_nodes"),
        (["experiment=gpt_175b_p4de", "trainer.devices=auto"], "positive integer"),
        (["experiment=gpt_175b_p4de", "hydra.run.dir=outputs/${now:%H-%M-%S}"], "SLURM_JOB_ID"),
        (["experiment=no_such_experiment"], "Could not find 'experiment/no_such_experiment'"),
        # The recipe's own checks run too (here: a micro-batch of 0).
        (["experiment=gpt_175b_p4de", "data.micro_batch_size=0"], "data.micro_batch_size"),
    ],
)
def test_render_refuses_configs_slurm_cannot_run(tmp_path, capsys, overrides, message) -> None:
    out = tmp_path / "job.sbatch"
    code, stdout, stderr = render(
        *overrides, f"paths.log_dir={tmp_path}/outputs", "--out", str(out), capsys=capsys
    )
    assert code == 2, stdout + stderr
    assert re.search(message, stderr), stderr
    assert not out.exists()


def test_render_submit_calls_sbatch(tmp_path) -> None:
    """The command line entry point, with ``--submit`` and a recording ``sbatch``."""
    bin_dir = tmp_path / "bin"
    record = tmp_path / "sbatch.args"
    fake_bin(bin_dir, "sbatch", f'echo "$@" > {record}\necho "Submitted batch job 4242"\n')
    out = tmp_path / "job.sbatch"
    proc = render_cli(
        "experiment=gpt_100b_p4d",
        f"paths.log_dir={tmp_path}/outputs",
        "--submit",
        "--time=48:00:00",
        "--partition=gpu",
        "--out",
        str(out),
        cwd=tmp_path,
        env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "Submitted batch job 4242" in proc.stdout
    assert record.read_text().split() == [str(out)]
    opts = sbatch_options(out.read_text())
    assert opts["time"] == "48:00:00" and opts["partition"] == "gpu"


# ------------------------------------------------------------------ EFA / NCCL env
def aws_env(instance: str, preset: dict[str, str] | None = None) -> dict[str, str]:
    script = f"source {shlex.quote(str(AWS_ENV))} {shlex.quote(instance)}; env -0"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FI_", "NCCL_"))}
    proc = subprocess.run(
        ["bash", "-euc", script], env={**base, **(preset or {})}, capture_output=True, check=True
    )
    pairs = (item.split(b"=", 1) for item in proc.stdout.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs}


@pytest.mark.parametrize(
    "instance, rdma",
    [("p4d.24xlarge", "1"), ("p4de.24xlarge", "1"), ("p5.48xlarge", "1"), ("p3dn.24xlarge", "0")],
)
def test_aws_env_enables_gpudirect_rdma_only_where_the_instance_has_it(instance, rdma) -> None:
    env = aws_env(instance)
    assert env["FI_PROVIDER"] == "efa"
    assert env["FI_EFA_USE_DEVICE_RDMA"] == rdma
    assert env["NCCL_SOCKET_IFNAME"].startswith("^")  # excludes lo/docker/veth


def test_aws_env_keeps_user_settings_and_does_nothing_off_aws() -> None:
    assert aws_env("p4d.24xlarge", {"NCCL_DEBUG": "TRACE"})["NCCL_DEBUG"] == "TRACE"
    assert not {k for k in aws_env("none") if k.startswith(("FI_", "NCCL_"))}


# ----------------------------------------------------------- ParallelCluster configs
def pcluster_configs() -> dict[str, dict]:
    files = sorted(PCLUSTER.glob("*.yaml"))
    assert files, f"no ParallelCluster configs in {PCLUSTER}"
    return {f.name: yaml.safe_load(f.read_text()) for f in files}


def test_pcluster_configs_have_a_queue_for_every_cluster_config() -> None:
    """Every conf/cluster/*.yaml with an instance type has a Slurm queue of that type,
    named like the instance family: the partition the rendered sbatch files ask for."""
    queues = {}
    for name, config in pcluster_configs().items():
        for queue in config["Scheduling"]["SlurmQueues"]:
            types = {r["InstanceType"] for r in queue["ComputeResources"]}
            queues[queue["Name"]] = (name, types, queue)
    instance_types = {}
    for path in sorted((REPO / "conf" / "cluster").glob("*.yaml")):
        instance = yaml.safe_load(path.read_text()).get("instance_type")
        if instance:
            instance_types[path.stem] = instance
    assert {"p4d.24xlarge", "p5.48xlarge"} <= set(instance_types.values())
    for cluster, instance in instance_types.items():
        family = instance.split(".")[0]
        assert family in queues, f"conf/cluster/{cluster}.yaml: no queue {family!r} for {instance}"
        assert queues[family][1] == {instance}, (cluster, queues[family][:2])


def test_pcluster_configs_are_set_up_for_multi_node_training() -> None:
    configs = pcluster_configs()
    assert {"cluster-p4d.yaml", "cluster-p5.yaml"} <= set(configs)
    for name, config in configs.items():
        assert config["Scheduling"]["Scheduler"] == "slurm", name
        assert config["HeadNode"]["InstanceType"], name
        for queue in config["Scheduling"]["SlurmQueues"]:
            where = f"{name}: queue {queue['Name']}"
            assert queue["Networking"]["PlacementGroup"]["Enabled"] is True, where
            assert queue["HealthChecks"]["Gpu"]["Enabled"] is True, where
            assert queue["JobExclusiveAllocation"] is True, where
            assert len(queue["Networking"]["SubnetIds"]) == 1, f"{where}: EFA needs one AZ"
            for resource in queue["ComputeResources"]:
                assert resource["Efa"]["Enabled"] is True, where
                assert resource["MinCount"] == 0, where
        lustre = [s for s in config["SharedStorage"] if s["StorageType"] == "FsxLustre"]
        assert [s["MountDir"] for s in lustre] == ["/fsx"], name


# --------------------------------------------------------- submitit launcher config
def test_hydra_submitit_launcher_asks_for_one_task_per_device(tmp_path, monkeypatch) -> None:
    """``hydra/launcher=slurm`` produces the sbatch file hydra-submitit-launcher would
    submit: nodes and tasks per node from the trainer, Lightning's requeue signal."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra.utils import instantiate

    fake_bin(tmp_path / "bin", "srun", "exit 0\n")  # submitit checks that srun exists
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(REPO)

    class Submitted(Exception):
        pass

    def capture(self, fn, *args):
        raise Submitted(self._executor._make_submission_file_text("CMD", "uid"))

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    for overrides in (
        ["experiment=gpt_175b_p4de"],
        ["experiment=bert_10b_p3dn", "trainer.num_nodes=2"],
    ):
        cfg = compose(["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides])
        # NOTE: as in a real multirun, the launcher is built before HydraConfig is set.
        launcher = instantiate(cfg.hydra.launcher)
        launcher.config = cfg
        with pytest.raises(Submitted) as submitted:
            launcher.launch([["seed=1"]], 0)
        text = submitted.value.args[0]
        opts = sbatch_options(text)
        assert opts["nodes"] == str(cfg.trainer.num_nodes)
        assert opts["ntasks-per-node"] == str(cfg.trainer.devices)
        assert opts["gres"] == f"gpu:{cfg.cluster.gpus_per_node}"
        assert opts["signal"] == "USR1@90"  # Lightning's, not submitit's USR2
        assert opts["requeue"] is True
        assert f"{AWS_ENV} {cfg.cluster.instance_type}" in text


def test_sweep_dir_is_the_same_where_submitted_and_in_the_job(monkeypatch) -> None:
    """The multirun directory that the submitter creates (and puts ``.submitit/`` logs
    in) is the one every array task writes to, whatever Slurm sets in the job."""
    import pickle
    import time

    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration(
            "train", ["hydra/launcher=slurm", "seed=1,2"], run_mode=RunMode.MULTIRUN
        )
        submitted = str(master.hydra.sweep.dir)
        # the array task, later, on a compute node, from the pickled launcher (as
        # submitit runs BaseSubmititLauncher.__call__)
        master = pickle.loads(pickle.dumps(master))
        monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "777")
        monkeypatch.setenv("SLURM_JOB_ID", "778")
        time.sleep(1.1)  # a later timestamp, had it been resolved anew
        job = loader.load_sweep_config(master, ["seed=2"])
        assert str(job.hydra.sweep.dir) == submitted
        assert "777" not in submitted


def test_multirun_on_slurm_submits_one_array_task_per_sweep_point(tmp_path) -> None:
    """``recipes/train.py -m hydra/launcher=slurm`` end to end up to ``sbatch`` (a fake
    one that keeps the submitted script and fails, so nothing waits for the jobs)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    bin_dir = tmp_path / "bin"
    fake_bin(bin_dir, "srun", "exit 0\n")
    submitted = tmp_path / "submitted.sh"
    fake_bin(bin_dir, "sbatch", f'cp "${{@: -1}}" {submitted}\necho "no Slurm here" >&2\nexit 1\n')
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "recipes" / "train.py"),
            "-m",
            "hydra/launcher=slurm",
            "experiment=gpt_1b3_p4d",
            "trainer.num_nodes=4",
            "strategy.partition_size=8,16",
            f"paths.log_dir={tmp_path}/outputs",
        ],
        cwd=REPO,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert submitted.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    text = submitted.read_text()
    opts = sbatch_options(text)
    assert opts["array"].startswith("0-1"), "one array task per sweep point"
    assert (opts["nodes"], opts["ntasks-per-node"], opts["gres"]) == ("4", "8", "gpu:8")
    assert opts["signal"] == "USR1@90" and opts["requeue"] is True
    assert f"source {AWS_ENV} p4d.24xlarge" in text
    assert "-m submitit.core._submit" in text.splitlines()[-1]


# ------------------------------------------------- 2 nodes x 2 ranks, Slurm-style, on CPU
JOB_ID = "4242"
HOLD_AT_STEP = 2
MAX_STEPS = 4


def start_job(cwd: Path, probe_dir: Path, bin_dir: Path, restart: int | None):
    """``srun`` of recipes/train.py (laptop_gpt, 2 nodes x 2 ranks) with the launch probe."""
    command = [
        sys.executable,
        str(SCRIPTS / "launch_srun.py"),
        "--nodes=2",
        "--ntasks-per-node=2",
        f"--job-id={JOB_ID}",
        "--job-name=laptop_gpt",
        *([f"--restart-count={restart}"] if restart is not None else []),
        "--",
        sys.executable,
        str(REPO / "recipes" / "train.py"),
        "experiment=laptop_gpt",
        "trainer.num_nodes=2",
        *CPU_NODES,
        f"trainer.max_steps={MAX_STEPS}",
        "+callbacks.launch_probe._target_=tests.scripts.launch_probe.LaunchProbe",
        f"+callbacks.launch_probe.out_dir={probe_dir}",
        f"+callbacks.launch_probe.hold_at_step={HOLD_AT_STEP}",
    ]
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    log = open(cwd / f"job{restart or 0}.log", "w")  # noqa: SIM115 (closed by the caller)
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return proc, log


def wait_for(condition, what: str, proc: subprocess.Popen, log: Path, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the job ended ({proc.returncode}) before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{tail(log)}")
        time.sleep(0.2)


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def kill_job(proc: subprocess.Popen) -> None:
    """End the job's whole process group (srun stand-in, ranks, the fake scontrol)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def probes(probe_dir: Path, kind: str) -> list[dict]:
    return [json.loads((probe_dir / f"{kind}_rank{r}.json").read_text()) for r in range(4)]


TASK_SCRIPT = """
import json, os, signal, sys, time
from lightning.fabric.plugins.environments import SLURMEnvironment
out = sys.argv[1]
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
env = SLURMEnvironment()
env.validate_settings(num_devices=2, num_nodes=2)
rank = env.global_rank()
seen = dict(detect=SLURMEnvironment.detect(), world=env.world_size(), rank=rank,
            local=env.local_rank(), node=env.node_rank(), addr=env.main_address,
            port=env.main_port, job_id=env.job_id(), node_id=os.environ["LIGHTNING_MICS_NODE_ID"])
json.dump(seen, open(f"{out}/task{rank}.json", "w"))
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
open(f"{out}/signalled{rank}", "w").close()
sys.exit(0 if got else 3)
"""


def test_srun_stand_in_gives_lightning_a_slurm_job_and_forwards_the_signal(tmp_path) -> None:
    """tests/scripts/launch_srun.py sets what Lightning's SLURMEnvironment reads (it
    detects Slurm and accepts 2 nodes x 2 devices) and, like srun, passes SIGUSR1 on to
    every task."""
    log = tmp_path / "srun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(SCRIPTS / "launch_srun.py"),
                "--nodes=2",
                "--ntasks-per-node=2",
                "--job-id=31337",
                "--master-port=29555",
                "--",
                sys.executable,
                "-c",
                TASK_SCRIPT,
                str(tmp_path),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: all((tmp_path / f"task{r}.json").exists() for r in range(4)),
            "the tasks' reports",
            proc,
            log,
            timeout=120,
        )
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=60) == 0, tail(log)
    finally:
        kill_job(proc)
    for rank in range(4):
        seen = json.loads((tmp_path / f"task{rank}.json").read_text())
        assert seen["detect"] is True
        assert (seen["world"], seen["rank"]) == (4, rank)
        assert (seen["node"], seen["local"]) == divmod(rank, 2)
        assert (seen["addr"], seen["port"], seen["job_id"]) == ("127.0.0.1", 29555, 31337)
        assert seen["node_id"] == f"lmics-node{rank // 2}"
        assert (tmp_path / f"signalled{rank}").exists()


def test_two_node_slurm_job_requeues_and_resumes_from_its_hpc_checkpoint(tmp_path) -> None:
    """4 ranks started as srun would (2 nodes x 2 tasks) train laptop_gpt with MiCS under
    Lightning's SLURMEnvironment; SIGUSR1 to every rank mid-run makes them save
    hpc_ckpt_1.ckpt in the run directory (keyed on the job id) and rank 0 call
    ``scontrol requeue <job id>``; the job is then killed, as Slurm does, and started again
    with the same job id, and it resumes from the checkpoint's global step."""
    probe_dir = tmp_path / "probe"
    scontrol_log = tmp_path / "scontrol.log"
    bin_dir = tmp_path / "bin"
    # Records the call, then blocks like a job that Slurm is about to kill.
    fake_bin(bin_dir, "scontrol", f'echo "$@" >> {scontrol_log}\nexec sleep 300\n')
    run_dir = tmp_path / "outputs" / "laptop_gpt" / JOB_ID

    first, first_log = start_job(tmp_path, probe_dir, bin_dir, restart=None)
    log = tmp_path / "job0.log"
    try:
        ready = [probe_dir / f"ready_rank{r}" for r in range(4)]
        wait_for(lambda: all(p.exists() for p in ready), "every rank's first steps", first, log)
        starts = probes(probe_dir, "start0")
        for rank, start in enumerate(starts):
            assert start["cluster_environment"] == "SLURMEnvironment", start
            assert start["global_rank"] == rank
            assert (start["node_rank"], start["local_rank"]) == divmod(rank, 2)
            assert (start["world_size"], start["num_nodes"], start["num_devices"]) == (4, 2, 2)
            # MiCS: one replica per node (partition_size=node), two replicas.
            assert (start["partition_size"], start["ranks_per_node"]) == (2, 2)
            assert start["replication_size"] == 2
            assert start["global_step"] == 0 and start["ckpt_path"] is None
            assert Path(start["default_root_dir"]) == run_dir.resolve()
        # Slurm's --signal=SIGUSR1@90 reaches every task; they are held after step 2 until
        # it is pending, then let go: the strategy handles it at the next batch boundary.
        for rank in range(4):
            pid = json.loads(ready[rank].read_text())["pid"]
            os.kill(pid, signal.SIGUSR1)
        (probe_dir / "go").write_text("")
        wait_for(scontrol_log.exists, "scontrol requeue", first, log)
        time.sleep(0.5)  # NOTE: a second (wrong) call would append here
    finally:
        kill_job(first)
        first_log.close()

    assert scontrol_log.read_text().split() == ["requeue", JOB_ID], "rank 0 requeues once"
    assert (run_dir / "hpc_ckpt_1.ckpt").exists(), sorted(p.name for p in run_dir.iterdir())
    assert not list(probe_dir.glob("end0_*")), "the first start must not have finished"

    second, second_log = start_job(tmp_path, probe_dir, bin_dir, restart=1)
    try:
        code = second.wait(timeout=400)
    finally:
        kill_job(second)
        second_log.close()
    assert code == 0, tail(tmp_path / "job1.log")
    for start in probes(probe_dir, "start1"):
        assert start["cluster_environment"] == "SLURMEnvironment"
        assert Path(start["default_root_dir"]) == run_dir.resolve()
        assert Path(start["ckpt_path"]).name == "hpc_ckpt_1.ckpt", start
        assert start["global_step"] == HOLD_AT_STEP, "resumed from the requeue checkpoint"
    assert [end["global_step"] for end in probes(probe_dir, "end1")] == [MAX_STEPS] * 4
    assert scontrol_log.read_text().split() == ["requeue", JOB_ID], "no requeue without a signal"


def test_slurm_style_job_on_the_emulated_cluster(tmp_path) -> None:
    """The same Slurm-style job with each node a network namespace (needs root): the
    ranks of different nodes reach each other only over the emulated inter-node links."""
    from benchmarks import emulated_cluster as emu

    try:
        emu.check_available()
    except emu.EmulationUnavailable as err:
        pytest.skip(f"emulated cluster unavailable: {err}")
    probe_dir, logs = tmp_path / "probe", tmp_path / "logs"
    command = [
        sys.executable,
        str(SCRIPTS / "launch_srun.py"),
        "--task",
        "--job-id=5151",
        "--job-name=laptop_gpt",
        "--",
        sys.executable,
        str(REPO / "recipes" / "train.py"),
        "experiment=laptop_gpt",
        "trainer.num_nodes=2",
        *CPU_NODES,
        "trainer.max_steps=2",
        "+callbacks.launch_probe._target_=tests.scripts.launch_probe.LaunchProbe",
        f"+callbacks.launch_probe.out_dir={probe_dir}",
    ]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with emu.EmulatedCluster(2, 2, "1gbit", prefix=f"lmlaunch{os.getpid()}") as cluster:
        result = cluster.run(command, env=env, cwd=tmp_path, timeout=300, log_dir=logs)
    if result.returncode != 0:
        pytest.fail(
            "\n".join(f"--- {f.name}\n{tail(f, 3000)}" for f in sorted(logs.glob("rank*.log")))
        )
    for rank, start in enumerate(probes(probe_dir, "start0")):
        assert start["cluster_environment"] == "SLURMEnvironment"
        assert (start["node_rank"], start["local_rank"]) == divmod(rank, 2)
        assert Path(start["default_root_dir"]).name == "5151"
    assert [end["global_step"] for end in probes(probe_dir, "end0")] == [2] * 4
    # Two-hop sync: every optimizer step all-reduces the fp32 gradient shards across the
    # two replicas (one per node), so each node sends at least its half of the model's
    # gradients per step: 2 steps x 2 nodes x (parameters / 2) x 4 bytes, at the least.
    params = probes(probe_dir, "start0")[0]["parameters"]
    assert result.inter_node_payload_bytes >= 2 * params * 4, result.as_dict()
