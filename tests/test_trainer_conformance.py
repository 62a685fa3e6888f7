"""Lightning Trainer idioms under MiCS, run as users write them (``tests/scripts/
trainer_conformance.py``, 4 ranks = 2 emulated nodes x 2, partition = node, 2 replicas).

Precision tolerances against DDP (same model, data and steps; MiCS reduces gradients in
float32 where DDP reduces in the parameters' dtype): float32/float64 1e-5; bf16 autocast
1e-4; fp16 autocast with the gradient scaler 1e-4; fp16 parameters 2e-3 (a few fp16
roundings, 2**-10 relative); bf16 parameters 1.6e-2 (two bf16 roundings, 2**-8 relative,
on parameters of magnitude up to 1).
"""

from __future__ import annotations

import pytest
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import TransformerEnginePrecision
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import TransformerEnginePrecision as TrainerTEPrecision

import lightning_mics  # noqa: F401  (registers "mics")
from tests.launch import run_script

FP32_TOL = 1e-5

PRECISIONS = {
    # precision: (tolerance on params and losses, dtype of the parameters in training_step)
    "32-true": (FP32_TOL, "torch.float32"),
    "64-true": (FP32_TOL, "torch.float64"),
    "bf16-mixed": (1e-4, "torch.float32"),
    "16-mixed-scaler": (1e-4, "torch.float32"),
    "16-true": (2e-3, "torch.float16"),
    "bf16-true": (1.6e-2, "torch.bfloat16"),
}


def _run(check: str, *args: str) -> dict:
    return run_script("trainer_conformance.py", 4, "--check", check, *args, timeout=500)


def test_every_precision_matches_ddp() -> None:
    results = _run("precision", "--precisions", ",".join(PRECISIONS))
    assert set(results) == set(PRECISIONS)
    for name, (tol, dtype) in PRECISIONS.items():
        result = results[name]
        # The module was converted (``*-true``) before sharding: MiCS computes with the
        # same parameter dtype as DDP, and its sharded parameters keep it.
        assert result["mics_dtypes"] == result["ddp_dtypes"] == [dtype], (name, result)
        assert result["mics_param_dtypes"] == [dtype], (name, result)
        assert result["param_diff"] <= tol, (name, result)
        assert result["loss_diff"] <= tol * 10, (name, result)


@pytest.mark.parametrize("plugin_cls", [TransformerEnginePrecision, TrainerTEPrecision])
def test_transformer_engine_is_refused_at_construction(plugin_cls: type) -> None:
    # NOTE: without transformer_engine installed, Lightning itself refuses
    # precision="transformer-engine"; an instance stands for an installed one.
    plugin = object.__new__(plugin_cls)
    with pytest.raises(ValueError, match=r"TransformerEnginePrecision.*bf16-mixed.*param_dtype"):
        if plugin_cls is TrainerTEPrecision:
            Trainer(strategy="mics", accelerator="cpu", devices=1, plugins=[plugin])
        else:
            Fabric(strategy="mics", accelerator="cpu", devices=1, plugins=[plugin])


def test_forward_outside_steps_matches_reference(tmp_path) -> None:
    """``self(x)`` in training_step, in ``on_train_start`` (root still sharded), in
    ``on_train_epoch_end``, from a callback (with and without grad) and after ``fit`` and a
    checkpoint save (eval and train mode) gives the reference outputs."""
    result = _run("forward", "--tmp", str(tmp_path))
    assert result["param_diff"] <= FP32_TOL, result
    assert result["loss_diff"] <= FP32_TOL, result
    assert set(result["output_diff"]) == {
        "train_start",
        "hook",
        "callback_no_grad",
        "callback_grad",
        "after_fit",
        "after_fit_train_mode",
    }
    for where, diff in result["output_diff"].items():
        assert diff <= FP32_TOL, (where, result)


def test_fit_test_fit_on_one_module() -> None:
    """A second fit after ``test`` trains the root's parameters too (they were kept
    gathered by the eval forward) and nothing moves the sharded module at teardown."""
    result = _run("refit")
    assert result["num_losses"] == 6
    assert result["param_diff"] <= FP32_TOL, result
    assert result["loss_diff"] <= FP32_TOL, result
    assert result["root_changed_in_second_fit"] > 1e-4, result
    assert result["moves_after_sharding"] == [], result


def test_setup_never_moves_the_whole_model() -> None:
    """Only FSDP's per-unit move (at most one unit's bytes) puts unsharded tensors on the
    device during setup; nothing else requests any."""
    result = _run("setup-memory")
    assert result["outside_fully_shard_bytes"] == 0, result
    assert result["max_unit_bytes"] <= result["block_bytes"] < result["model_bytes"], result


def test_sync_batchnorm_is_applied_or_refused() -> None:
    result = _run("sync-bn")
    # BatchNorm layers are converted; torch's SyncBatchNorm has no CPU kernels, so on CPU
    # the strategy refuses before the first step (GPU parity: tests/gpu/).
    assert result["converted"] is True, result
    assert "SyncBatchNorm" in result["with_bn"] and "CPU" in result["with_bn"], result
    # A model without BatchNorm trains unchanged.
    assert result["without_bn"]["param_diff"] <= FP32_TOL, result
    assert result["without_bn"]["loss_diff"] <= FP32_TOL, result
