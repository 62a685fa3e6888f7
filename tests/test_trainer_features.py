"""`strategy="mics"` through fit, validate, test and predict; collectives, sampler,
logging with sync_dist, checkpointing and meta-device init on 4 ranks."""

from __future__ import annotations

import pytest

from tests.launch import run_script


@pytest.fixture(scope="module")
def report() -> dict:
    return run_script("trainer_features.py", 4, timeout=300)


def test_registered_name_resolves_to_mics(report: dict) -> None:
    assert report["strategy_class"] == "MiCSStrategy"


def test_sampler_covers_the_whole_world(report: dict) -> None:
    assert report["fit"]["sampler_replicas"] == 4
    assert report["fit"]["sampler_rank"] == 0


def test_collectives(report: dict) -> None:
    fit = report["fit"]
    assert fit["all_gather"] == [0.0, 1.0, 2.0, 3.0]
    assert fit["reduce_sum"] == 6.0
    assert fit["reduce_mean"] == 1.5
    assert fit["broadcast"] == "from-0"
    assert fit["any_decision"] is True
    assert fit["blocks_sharded"] is True


def test_logging_with_sync_dist_averages_over_ranks(report: dict) -> None:
    # each rank logs its own rank; the synced value is the mean 0..3
    assert report["fit"]["train_rank"] == pytest.approx(1.5)
    assert report["validate"]["val_rank"] == pytest.approx(1.5)
    assert report["test"]["test_rank"] == pytest.approx(1.5)


def test_fit_validate_test_predict(report: dict) -> None:
    assert report["fit"]["global_step"] == 4
    assert report["predictions"] == [[4, 2]]  # 16 samples / 4 ranks, batch size 4
    assert report["predict_rows"] == 4
    assert report["predict_diff"] < 1e-6  # equals the unsharded model's output


def test_checkpoint_holds_the_trained_state(report: dict) -> None:
    """The checkpoint that fit wrote, read back, is the trained model, bit for bit."""
    ckpt = report["checkpoint"]
    assert ckpt["names"] == ["epoch=0-step=4.ckpt"], ckpt  # written at the end of fit
    assert ckpt["keys_equal"] and ckpt["num_tensors"] == 6, ckpt  # 3 Linear layers
    assert ckpt["bitwise_equal"] and ckpt["max_abs_diff"] == 0.0, ckpt
    assert ckpt["global_step"] == ckpt["trained_global_step"] == 4, ckpt


def test_meta_device_init_is_materialised(report: dict) -> None:
    meta = report["meta"]
    assert meta["started_on_meta"] and meta["materialized"]
    assert meta["finite_losses"] and meta["num_losses"] == 3
    assert meta["partition_size"] == 4


def test_configure_model_on_meta_device(report: dict) -> None:
    cm = report["configure_model"]
    assert cm["started_on_meta"] and cm["materialized"]
    assert cm["finite_losses"] and cm["num_losses"] == 2
    assert cm["val_loss_finite"]


def test_teardown_destroys_groups_no_model_uses(report: dict) -> None:
    td = report["teardown"]
    assert td["failed"]
    # the failed run's own mesh is gone; the meshes of sharded models were kept
    assert td["meshes_during_failed_run"] == 3  # the failed run had created its own mesh
    assert td["meshes_unchanged"] and td["kept_meshes_of_sharded_models"] == 2


def test_model_sharded_under_other_layout_is_refused(report: dict) -> None:
    assert "already sharded on a mesh" in report["layout_error"]
