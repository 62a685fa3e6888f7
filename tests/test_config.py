"""MiCSConfig validation and normalisation (no processes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mics import AccumulationMode, MiCSConfig


class Block(nn.Module):
    pass


class OtherBlock(nn.Module):
    pass


def test_defaults():
    c = MiCSConfig()
    assert c.partition_size == "node"
    assert c.ranks_per_node is None
    assert c.accumulation is AccumulationMode.TWO_HOP
    assert c.param_dtype is None
    assert c.reduce_dtype is torch.float32
    assert c.reshard_after_forward is True
    assert c.activation_checkpointing is False
    assert c.cpu_offload is False
    assert c.wrap_policy is None
    assert c.sync_replicas is True
    assert c.forward_prefetch is False


# ------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("p", ["node", 1, 4])
def test_partition_size_ok(p):
    assert MiCSConfig(partition_size=p).partition_size == p


@pytest.mark.parametrize("p", [0, -1, 2.0, "4", "nodes", True, None])
def test_partition_size_bad(p):
    with pytest.raises(ValueError, match="partition_size must be a positive int or 'node'"):
        MiCSConfig(partition_size=p)


@pytest.mark.parametrize("k", [0, -1, 2.0, "2", True])
def test_ranks_per_node_bad(k):
    with pytest.raises(ValueError, match="ranks_per_node must be a positive int or None"):
        MiCSConfig(ranks_per_node=k)


# ------------------------------------------------------------------ accumulation
@pytest.mark.parametrize("mode", list(AccumulationMode))
def test_accumulation_strings_become_enum(mode):
    c = MiCSConfig(accumulation=mode.value)
    assert c.accumulation is mode
    assert MiCSConfig(accumulation=mode).accumulation is mode


@pytest.mark.parametrize("bad", ["twohop", "", None, 1])
def test_accumulation_bad_lists_choices(bad):
    with pytest.raises(ValueError) as err:
        MiCSConfig(accumulation=bad)
    msg = str(err.value)
    assert f"accumulation={bad!r}" in msg
    for mode in AccumulationMode:
        assert mode.value in msg


# ------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("32", torch.float32),
        ("fp16", torch.float16),
        ("16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (None, None),
    ],
)
def test_dtype_strings_convert(name, dtype):
    c = MiCSConfig(param_dtype=name, reduce_dtype=name)
    assert c.param_dtype is dtype
    assert c.reduce_dtype is dtype


@pytest.mark.parametrize("field", ["param_dtype", "reduce_dtype"])
@pytest.mark.parametrize("bad", ["bf17", "half-ish", "int8"])
def test_dtype_unknown_raises(field, bad):
    with pytest.raises(ValueError) as err:
        MiCSConfig(**{field: bad})
    msg = str(err.value)
    assert f"Unknown dtype {bad!r}" in msg
    assert "bf16" in msg and "fp32" in msg  # the choices


def test_reduce_dtype_defaults_to_float32_even_with_low_precision_params():
    c = MiCSConfig(param_dtype="bf16")
    assert c.param_dtype is torch.bfloat16
    assert c.reduce_dtype is torch.float32


# ------------------------------------------------------------- reshard_after_forward
@pytest.mark.parametrize("value", [True, False, 1, 2, 8])
def test_reshard_after_forward_ok(value):
    assert MiCSConfig(reshard_after_forward=value).reshard_after_forward == value


@pytest.mark.parametrize("value", [0, -1, "x", 2.0, None])
def test_reshard_after_forward_bad(value):
    with pytest.raises(ValueError, match="reshard_after_forward must be a bool or a positive int"):
        MiCSConfig(reshard_after_forward=value)


# ------------------------------------------------------------------------- flags
@pytest.mark.parametrize(
    "name",
    ["activation_checkpointing", "cpu_offload", "sync_replicas", "comm_stats", "forward_prefetch"],
)
@pytest.mark.parametrize("value", ["false", 0, 1, None])
def test_flags_must_be_bool(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a bool"):
        MiCSConfig(**{name: value})


# ------------------------------------------------------------------- wrap_policy
def test_wrap_policy_single_class():
    assert MiCSConfig(wrap_policy=Block).wrap_policy == (Block,)


def test_wrap_policy_set_of_classes():
    c = MiCSConfig(wrap_policy={Block, OtherBlock})
    assert isinstance(c.wrap_policy, tuple)
    assert set(c.wrap_policy) == {Block, OtherBlock}


def test_wrap_policy_list_of_classes():
    assert MiCSConfig(wrap_policy=[Block, nn.Linear]).wrap_policy == (Block, nn.Linear)


def test_wrap_policy_callable():
    def policy(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    assert MiCSConfig(wrap_policy=policy).wrap_policy is policy


@pytest.mark.parametrize(
    "bad", [[Block, "Linear"], [Block, int], (nn.Linear(2, 2),), int, "Block", 5]
)
def test_wrap_policy_bad(bad):
    with pytest.raises(ValueError, match=r"wrap_policy must be a set of nn\.Module classes"):
        MiCSConfig(wrap_policy=bad)
