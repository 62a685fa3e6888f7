"""Fabric code written as Lightning's docs teach it works under MiCS as it does under DDP,
or is refused when the ``Fabric`` is built.

Multi-process checks run ``tests/scripts/fabric_conformance.py`` on 4 CPU ranks (gloo,
2 emulated nodes x 2 ranks, partition 2 = one node, 2 replicas) and compare with one
process running the same global batch through the same precision plugin.
"""

from __future__ import annotations

import warnings

import pytest
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import (
    DeepSpeedPrecision,
    FSDPPrecision,
    MixedPrecision,
    TransformerEnginePrecision,
)

from lightning_mics.fabric import MiCSStrategy
from tests.launch import run_script

WORLD = 4
FP32_TOL = 1e-5  # the project's fp32 parity tolerance


def conformance(check: str, *args: str) -> dict:
    return run_script("fabric_conformance.py", WORLD, "--checks", check, *args, timeout=400)[check]


def assert_matches(result: dict, tol: float, loss_tol: float | None = None) -> None:
    """Parameters and losses within ``tol`` of the reference, and training moved the
    parameters by far more than that (so that the comparison means something)."""
    assert result["param_diff"] <= tol, result
    assert result["loss_diff"] <= (tol if loss_tol is None else loss_tol), result
    assert result["lr_diff"] == 0.0, result
    assert result["param_change"] >= 4 * tol, result


def test_setup_model_and_optimizer_together() -> None:
    """``model, optimizer = fabric.setup(model, optimizer)`` trains the sharded model."""
    result = conformance("setup")
    # The optimizer holds exactly the sharded parameters ...
    assert result["rebound"] is True
    # ... so the joint set-up trains as setup_module + setup_optimizers does, bit for bit,
    assert result["joint_vs_separate"] == 0.0
    # ... and both match one process on the same global batch.
    assert_matches(result["joint"], FP32_TOL)
    assert_matches(result["separate"], FP32_TOL)
    # An optimizer that already has state is refused (before sharding) with a way out.
    assert "already has state" in result["refused_with_state"]
    assert "fabric.setup_module(model)" in result["refused_with_state"]
    assert result["left_unsharded"] is True
    # Parameters created on the meta device are rebound to the materialised shards.
    assert result["meta_rebound"] is True


def test_load_restores_stateful_objects_in_place() -> None:
    """An LR warmup interrupted mid-way and resumed with ``fabric.load`` continues as if
    never interrupted; the scheduler and a custom stateful object are restored in place.
    Both checkpoint formats."""
    results = conformance("resume")
    for state_dict_type in ("sharded", "full"):
        result = results[state_dict_type]
        assert result["scheduler_same_object"] is True, (state_dict_type, result)
        assert result["scheduler_last_epoch"] == 2, (state_dict_type, result)
        assert result["counter_same_object"] is True, (state_dict_type, result)
        assert result["counter"] == 2, (state_dict_type, result)
        assert result["step"] == 2, (state_dict_type, result)  # plain values are written
        assert result["remainder"] == {"note": "not requested"}, (state_dict_type, result)
        assert result["lrs"] == result["whole_lrs"] == result["ref_lrs"], result
        assert result["lrs"] == pytest.approx([0.025, 0.05, 0.075, 0.1], abs=1e-12)
        assert result["resumed_vs_whole"] <= 1e-7, (state_dict_type, result)
        assert_matches(result["whole_vs_reference"], FP32_TOL)


def test_clip_gradients() -> None:
    result = conformance("clip")
    # Fabric's default error_if_nonfinite=True: a NaN norm raises (on every rank, or the
    # script would hang), and error_if_nonfinite=False returns it.
    assert result["nan_default"] is not None and "non-finite" in result["nan_default"]
    assert "error_if_nonfinite=False" in result["nan_default"]
    assert result["nan_allowed_norm"] != result["nan_allowed_norm"]  # NaN
    # Windows whose last micro-step skipped its backward, under 16-mixed with a gradient
    # scaler: parked gradients are flushed before unscaling, so the norms are the true
    # (unscaled) ones, clipping active or not. fp16 autocast: 1e-4 on parameters that
    # training moved by >= 4e-3, 1e-3 relative on the norms (scaled ones would be 1024x).
    for case in ("16-mixed-clip-active", "16-mixed-clip-inactive"):
        assert result[case]["scale"] == 1024.0, result[case]  # no overflow: no step skipped
        assert_matches(result[case], 1e-4, loss_tol=1e-4)
        assert len(result[case]["norms"]) == 3
        assert result[case]["norm_rel_diff"] <= 1e-3, result[case]
    assert min(result["16-mixed-clip-active"]["ref_norms"]) > 0.05  # clipping was active
    assert max(result["16-mixed-clip-inactive"]["ref_norms"]) < 100.0  # and here it was not
    # Value clipping after a skipped last micro-step: fp32 parity.
    value = result["value"]
    assert value["param_diff"] <= FP32_TOL, value
    assert value["param_change"] >= 1e-4, value


# Tolerances on parameters (training moves them by about 0.045 in these runs) and on
# per-micro-step losses, vs one process under the same plugin. Reduced-precision runs
# differ from it by rounding: per-rank batches of 2 instead of one batch of 8, and
# gradients reduced across ranks in float32 (MiCS's default reduce_dtype, also for
# "*-true" precisions; on gloo the reduce-scatter is an all-reduce, with sums, and FSDP
# divides afterwards) where one process sums them inside a single matmul.
PRECISION_TOL = {
    "32-true": (FP32_TOL, FP32_TOL),
    "64-true": (FP32_TOL, FP32_TOL),
    "16-mixed-cpu": (1e-4, 1e-4),  # fp16 autocast + gradient scaler (see precision_plugin)
    "bf16-mixed": (1e-3, 1e-3),
    "16-true": (2e-3, 1e-3),  # about two fp16 ulps of a parameter near 1
    "bf16-true": (8e-3, 1e-3),  # one bf16 ulp of a parameter in [1, 2) (LayerNorm weights)
}


def test_precisions_match_single_process() -> None:
    """Every precision Fabric offers on CPU trains under MiCS like one process.

    ``Fabric(precision="16-mixed")`` is fp16 autocast with a gradient scaler on GPUs; on
    CPU Lightning substitutes bf16-mixed (see below), so the 16-mixed plugin is passed as
    ``plugins=[MixedPrecision("16-mixed", "cpu")]`` to run the same code path here.
    """
    results = conformance("precision", "--precisions", ",".join(PRECISION_TOL))
    assert results.keys() == PRECISION_TOL.keys()
    dtypes = {
        "bf16-true": "torch.bfloat16",
        "16-true": "torch.float16",
        "64-true": "torch.float64",
    }
    for name, (tol, loss_tol) in PRECISION_TOL.items():
        result = results[name]
        assert result["finite"], (name, result)
        assert result["param_dtype"] == dtypes.get(name, "torch.float32"), (name, result)
        assert_matches(result, tol, loss_tol)
    assert results["16-mixed-cpu"]["plugin_precision"] == "16-mixed"


def test_16_mixed_on_cpu_becomes_bf16_mixed_in_lightning() -> None:
    """Lightning (not MiCS) replaces ``precision="16-mixed"`` on CPU with bf16-mixed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fabric = Fabric(strategy=MiCSStrategy(), accelerator="cpu", devices=2, precision="16-mixed")
    assert isinstance(fabric.strategy.precision, MixedPrecision)
    assert fabric.strategy.precision.precision == "bf16-mixed"
    assert any("bf16-mixed" in str(w.message) for w in caught)


def _transformer_engine_plugin() -> TransformerEnginePrecision:
    # NOTE: TransformerEngine is not installed here; the plugin object is only inspected.
    return object.__new__(TransformerEnginePrecision)


@pytest.mark.parametrize(
    "make_plugin, name",
    [
        (_transformer_engine_plugin, "transformer-engine"),
        (lambda: FSDPPrecision("bf16-mixed"), "bf16-mixed"),
        (lambda: DeepSpeedPrecision("bf16-mixed"), "bf16-mixed"),
    ],
)
def test_unsupported_precision_plugins_are_refused_at_construction(make_plugin, name) -> None:
    with pytest.raises(ValueError, match="MiCSStrategy does not support precision") as err:
        Fabric(strategy=MiCSStrategy(), accelerator="cpu", devices=2, plugins=[make_plugin()])
    message = str(err.value)
    assert repr(name) in message
    assert '"bf16-mixed"' in message and "param_dtype" in message  # what to use instead


def test_transformer_engine_precision_is_refused() -> None:
    """Without TransformerEngine Lightning itself refuses; with it, MiCS does."""
    with pytest.raises((ModuleNotFoundError, ValueError), match=r"transformer|MiCSStrategy"):
        Fabric(
            strategy=MiCSStrategy(), accelerator="cpu", devices=2, precision="transformer-engine"
        )
