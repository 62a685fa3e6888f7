"""Meta-device initialisation (`lightning_mics.meta_init`).

Multi-rank: ``tests/scripts/meta_init.py`` (plain API, 4 ranks = 2 replicas of partition
2) and ``tests/scripts/meta_init_lightning.py`` (Trainer and Fabric, 2 ranks) build
models in the style of Hugging Face GPT-2 / Llama / BERT and torchtitan on the meta
device. In-process: the initialiser order and the write tracking on unsharded models.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_mics
from lightning_mics import MiCSConfig
from lightning_mics.meta_init import MetaInitError, materialize_meta_module, post_order
from tests.launch import run_script
from tests.scripts import meta_models
from tests.scripts.meta_models import MISSING, HFStyleModel, TinyModel, init_module

CPU = torch.device("cpu")


# --------------------------------------------------------------------- multi-rank
@pytest.fixture(scope="module")
def plain():
    return run_script("meta_init.py", 4, "--ranks-per-node", 2)


@pytest.fixture(scope="module")
def lightning():
    return run_script("meta_init_lightning.py", 2)


@pytest.mark.parametrize("case", ["hf_style", "titan_style", "init_fn", "buffers_kept"])
def test_plain_api_initialises_like_a_normal_construction(plain, case):
    assert plain["mesh"] == [2, 2]  # 2 replicas: sync_replicas runs too
    result = plain[case]
    # every parameter and every (non-persistent) buffer, bitwise
    assert result["init_diff"] == 0.0, result
    assert result["buffer_names"] == sorted(
        ["embeddings.position_ids", "h.0.rotary.inv_freq", "h.1.rotary.inv_freq"]
    )
    assert result["buffer_diff"] == 0.0, result
    assert torch.isfinite(torch.tensor(result["loss"]))
    assert result["loss_diff"] <= 1e-6, result
    assert result["step_diff"] <= 1e-6, result


def test_torch_builtin_with_only_underscore_reset_parameters_as_a_unit(plain):
    # nn.MultiheadAttention initialises in _reset_parameters(), even as an FSDP unit
    result = plain["torch_builtin"]
    assert result["raised"] == [None] * 4, result["message"]
    assert result["finite"]


def test_uncovered_tensors_raise_on_every_rank_naming_them(plain):
    result = plain["missing"]
    assert result["raised"] == ["MetaInitError"] * 4
    assert set(result["names"]) == MISSING
    message = result["message"]
    assert "Conv1D, which has no reset_parameters()" in message
    assert "non-persistent buffer 'h.0.rotary.inv_freq'" in message
    assert "init_fn" in message and "reset_parameters()" in message
    assert "must be re-created by an initialiser" in message


def test_replacing_a_parameter_is_an_error(plain):
    result = plain["replaced"]
    assert result["raised"] == ["MetaInitError"] * 4
    assert set(result["names"]) == {"h.0.attn_in.bias", "h.1.attn_in.bias"}
    assert "replaced, not written in place" in result["message"]


def test_a_partial_write_is_not_an_initialisation(plain):
    # one element of a 4-element shard: the ranks disagree locally, all raise together
    result = plain["partial"]
    assert result["raised"] == ["MetaInitError"] * 4
    assert result["names"] == ["norm.weight"]


def test_an_initialiser_failing_on_one_rank_stops_every_rank(plain):
    result = plain["failing"]
    assert result["raised"] == ["MetaInitError", "ValueError", "MetaInitError", "MetaInitError"]
    assert "failed on rank(s) [1]" in result["message"]


@pytest.mark.parametrize(
    "case",
    ["trainer_init_hf", "trainer_configure_init_fn", "fabric_titan", "fabric_init_fn"],
)
def test_lightning_empty_init(lightning, case):
    result = lightning[case]
    assert result["raised"] == [None, None], result["message"]
    assert result["num_tensors"] == 17  # 14 parameters + 3 non-persistent buffers
    assert result["init_diff"] == 0.0, result
    assert result["num_losses"] == 2
    assert result["losses_finite"]


@pytest.mark.parametrize("case", ["trainer_missing", "fabric_missing"])
def test_lightning_empty_init_without_initialiser_raises(lightning, case):
    result = lightning[case]
    assert result["raised"] == ["MetaInitError", "MetaInitError"]
    assert "attn_in.weight' of Conv1D" in result["message"]
    assert "rotary.inv_freq" in result["message"]


# --------------------------------------------------------------------- in-process
def meta(cls: type[nn.Module] = TinyModel, *args) -> nn.Module:
    with torch.device("meta"):
        return cls(*args)


def materialised(model: nn.Module, init_fn=None) -> nn.Module:
    materialize_meta_module(model, CPU, init_fn)
    return model


def names_in(error: pytest.ExceptionInfo) -> set[str]:
    import re

    return set(re.findall(r"'([\w.]+)' of ", str(error.value)))


def test_post_order_is_children_first():
    model = nn.Sequential(nn.Sequential(nn.Linear(1, 1), nn.ReLU()), nn.Linear(1, 1))
    order = post_order(model)
    assert order == [model[0][0], model[0][1], model[0], model[1], model]
    assert order == [m for m in _apply_order(model)]


def _apply_order(model: nn.Module) -> list[nn.Module]:
    seen: list[nn.Module] = []
    model.apply(seen.append)
    return seen


def test_unsharded_model_names_exactly_the_uncovered_tensors():
    with pytest.raises(MetaInitError) as error:
        materialised(meta())
    assert names_in(error) == MISSING


def test_unsharded_model_matches_reference_with_init_fn():
    model = materialised(meta(), init_module)
    ref = meta_models.reference()
    for (name, a), (_, b) in zip(
        [*model.named_parameters(), *model.named_buffers()],
        [*ref.named_parameters(), *ref.named_buffers()],
        strict=True,
    ):
        assert torch.equal(a, b), name


def test_hf_style_init_weights_of_the_nearest_owner():
    class Inner(HFStyleModel):
        calls = 0

        def _init_weights(self, module):
            Inner.calls += 1
            init_module(module)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()
            self.extra = meta_models.RMSNorm(4)

        def _init_weights(self, module):
            if isinstance(module, meta_models.RMSNorm):
                module.weight.fill_(2.0)
            assert not isinstance(module, meta_models.Conv1D), "inner's modules are Inner's"

    model = materialised(meta(Outer))
    assert Inner.calls == sum(1 for _ in model.inner.modules())
    assert torch.equal(model.extra.weight, torch.full((4,), 2.0))


def test_init_fn_runs_last_and_wins():
    order = []

    class Model(HFStyleModel):
        def _init_weights(self, module):
            order.append("model")
            init_module(module)

    def init_fn(module):
        order.append("init_fn")
        if isinstance(module, nn.Linear):
            module.weight.fill_(3.0)

    model = materialised(meta(Model), init_fn)
    n = sum(1 for _ in model.modules())
    assert order == ["model"] * n + ["init_fn"] * n
    assert torch.equal(model.head.weight, torch.full_like(model.head.weight, 3.0))


def test_titan_init_weights_needing_arguments_is_not_called_and_said():
    class Model(TinyModel):
        def init_weights(self, std):
            raise AssertionError("must not be called")

    with pytest.raises(MetaInitError, match=r"Model.init_weights \(it needs arguments"):
        materialised(meta(Model))


def test_torch_builtin_with_only_underscore_reset_parameters():
    model = materialised(meta(nn.MultiheadAttention, 8, 2))
    assert torch.isfinite(model.in_proj_weight).all()


def test_writes_in_pieces_cover_a_tensor_one_piece_does_not():
    def halves(module):
        init_module(module)
        if isinstance(module, meta_models.RMSNorm):
            module.weight.copy_(torch.empty_like(module.weight))  # a write, whatever the value
            module.weight[:4].fill_(1.0)
            module.weight[4:].fill_(1.0)

    materialised(meta(), halves)  # no error

    def first_half_only(module):
        if isinstance(module, meta_models.RMSNorm):
            module.weight[:4].fill_(1.0)
        else:
            init_module(module)

    with pytest.raises(MetaInitError) as error:
        materialised(meta(), first_half_only)
    assert names_in(error) == {"h.0.norm.weight", "h.1.norm.weight", "norm.weight"}


def test_a_replaced_buffer_counts_and_a_meta_one_does_not():
    def new_buffers(module):
        init_params(module)
        if isinstance(module, meta_models.Rotary):
            module.inv_freq = meta_models.inv_freq()  # a new tensor object
        elif isinstance(module, meta_models.Embeddings):
            module.position_ids = torch.arange(meta_models.MAX_POS).expand((1, -1))

    model = materialised(meta(), new_buffers)
    assert torch.equal(model.h[1].rotary.inv_freq, meta_models.inv_freq())

    def meta_buffer(module):
        new_buffers(module)
        if isinstance(module, meta_models.Rotary):
            module.inv_freq = torch.empty(4, device="meta")

    with pytest.raises(MetaInitError, match="re-created on the meta device"):
        materialised(meta(), meta_buffer)


def init_params(module):
    meta_models.init_params(module)


def test_values_created_outside_meta_are_kept():
    model = meta()
    model.h[0].rotary = meta_models.Rotary(meta_models.DIM)  # real buffer
    model.h[0].mlp = nn.Linear(meta_models.DIM, meta_models.DIM)  # real parameters
    kept = model.h[0].mlp.weight.detach().clone()

    def init_fn(module):
        init_module(module)  # would overwrite mlp.weight with det_ values

    materialised(model, init_fn)
    assert torch.equal(model.h[0].mlp.weight, kept)
    assert torch.equal(model.h[0].rotary.inv_freq, meta_models.inv_freq())


# ------------------------------------------------------------------------ options
def test_init_fn_option():
    assert MiCSConfig().init_fn is None
    assert MiCSConfig(init_fn=init_module).init_fn is init_module
    with pytest.raises(ValueError, match="init_fn must be a callable"):
        MiCSConfig(init_fn="normal")


def test_init_fn_is_a_strategy_keyword():
    from lightning_mics.fabric import MiCSStrategy as FabricMiCSStrategy

    assert lightning_mics.MiCSStrategy(init_fn=init_module).mics.config.init_fn is init_module
    assert FabricMiCSStrategy(init_fn=init_module).mics.config.init_fn is init_module


def test_state_outside_parameters_and_buffers_is_kept():
    """A torchmetrics ``Metric`` (its states are neither parameters nor buffers, but its
    ``_apply`` moves them) created with real values keeps them: only modules holding meta
    tensors are allocated."""
    from torchmetrics.aggregation import SumMetric

    class WithMetric(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            with torch.device("meta"):
                self.linear = nn.Linear(4, 4)
            self.metric = SumMetric()

    model = WithMetric()
    model.metric.update(torch.tensor(3.0))
    materialize_meta_module(model, torch.device("cpu"))
    assert model.metric.compute().item() == 3.0
    model.metric.reset()
    assert model.metric.compute().item() == 0.0  # its defaults survived too
