"""The Hydra recipes (conf/, recipes/): every config composes and builds, bad configs fail
before anything is launched, the data pipeline, and short MiCS training runs on 2 emulated
nodes x 2 ranks (GPT and BERT on real text, the Trainer and Fabric)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from recipes.bert import IGNORE_INDEX
from recipes.config import ConfigError, accumulation, count_parameters, validate_config
from recipes.data import (
    BYTE_VOCAB_SIZE,
    MaskedWindows,
    NextTokenWindows,
    TokenCache,
    byte_vocab,
    find_text_files,
    mask_tokens,
)
from recipes.datamodules import TextDataModule
from recipes.lit import WarmupCosine, network_flops

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
HAS_GPU = torch.cuda.is_available()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(*overrides: str, output_dir: str = "/tmp/recipes-test", hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "train",
            overrides=[*overrides, f"paths.output_dir={output_dir}"],
            return_hydra_config=hydra_cfg,
        )


def on_this_machine(*overrides: str) -> list[str]:
    """GPU configs built (not run) on a machine without GPUs: CPU devices instead."""
    return [*overrides, "trainer.accelerator=cpu"] if not HAS_GPU else list(overrides)


def run_recipe(
    script: str, *overrides: str, cwd: Path, timeout: float = 400
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("SLURM_JOB_ID", None)
    env.pop("SLURM_NTASKS", None)
    return subprocess.run(
        [sys.executable, str(REPO / "recipes" / script), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --------------------------------------------------------------------- composition
GROUPS = ["model", "data", "strategy", "cluster", "experiment", "logger", "callbacks"]


@pytest.mark.parametrize(
    "group, option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda v: str(v)
)
def test_every_config_composes_and_resolves(group, option) -> None:
    cfg = compose_cfg(f"{group}={option}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key in ("trainer", "model", "data", "strategy", "cluster", "paths"):
        assert resolved[key], key
    for key in ("num_nodes", "devices", "accelerator", "precision"):
        assert key in resolved["trainer"], key
    for key in ("name", "instance_type", "gpus_per_node", "gpu_memory_gb", "peak_tflops"):
        assert key in resolved["cluster"], key
    assert resolved["model"]["_target_"] == "recipes.lit.LanguageModel"
    assert resolved["model"]["optimizer"]["_partial_"] is True


def test_cfg_job_prints_the_composed_config(tmp_path) -> None:
    proc = run_recipe("train.py", "experiment=laptop_bert", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["arch"] == "bert"
    assert cfg["data"]["objective"] == "mlm"
    assert cfg["strategy"]["name"] == "mics"
    assert not (tmp_path / "outputs").exists(), "--cfg job must not start a run"


def test_run_directory_is_keyed_on_the_slurm_job(monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = compose_cfg("experiment=laptop_gpt", hydra_cfg=True)
    assert cfg.hydra.run.dir == "outputs/laptop_gpt/4242"
    monkeypatch.delenv("SLURM_JOB_ID")
    cfg = compose_cfg("experiment=laptop_gpt", hydra_cfg=True)
    assert re.fullmatch(r"outputs/laptop_gpt/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", cfg.hydra.run.dir)
    # Checkpoints (and Slurm's hpc_ckpt_*) go to the run directory.
    assert cfg.trainer.default_root_dir == cfg.paths.output_dir


# ---------------------------------------------------------------------------- models
NAMED = [m for m in options("model") if compose_cfg(f"model={m}").model.nominal_params]


@pytest.mark.parametrize("name", NAMED)
def test_model_size_matches_its_name(name) -> None:
    """``instantiate(cfg.model)`` on the meta device builds the LightningModule of any size
    without memory; its parameter count is within 5% of the name."""
    cfg = compose_cfg(f"model={name}")
    with torch.device("meta"):
        module = instantiate(cfg.model)
    params = list(module.parameters())
    assert all(p.is_meta for p in params)
    count = sum(p.numel() for p in params)
    nominal = cfg.model.nominal_params
    assert abs(count - nominal) / nominal < 0.05, f"{name}: {count:,} vs {nominal:,}"
    assert count == count_parameters(cfg)
    blocks = module.model.transformer.h if cfg.model.arch == "gpt" else module.model.encoder
    assert len(blocks) == cfg.model.n_layer  # one FSDP unit each under MiCS's default policy


def test_tied_embeddings_are_one_parameter() -> None:
    with torch.device("meta"):
        gpt = instantiate(compose_cfg("model=gpt_125m").model).model
        bert = instantiate(compose_cfg("model=bert_base").model).model
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    assert bert.mlm_head.decoder.weight is bert.embeddings.word.weight


def test_flops_per_batch_counts_forward_and_backward() -> None:
    cfg = compose_cfg("experiment=laptop_gpt")
    module = instantiate(cfg.model)
    flops = network_flops("gpt", module.config, batch=8, seq_len=64)
    tokens = 8 * 64
    # 6 FLOPs per parameter and token (2 forward, 4 backward) for the matmuls, plus attention.
    n = sum(p.numel() for p in module.parameters())
    assert 6 * n * tokens * 0.9 < flops < 6 * n * tokens * 2


def test_warmup_cosine_schedule() -> None:
    f = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)


# ----------------------------------------------------------- building without launching
@pytest.mark.parametrize("experiment", options("experiment"))
@pytest.mark.filterwarnings(
    "ignore:You passed `Trainer\\(accelerator='cpu', precision='16-mixed'\\)`"
)
def test_experiment_builds_without_launching(tmp_path, experiment) -> None:
    import torch.distributed as dist

    from lightning_mics import MiCSStrategy
    from recipes.datamodules import SyntheticDataModule
    from recipes.train import build

    cfg = compose_cfg(*on_this_machine(f"experiment={experiment}"), output_dir=str(tmp_path))
    plan = validate_config(cfg)
    module, datamodule, trainer = build(cfg)
    assert not dist.is_initialized(), "building must not start any process group"
    assert all(p.is_meta for p in module.parameters()), "sharded runs start on the meta device"
    assert isinstance(trainer.strategy, MiCSStrategy)
    mics = trainer.strategy.mics.config
    assert mics.partition_size == cfg.strategy.partition_size
    assert mics.ranks_per_node == cfg.strategy.ranks_per_node
    assert trainer.num_nodes == cfg.trainer.num_nodes
    assert trainer.num_devices == cfg.trainer.devices
    assert trainer.accumulate_grad_batches == accumulation(cfg)
    assert trainer.default_root_dir == str(tmp_path)
    assert plan.world_size == cfg.trainer.num_nodes * cfg.trainer.devices
    assert plan.params == sum(p.numel() for p in module.parameters())
    expected = TextDataModule if cfg.data.name == "text" else SyntheticDataModule
    assert isinstance(datamodule, expected)
    assert datamodule.objective == ("next_token" if cfg.model.arch == "gpt" else "mlm")
    if cfg.cluster.peak_tflops:
        monitor = next(c for c in trainer.callbacks if type(c).__name__ == "ThroughputMonitor")
        assert monitor.peak_tflops == cfg.cluster.peak_tflops


@pytest.mark.parametrize("strategy", options("strategy"))
def test_the_same_experiment_runs_under_every_strategy(tmp_path, strategy) -> None:
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from lightning_mics import MiCSStrategy
    from lightning_mics.callbacks import CommStatsMonitor
    from recipes.train import build

    cfg = compose_cfg("experiment=laptop_gpt", f"strategy={strategy}", output_dir=str(tmp_path))
    module, _, trainer = build(cfg)
    has_comm_stats = any(isinstance(c, CommStatsMonitor) for c in trainer.callbacks)
    if strategy in ("mics", "hsdp"):
        assert isinstance(trainer.strategy, MiCSStrategy)
        config = trainer.strategy.mics.config
        assert config.ranks_per_node == 2
        if strategy == "hsdp":
            assert config.partition_size == "node"
            assert config.hierarchical is False
            assert config.accumulation.value == "every_micro_step"
        assert has_comm_stats
    elif strategy == "fsdp":
        assert isinstance(trainer.strategy, ModelParallelStrategy)
        assert module.parallelize is not None
        assert not has_comm_stats
    else:
        assert isinstance(trainer.strategy, DDPStrategy)
        assert not any(p.is_meta for p in module.parameters()), "DDP needs the whole model"
        assert not has_comm_stats
    # A multi-node experiment swaps too: fsdp/ddp ignore the MiCS-only partition_size.
    big = compose_cfg(*on_this_machine("experiment=gpt_1b3_p4d", f"strategy={strategy}"))
    validate_config(big)


# ------------------------------------------------------------------------ bad configs
BAD = [
    (["experiment=laptop_gpt", "strategy.partition_size=3"], r"does not divide world_size=4"),
    (["experiment=laptop_gpt", "strategy.ranks_per_node=3"], r"ranks_per_node=3 does not divide"),
    (
        ["experiment=laptop_gpt", "+strategy.parition_size=2"],
        r"strategy.parition_size is not a MiCS",
    ),
    (["experiment=laptop_gpt", "strategy.accumulation=sometimes"], r"'sometimes' is not one of"),
    (
        ["experiment=laptop_gpt", "strategy=hsdp", "strategy.partition_size=4"],
        r"hsdp shards inside",
    ),
    (
        ["experiment=laptop_gpt", "strategy=ddp", "+strategy.bucket=1"],
        r"not an option of strategy=ddp",
    ),
    (["experiment=laptop_gpt", "model.n_head=3"], r"n_embd=128 is not divisible by model.n_head=3"),
    (["experiment=laptop_gpt", "data.seq_len=128"], r"exceeds model.block_size=64"),
    (["experiment=laptop_gpt", "model.vocab_size=100"], r"set model.vocab_size>=260"),
    (["experiment=laptop_gpt", "data.vocab_size=1000"], r"tokenizer=byte has a fixed"),
    (["experiment=laptop_gpt", "data.tokenizer=bpe"], r"data.vocab_size=8192"),
    (["experiment=laptop_gpt", "data.source=/no/such/corpus"], r"does not exist"),
    (["experiment=laptop_bert", "data=text"], r"BERT \(masked-LM\) model .* use data=text_mlm"),
    (["experiment=laptop_gpt", "data=text_mlm"], r"GPT \(next-token\) model .* use data=text"),
    (["experiment=laptop_gpt", "data.global_batch_size=100"], r"micro-batch does not divide"),
    (
        ["experiment=laptop_gpt", "data.global_batch_size=64", "trainer.accumulate_grad_batches=4"],
        r"accumulate_grad_batches=4 disagrees",
    ),
    (["experiment=laptop_gpt", "trainer.num_nodes=2"], r"cluster=local_cpu runs every rank"),
    (["experiment=laptop_gpt", "trainer.devices=0"], r"trainer.devices must be a positive"),
    (["experiment=laptop_gpt", "callbacks.throughput.window_size=1"], r"window_size must be >= 2"),
    (["experiment=bert_10b_p3dn", "trainer.precision=bf16-mixed"], r"has no bf16"),
    # The example: 175B in partitions of 16 A100-80GB cannot hold the model states.
    (
        [
            "experiment=gpt_175b_p4de",
            "trainer.num_nodes=16",
            "strategy.partition_size=16",
            "trainer.accumulate_grad_batches=8",
        ],
        r"need 162.6 GiB per GPU.*Use strategy.partition_size=64",
    ),
    (
        ["experiment=gpt_100b_p4d", "strategy=hsdp", "strategy.partition_size=node"],
        r"Use strategy=mics strategy.partition_size=64",
    ),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o[1:]) for o, _ in BAD])
def test_bad_config_says_what_to_change(overrides, message) -> None:
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_bad_config_fails_before_any_process_starts(tmp_path) -> None:
    proc = run_recipe(
        "train.py", "experiment=laptop_gpt", "strategy.partition_size=3", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Config error: strategy.partition_size=3" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Initializing distributed" not in proc.stdout + proc.stderr
    proc = run_recipe("train.py", "model=gpt_7b", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'model/gpt_7b'" in proc.stderr
    assert "gpt_6b7" in proc.stderr  # Hydra lists the available sizes


def test_dry_run_prints_the_plan_and_launches_nothing(tmp_path) -> None:
    proc = run_recipe("train.py", "experiment=gpt_175b_p4de", "dry_run=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "174,604.84M parameters" in proc.stdout
    assert "partition_size 64 (spans 8 nodes) -> 2 replica(s)" in proc.stdout
    assert "40.7 GiB per rank" in proc.stdout
    assert "Initializing distributed" not in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ data
def write_corpus(directory: Path, n_files: int = 3, repeat: int = 200) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_files):
        path = directory / f"doc{i}.txt"
        path.write_text(f"file {i}: the quick brown fox jumps over the lazy dog. é\n" * repeat)
        files.append(path)
    return files


def test_text_is_tokenized_once_into_a_memory_mapped_cache(tmp_path) -> None:
    files = write_corpus(tmp_path / "corpus")
    dm = TextDataModule(
        "next_token", seq_len=16, micro_batch_size=4, cache_dir=tmp_path / "cache",
        source=str(tmp_path / "corpus"), pattern="*.txt", val_fraction=0.1,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    tokens = dm.cache.tokens()
    assert isinstance(tokens, np.memmap)  # read from disk on demand, shared by workers
    expected = []
    for f in sorted(files):
        expected += [*f.read_bytes(), byte_vocab().eos_id]  # every document ends with EOS
    assert tokens.tolist() == expected
    # Windows: targets are the inputs shifted by one; validation is the held-out tail.
    x, y = dm.train_set[3]
    assert torch.equal(x[1:], y[:-1]) and x.shape == (16,)
    assert torch.equal(x, torch.tensor(expected[48:64]))
    split = len(tokens) - int(len(tokens) * 0.1)
    val_x, _ = dm.val_set[0]
    assert torch.equal(val_x, torch.tensor(expected[split : split + 16]))
    assert len(dm.train_set) * 16 <= split
    # A second data module finds the cache (same files, same tokenizer): no rebuild.
    built = (dm.cache.directory / "tokens.bin").stat().st_mtime_ns
    again = TextDataModule(
        "next_token", 16, 4, cache_dir=tmp_path / "cache", source=str(tmp_path / "corpus"),
        pattern="*.txt",
    )  # fmt: skip
    assert again.cache == dm.cache
    again.prepare_data()
    assert (dm.cache.directory / "tokens.bin").stat().st_mtime_ns == built
    # Another tokenizer or changed text: another cache.
    files[0].write_text("changed\n")
    changed = TokenCache.locate(tmp_path / "cache", sorted(files), "byte", BYTE_VOCAB_SIZE)
    assert changed.directory != dm.cache.directory


def test_concurrent_cache_builds_publish_one_complete_cache(tmp_path) -> None:
    files = write_corpus(tmp_path / "corpus")
    cache = TokenCache.locate(tmp_path / "cache", files, "byte", BYTE_VOCAB_SIZE)
    errors = []

    def build() -> None:
        try:
            cache.build(files, "byte", BYTE_VOCAB_SIZE)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.ready
    assert len(cache.tokens()) == sum(f.stat().st_size + 1 for f in files)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]


def test_setup_without_prepare_data_says_so(tmp_path) -> None:
    write_corpus(tmp_path / "corpus")
    dm = TextDataModule(
        "next_token", 16, 4, cache_dir=tmp_path / "cache", source=str(tmp_path / "corpus"),
        pattern="*.txt",
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="prepare_data"):
        dm.setup("fit")


def test_bpe_tokenizer_is_trained_locally_and_cached(tmp_path) -> None:
    pytest.importorskip("tokenizers")
    write_corpus(tmp_path / "corpus", repeat=50)
    dm = TextDataModule(
        "mlm", seq_len=32, micro_batch_size=2, cache_dir=tmp_path / "cache",
        source=str(tmp_path / "corpus"), pattern="*.txt", tokenizer="bpe", vocab_size=320,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.cache.directory / "tokenizer.json").is_file()
    vocab = dm.vocab
    assert 260 < vocab.size <= 320
    tokens = dm.cache.tokens()
    assert int(tokens.max()) < vocab.size
    # Merges: far fewer tokens than bytes; decoding gives the text back.
    raw = sum(f.stat().st_size for f in (tmp_path / "corpus").iterdir())
    assert len(tokens) < raw / 2
    tokenizer = dm.cache.tokenizer()
    first_doc = (tmp_path / "corpus" / "doc0.txt").read_text()
    end = tokens.tolist().index(vocab.eos_id)
    assert tokenizer.decode(tokens[:end].tolist()) == first_doc
    # BERT samples: [CLS] ... [SEP], masked.
    inputs, labels = dm.train_set[0]
    assert inputs[0] == vocab.cls_id and inputs[-1] == vocab.eos_id
    assert labels[0] == labels[-1] == IGNORE_INDEX  # special tokens are never masked


def test_mlm_masking_is_bert_s_80_10_10() -> None:
    vocab = byte_vocab()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (200_000,), generator=g)
    ids[::50] = vocab.cls_id  # special tokens are never picked
    inputs, labels = mask_tokens(ids, vocab, 0.15, generator=g)
    picked = labels != IGNORE_INDEX
    ordinary = ids < 256
    assert not picked[~ordinary].any()
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(inputs[~picked], ids[~picked])
    rate = picked.float().sum() / ordinary.sum()
    assert 0.145 < rate < 0.155
    masked = (inputs[picked] == vocab.mask_id).float().mean()
    kept = (inputs[picked] == ids[picked]).float().mean()
    randomised = 1 - masked - kept
    assert 0.79 < masked < 0.81
    assert 0.09 < kept < 0.11 + 1 / 256  # a random token can equal the original
    assert 0.09 < randomised < 0.11
    assert inputs[picked].max() < 258  # random replacements are ordinary tokens (or [MASK])


def test_validation_masks_are_fixed_and_training_masks_are_fresh() -> None:
    tokens = torch.arange(1000) % 256
    val = MaskedWindows(tokens, 32, byte_vocab(), fixed_masks=True, seed=3)
    assert torch.equal(val[5][0], val[5][0]) and torch.equal(val[5][1], val[5][1])
    train = MaskedWindows(tokens, 32, byte_vocab())
    draws = {tuple(train[5][1].tolist()) for _ in range(5)}
    assert len(draws) > 1


def test_default_source_is_the_python_standard_library() -> None:
    files = find_text_files(None)
    assert Path(os.__file__).resolve() in files
    assert all(f.suffix == ".py" for f in files)
    assert len(NextTokenWindows(torch.arange(100), 16)) == 6


# ------------------------------------------------------------------- training runs
def read_summary(run_root: Path) -> tuple[Path, dict]:
    runs = [p for p in run_root.iterdir() if p.is_dir()]
    assert len(runs) == 1, f"one run directory for all ranks, found {runs}"
    return runs[0], json.loads((runs[0] / "summary.json").read_text())


def assert_loss_falls(losses: list[float]) -> None:
    tail = sum(losses[-5:]) / 5
    assert tail < 0.75 * losses[0], f"loss did not fall: {losses[0]:.3f} -> {tail:.3f}"


def test_gpt_trains_with_mics_on_two_emulated_nodes(tmp_path) -> None:
    """laptop_gpt (make train) shortened: 4 processes, 2 nodes x 2 ranks, a partition per
    node, real text; the loss falls, perplexity is reported, only the all-reduce crosses
    nodes, and all ranks share one run directory."""
    proc = run_recipe(
        "train.py", "experiment=laptop_gpt", "trainer.max_steps=30",
        "trainer.val_check_interval=60", f"paths.log_dir={tmp_path}/outputs", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    run_dir, summary = read_summary(tmp_path / "outputs" / "laptop_gpt")
    assert summary["optimizer_steps"] == 30 and summary["world_size"] == 4
    assert_loss_falls(summary["losses"])
    assert summary["val"]["val/ppl"] < 60, summary["val"]  # uniform over 260 bytes: 260
    comm = summary["comm"]
    assert comm["all_gather_inter_node_bytes"] == 0  # partition = node
    assert comm["all_reduce_inter_node_bytes"] > 0  # the cross-replica all-reduce
    assert summary["tokens_per_sec"] > 0 and summary["tflops_per_device"] > 0
    for rank in (1, 2, 3):
        assert (run_dir / f"train_ddp_process_{rank}.log").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert "Run summary" in proc.stdout and "communication per optimizer step" in proc.stdout
    assert re.search(r'make train ARGS=".*strategy.partition_size=4"', proc.stdout)
    metrics = (run_dir / "csv" / "metrics.csv").read_text()
    assert "train/device/flops_per_sec" in metrics and "comm/inter_node_bytes" in metrics


def test_bert_trains_with_a_partition_spanning_both_nodes(tmp_path) -> None:
    proc = run_recipe(
        "train.py", "experiment=laptop_bert", "strategy.partition_size=4",
        "trainer.max_steps=30", "trainer.val_check_interval=60", "~callbacks.model_checkpoint",
        f"paths.log_dir={tmp_path}/outputs", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    _, summary = read_summary(tmp_path / "outputs" / "laptop_bert")
    assert_loss_falls(summary["losses"])
    # Far above chance (1/256); passing the most frequent byte (~0.35) takes ~100 steps.
    assert summary["val"]["val/mlm_acc"] > 0.2, summary["val"]
    # One replica over both nodes: parameter all-gathers cross nodes (hierarchically).
    assert summary["comm"]["all_gather_inter_node_bytes"] > 0
    assert "Compare with one partition\nper node" in proc.stdout


def test_fabric_recipe_trains_and_saves_a_sharded_checkpoint(tmp_path) -> None:
    proc = run_recipe(
        "fabric_train.py", "experiment=laptop_gpt", "trainer.max_steps=20",
        "trainer.log_every_n_steps=10", f"paths.log_dir={tmp_path}/outputs", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    run_dir, summary = read_summary(tmp_path / "outputs" / "laptop_gpt")
    assert summary["optimizer_steps"] == 20
    assert_loss_falls(summary["losses"])
    assert summary["val"]["val/ppl"] < 100
    assert summary["comm"]["all_reduce_inter_node_bytes"] > 0
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint.parent.parent == run_dir
    assert len(list(checkpoint.glob("*.distcp"))) == 4  # every rank wrote its shards
