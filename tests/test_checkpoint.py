"""Checkpoints: sharded and full save, exact resume (Trainer, Fabric, Slurm requeue),
resharding across topologies, consolidation, crash safety and safe loading.

One Trainer launch on 2 emulated nodes x 2 ranks (partition 4) writes the checkpoints
(``tests/scripts/ckpt_trainer.py``); they are loaded under partition 2 on 4 ranks (with
Fabric too), on 2 ranks and in this process. Crash tests launch one process per rank
without torchrun, whose agent would otherwise kill the surviving ranks itself.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lightning_mics
from lightning_mics import checkpoint as ckpt
from tests.launch import REPO, SCRIPTS, run_script

TOL = 1e-6


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ckpt")
    report = run_script(
        "ckpt_trainer.py", 4, "--partition-size", 4, "--ranks-per-node", 2, "--dir", out
    )
    return out, report


@pytest.fixture(scope="module")
def consolidated(saved) -> tuple[Path, subprocess.CompletedProcess]:
    out, _ = saved
    script = Path(sys.executable).parent / "lightning-mics"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lightning_mics.cli"]
    proc = subprocess.run(
        [
            *cmd,
            "consolidate",
            str(out / "sharded"),  # a directory of checkpoints: the newest is step=6
            str(out / "consolidated.safetensors"),
            "--torch-out",
            str(out / "consolidated.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out, proc


@pytest.fixture(scope="module")
def reshard_w4(saved, consolidated) -> dict:
    out, _ = saved
    args = ("--partition-size", 2, "--ranks-per-node", 2, "--dir", out, "--fabric")
    return run_script("ckpt_reshard.py", 4, *args)


# ----------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("kind", ["sharded", "full", "hpc"])
def test_exact_resume(saved, kind: str) -> None:
    _, report = saved
    assert report["uninterrupted_steps"] == 6 and report["num_losses"] == 12
    result = report[f"resume_{kind}"]
    assert result["global_step"] == 6
    assert result["batches_skipped"] == 6  # loop progress: resumed after step 3
    assert result["num_losses"] == 6
    assert result["loss_diff"] <= TOL, result
    assert result["param_diff"] <= TOL, result
    assert result["lr"] == pytest.approx(report["uninterrupted_lr"])  # scheduler state


def test_slurm_requeue_writes_and_resumes_a_sharded_hpc_checkpoint(saved) -> None:
    out, report = saved
    # Ranks got the signal at different batches; one checkpoint was written, together.
    assert report["root_entries"] == ["hpc_ckpt_1.ckpt"]
    assert ckpt.is_sharded_checkpoint(out / "root" / "hpc_ckpt_1.ckpt")
    assert report["resume_hpc"]["ckpt_path"].endswith("hpc_ckpt_1.ckpt")


def test_modelcheckpoint_writes_sharded_directories(saved) -> None:
    out, report = saved
    # last.ckpt (saved at step 3) was replaced at step 6, and nothing else is left.
    assert report["sharded_dirs"] == ["last.ckpt", "step=3.ckpt", "step=6.ckpt"]
    assert ckpt.load_meta(out / "sharded" / "last.ckpt")["global_step"] == 6
    marker = ckpt.verify_sharded(out / "sharded" / "step=3.ckpt")
    assert marker["partition_size"] == 4 and marker["world_size"] == 4
    full = ckpt.load_full(out / "full" / "step3.ckpt")
    assert full["global_step"] == 3 and ckpt.FULL_MARKER_KEY not in full
    assert ckpt.checkpoint_kind(out / "full" / "step3.ckpt") == "full"


def test_saving_mid_accumulation_window_warns(saved) -> None:
    _, report = saved
    (message,) = report["mid_window_warning"]
    assert "1 of 2 micro-batches" in message and "not saved" in message


def test_resume_from_directory_picks_newest_complete(saved) -> None:
    out, report = saved
    result = report["resume_dir"]
    assert result["global_step"] == 6 and result["param_diff"] == 0.0
    # the incomplete "step=9.ckpt" and the interrupted save are not candidates; last.ckpt
    # was written after step=6.ckpt
    assert ckpt.find_latest_checkpoint(out / "sharded") == out / "sharded" / "last.ckpt"


# ------------------------------------------------------------------------- resharding
def test_reshard_to_partition_2_on_4_ranks(reshard_w4) -> None:
    trainer = reshard_w4["trainer"]
    assert "partition_size=2" in trainer["topology"] and "replication_size=2" in trainer["topology"]
    assert trainer["global_step"] == 3
    assert trainer["model_diff"] == 0.0 and trainer["optimizer_diff"] == 0.0
    assert trainer["scheduler_equal"]


def test_reshard_to_2_ranks(saved) -> None:
    out, _ = saved
    args = ("--partition-size", 2, "--ranks-per-node", 2, "--dir", out)
    trainer = run_script("ckpt_reshard.py", 2, *args)["trainer"]
    assert "2 ranks" in trainer["topology"]
    assert trainer["model_diff"] == 0.0 and trainer["optimizer_diff"] == 0.0
    assert trainer["scheduler_equal"]


def test_reshard_to_one_process(saved) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from tests.scripts import ckpt_common as cc

    out, _ = saved
    ref = torch.load(out / "ref3.pt", weights_only=True)
    module = cc.LitGPT(seed=11)
    optimizer = cc.make_optimizer(module.parameters())
    meta = lightning_mics.load_checkpoint(
        out / "sharded" / "step=3.ckpt", module, optimizer, optimizer_key="optimizer_0"
    )
    assert meta["global_step"] == 3
    assert cc.state_diff(dict(module.state_dict()), ref["model"]) == 0.0
    state = get_optimizer_state_dict(module, optimizer)["state"]
    assert cc.state_diff(state, ref["optimizer"]["state"]) == 0.0


def test_each_shard_is_written_once(saved, reshard_w4) -> None:
    out, _ = saved
    # Saved with partition 2 and 2 replicas: every chunk of every tensor once.
    replicated = out / "resaved-w4-p2.ckpt"
    metadata = ckpt.read_metadata(replicated)
    for name, meta in metadata.state_dict_metadata.items():
        if hasattr(meta, "chunks"):
            offsets = [tuple(c.offsets) for c in meta.chunks]
            assert len(offsets) == len(set(offsets)), name
            covered = sum(torch.Size(c.sizes).numel() for c in meta.chunks)
            assert covered == meta.size.numel(), name
    assert len(metadata.storage_data) == sum(
        len(m.chunks) if hasattr(m, "chunks") else 1 for m in metadata.state_dict_metadata.values()
    )
    # Bytes: about those of the unreplicated (partition 4) checkpoint, not twice as many.
    data = sum(v for k, v in ckpt.written_bytes(replicated).items() if k.endswith(".distcp"))
    single = sum(
        v
        for k, v in ckpt.written_bytes(out / "sharded" / "step=3.ckpt").items()
        if k.endswith(".distcp")
    )
    assert data < 1.2 * single, (data, single)


# --------------------------------------------------------------------------- Fabric
def test_fabric_loads_trainer_checkpoint_of_other_topology(reshard_w4) -> None:
    fabric = reshard_w4["fabric"]
    assert fabric["trainer_ckpt_model_diff"] == 0.0
    assert fabric["trainer_ckpt_optimizer_diff"] == 0.0
    assert fabric["trainer_ckpt_global_step"] == 3


@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_fabric_exact_resume(reshard_w4, kind: str) -> None:
    result = reshard_w4["fabric"][f"fabric_resume_{kind}"]
    assert result["step"] == 3 and result["num_losses"] == 6 and result["rest"] == []
    assert result["loss_diff"] <= TOL and result["param_diff"] <= TOL


# ---------------------------------------------------------------------- consolidation
def test_consolidate_cli_writes_a_strict_loadable_file(saved, consolidated) -> None:
    from safetensors.torch import load_file

    from tests.scripts import ckpt_common as cc

    out, proc = consolidated
    assert proc.returncode == 0, proc.stderr
    final = torch.load(out / "final.pt", weights_only=True)
    for state in (
        load_file(out / "consolidated.safetensors"),
        torch.load(out / "consolidated.pt", weights_only=True),
    ):
        module = cc.LitGPT(seed=4)
        module.load_state_dict(state, strict=True)
        assert cc.state_diff(dict(module.state_dict()), final) == 0.0


def test_mics_run_initialised_from_a_full_model_file(reshard_w4) -> None:
    assert reshard_w4["fabric"]["init_from_file_diff"] == 0.0


def test_consolidate_cli_reports_errors(tmp_path) -> None:
    from lightning_mics.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["consolidate", str(tmp_path / "empty"), str(tmp_path / "x.safetensors")]) == 1


@pytest.mark.parametrize(
    ("source", "flag", "reference"),
    [
        ("sharded/step=6.ckpt", "--submodule=model", "final.pt"),
        ("full/step3.ckpt", "--prefix=model.", "ref3.pt"),
    ],
)
def test_consolidate_a_submodule_loads_into_the_bare_network(
    saved, tmp_path, capsys, source: str, flag: str, reference: str
) -> None:
    """LitGPT holds its GPT as ``self.model``: the export loads into a bare GPT."""
    from safetensors.torch import load_file

    from lightning_mics.cli import main
    from tests.scripts import ckpt_common as cc

    out, _ = saved
    export, torch_export = tmp_path / "gpt.safetensors", tmp_path / "gpt.pt"
    args = [str(out / source), str(export), flag, "--torch-out", str(torch_export)]
    assert main(["consolidate", *args]) == 0, capsys.readouterr().err
    expected = torch.load(out / reference, weights_only=True)
    expected = expected.get("model", expected)  # ref3.pt: {"model": ..., "optimizer": ...}
    expected = {k.removeprefix("model."): v for k, v in expected.items()}
    for state in (load_file(export), torch.load(torch_export, weights_only=True)):
        gpt = cc.make_model(seed=4)
        gpt.load_state_dict(state, strict=True)
        assert cc.state_diff(dict(gpt.state_dict()), expected) == 0.0

    assert main(["consolidate", str(out / source), str(export), "--submodule", "gpt"]) == 1
    err = capsys.readouterr().err
    assert "no submodule 'gpt'" in err and "'model'" in err


# --------------------------------------------------------------------- discovery
def _lightning_style_checkpoint(path: Path, payload: object = None) -> None:
    """What Lightning's own strategies write (``torch.save`` of the checkpoint dict)."""
    checkpoint = {
        "state_dict": {"w": torch.zeros(2)},
        "pytorch-lightning_version": "2.6.6",
        "epoch": 0,
        "global_step": 3,
    }
    if payload is not None:
        checkpoint["hyper_parameters"] = {"object": payload}
    torch.save(checkpoint, path)


def test_only_checkpoints_count_as_the_newest_in_a_directory(tmp_path, caplog) -> None:
    from tests.scripts import common

    model = common.make_model(seed=0)
    old = time.time() - 100
    _lightning_style_checkpoint(tmp_path / "lightning.ckpt")
    os.utime(tmp_path / "lightning.ckpt", (old, old))
    assert ckpt.checkpoint_kind(tmp_path / "lightning.ckpt") == "lightning"
    assert ckpt.find_latest_checkpoint(tmp_path) == tmp_path / "lightning.ckpt"

    lightning_mics.save_checkpoint(tmp_path / "step-1", model)
    lightning_mics.save_checkpoint(tmp_path / "step-2.pt", model, state_dict_type="full")
    # Newer files that are no checkpoints: exports (also of a sharded checkpoint), plain
    # state dicts, a torch file of anything else.
    ckpt.consolidate_checkpoint(
        tmp_path / "step-1", tmp_path / "export.safetensors", torch_out=tmp_path / "export.pt"
    )
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "state.ckpt")
    torch.save([1, 2], tmp_path / "list.ckpt")
    (tmp_path / "notes.ckpt").write_text("not a zip file")
    kinds = {p.name: ckpt.checkpoint_kind(p) for p in tmp_path.iterdir()}
    assert kinds == {
        "lightning.ckpt": "lightning",
        "step-1": "sharded",
        "step-2.pt": "full",
        "export.safetensors": None,
        "export.pt": None,
        "weights.pth": None,
        "state.ckpt": None,
        "list.ckpt": None,
        "notes.ckpt": None,
    }
    assert ckpt.find_latest_checkpoint(tmp_path) == tmp_path / "step-2.pt"
    with caplog.at_level("INFO", logger="lightning_mics.checkpoint"):
        lightning_mics.load_checkpoint(tmp_path, common.make_model(seed=1))
    assert f"newest complete checkpoint in {tmp_path}: step-2.pt" in caplog.text

    (tmp_path / "step-2.pt").unlink()
    assert ckpt.find_latest_checkpoint(tmp_path) == tmp_path / "step-1"


def test_recognising_a_checkpoint_runs_no_pickled_code(tmp_path) -> None:
    pwned = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = pwned
    _lightning_style_checkpoint(tmp_path / "evil.ckpt", exploit)
    assert ckpt.checkpoint_kind(tmp_path / "evil.ckpt") == "lightning"
    assert ckpt.find_latest_checkpoint(tmp_path) == tmp_path / "evil.ckpt"
    assert not pwned.exists()


# -------------------------------------------------------------------- safety and damage
class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _copy(saved, tmp_path: Path) -> Path:
    out, _ = saved
    target = tmp_path / "step=6.ckpt"
    shutil.copytree(out / "sharded" / "step=6.ckpt", target)
    return target


def _load_one_process(path: Path) -> None:
    from tests.scripts import ckpt_common as cc

    module = cc.LitGPT()
    lightning_mics.load_checkpoint(path, module)


def test_loading_never_runs_pickled_code(saved, tmp_path) -> None:
    pwned = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = pwned
    for name in (ckpt.META_FILE, ".metadata"):
        path = _copy(saved, tmp_path / name)
        file = path / name
        payload = pickle.dumps(exploit) if name == ".metadata" else None
        if payload is None:
            torch.save({"x": exploit}, file)
        else:
            file.write_bytes(payload)
        marker = ckpt.read_marker(path)
        marker["files"][name] = file.stat().st_size
        (path / ckpt.MARKER_FILE).write_text(__import__("json").dumps(marker))
        with pytest.raises(ckpt.CheckpointError, match=name):
            _load_one_process(path)
        assert not pwned.exists()


def test_truncated_or_corrupt_files_name_the_file(saved, tmp_path) -> None:
    path = _copy(saved, tmp_path / "truncated")
    shard = sorted(path.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=f"{shard}.*truncated"):
        _load_one_process(path)

    path = _copy(saved, tmp_path / "garbage")
    shard = sorted(path.glob("*.distcp"))[-1]
    shard.write_bytes(b"\0" * shard.stat().st_size)
    with pytest.raises(ckpt.CheckpointError, match=str(shard)):
        _load_one_process(path)

    out, _ = saved
    full = tmp_path / "step3.ckpt"
    full.write_bytes((out / "full" / "step3.ckpt").read_bytes()[:5000])
    with pytest.raises(ckpt.CheckpointError, match=str(full)):
        _load_one_process(full)

    path = _copy(saved, tmp_path / "unmarked")
    (path / ckpt.MARKER_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="completion marker"):
        _load_one_process(path)


# ---------------------------------------------------------------------------- crashes
def _launch_ranks(mode: str, world: int, workdir: Path, timeout: float, *args: str) -> list[tuple]:
    """One process per rank, no agent; returns (returncode, stderr) per rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "LOCAL_RANK": str(rank),
            "RANK": str(rank),
            "NODE_RANK": "0",
            "WORLD_SIZE": str(world),
        }
        cmd = [sys.executable, str(SCRIPTS / "ckpt_crash.py"), "--dir", str(workdir)]
        cmd += ["--mode", mode, "--timeout", str(timeout), *args]
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(
                f"rank {procs.index(proc)} hangs after another rank died"
            ) from None
        results.append((proc.returncode, err))
    return results


def _failure_delays(results, workdir: Path) -> list[float]:
    died = float((workdir / "victim-died").read_text())
    delays = []
    for rc, err in results:
        if rc == -9:
            continue
        assert rc != 0, err[-3000:]
        line = [x for x in err.splitlines() if x.startswith("FAILED-AT ")]
        assert line, err[-3000:]
        delays.append(float(line[-1].split()[1]) - died)
    return delays


def test_rank_killed_while_writing_leaves_no_complete_checkpoint(tmp_path) -> None:
    timeout = 10.0
    results = _launch_ranks("save", 2, tmp_path, timeout)
    assert results[1][0] == -9  # the victim
    err = results[0][1]
    assert "CheckpointError" in err and "did a rank die?" in err, err[-3000:]
    assert max(_failure_delays(results, tmp_path)) < timeout + 20
    # The interrupted save was never published; the previous one is the newest complete.
    assert not (tmp_path / "step-2").exists()
    partial = list(tmp_path.glob(f"{ckpt.TMP_PREFIX}*"))
    assert partial and not (partial[0] / ckpt.MARKER_FILE).exists()
    assert ckpt.find_latest_checkpoint(tmp_path) == tmp_path / "step-1"
    from tests.scripts import common

    model = common.make_model(seed=3)
    lightning_mics.load_checkpoint(tmp_path, model)  # resumes from step-1


def test_rank_killed_in_training_makes_the_others_exit(tmp_path) -> None:
    timeout = 10.0
    started = time.monotonic()
    results = _launch_ranks("train", 4, tmp_path, timeout)
    assert results[1][0] == -9
    delays = _failure_delays(results, tmp_path)
    assert len(delays) == 3 and max(delays) < timeout + 20, delays
    for rc, err in results:
        if rc != -9:
            assert any(
                s in err for s in ("Connection closed by peer", "Connection reset", "Timed out")
            ), err[-3000:]
    assert time.monotonic() - started < 200


# Killed at each step of replacing "last.ckpt": (formats of the old and the new one,
# step, the step whose state is then readable). A file replaces a file in one atomic
# rename (no step between "written" and done); anything else goes through an aside.
REPLACE_KILLS = [
    ("full,full", "written", 1),  # new one complete under its temporary name
    ("sharded,sharded", "set-aside", 1),  # old one renamed aside, name missing
    ("sharded,sharded", "renamed-in", 2),  # new one in place, old one still aside
    ("sharded,full", "set-aside", 1),  # a file replaces a directory
]


def _lightning_last(directory: Path) -> Path:
    """What ``Trainer.fit(ckpt_path="last")`` loads (Lightning's own lookup)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    found = ModelCheckpoint(dirpath=directory)._find_last_checkpoints(None)
    return Path(max(found, key=os.path.getmtime))


def _model_from(path: Path):
    from tests.scripts import common

    model = common.make_model(seed=5)
    lightning_mics.load_checkpoint(path, model)
    return model.state_dict()


@pytest.mark.parametrize(("formats", "kill_at", "readable"), REPLACE_KILLS)
def test_killed_while_replacing_a_checkpoint_leaves_the_old_or_the_new(
    tmp_path, caplog, formats: str, kill_at: str, readable: int
) -> None:
    from tests.scripts import common

    args = ("--victim", "0", "--kill-at", kill_at, "--formats", formats)
    results = _launch_ranks("replace", 2, tmp_path, 10.0, *args)
    assert results[0][0] == -9, results[0][1][-3000:]  # rank 0 died at that step
    _failure_delays(results, tmp_path)  # and rank 1 failed instead of hanging
    last, aside = tmp_path / "last.ckpt", tmp_path / "last.mics-old.ckpt"
    assert last.exists() == (kill_at != "set-aside")
    assert aside.exists() == (kill_at in ("set-aside", "renamed-in"))
    new_one_unpublished = [p for p in tmp_path.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]
    assert bool(new_one_unpublished) == (kill_at in ("written", "set-aside"))
    expected = torch.load(tmp_path / f"ref-{readable}.pt", weights_only=True)

    # Every reader finds a complete checkpoint holding the old or the new state: by its
    # name, as the newest in the directory, and through Lightning's ckpt_path="last".
    with caplog.at_level("INFO", logger="lightning_mics.checkpoint"):
        assert common.max_abs_diff(_model_from(last), expected) == 0.0
    if kill_at == "set-aside":
        assert "interrupted" in caplog.text and str(aside) in caplog.text
    newest = ckpt.find_latest_checkpoint(tmp_path)  # ref-*.pt (plain state dicts) ignored
    assert newest == (aside if kill_at == "set-aside" else last)
    assert common.max_abs_diff(_model_from(tmp_path), expected) == 0.0
    assert common.max_abs_diff(_model_from(_lightning_last(tmp_path)), expected) == 0.0

    # The next save into the directory restores or removes what the crash left.
    model = common.make_model(seed=6)
    lightning_mics.save_checkpoint(tmp_path / "other.ckpt", model, state_dict_type="full")
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert entries == ["last.ckpt", "other.ckpt", "ref-1.pt", "ref-2.pt", "victim-died"]
    assert common.max_abs_diff(_model_from(last), expected) == 0.0
    lightning_mics.save_checkpoint(last, model)  # replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == entries
    assert common.max_abs_diff(_model_from(last), model.state_dict()) == 0.0


# ------------------------------------------------------- optimizer without tensor state
def test_optimizer_without_tensor_state_saves_and_loads(tmp_path) -> None:
    """SGD without momentum keeps no tensor state: a full checkpoint of it used to fail
    to load ("Expected device to be set")."""
    report = run_script("ckpt_stateless_optim.py", 2, "--dir", tmp_path)
    for kind in ("full", "sharded"):
        for api in ("trainer", "fabric", "plain"):
            result = report[kind][api]
            assert result["model_diff"] == 0.0, (kind, api, result)
            assert result["lr"] == 0.05, (kind, api, result)  # not the new optimizer's 0.5
        assert report[kind]["trainer"]["global_step"] == 2
        assert report[kind]["fabric"]["step"] == 1


def test_optimizer_without_tensor_state_in_one_process(tmp_path) -> None:
    from recipes.gpt import GPT
    from tests.scripts import common

    model = common.make_model(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randint(0, common.TINY.vocab_size, (2, common.SEQ_LEN))
    GPT.loss(model(x), x).backward()
    optimizer.step()
    for kind in ("full", "sharded"):
        path = tmp_path / kind
        lightning_mics.save_checkpoint(path, model, optimizer, state_dict_type=kind)
        loaded = common.make_model(seed=1)
        loaded_optimizer = torch.optim.SGD(loaded.parameters(), lr=0.5)
        assert lightning_mics.load_checkpoint(path, loaded, loaded_optimizer) == {}
        assert common.max_abs_diff(loaded.state_dict(), model.state_dict()) == 0.0
        assert loaded_optimizer.param_groups[0]["lr"] == 0.05
