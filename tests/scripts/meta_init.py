"""Meta-device initialisation with the plain API (`apply_mics`) on several ranks.

Every case creates a model of ``tests/scripts/meta_models.py`` on the meta device, shards
it with MiCS and reports, on rank 0, either how its state compares with a normal
construction given the same deterministic init (and one training step on both), or the
``MetaInitError`` every rank raised.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_mics import MiCSConfig, MiCSTopology, apply_mics
from tests.scripts import common, meta_models
from tests.scripts.meta_models import (
    DIM,
    HFStyleModel,
    RMSNorm,
    TinyModel,
    TitanStyleModel,
    init_module,
    init_params,
)


def compare(model: nn.Module, ref: nn.Module) -> dict[str, Any]:
    """State and one SGD step of the sharded model vs the reference (same batch on every
    rank, so the averaged gradient is the reference's)."""
    state, ref_state = (
        common.full_state(model),
        {k: v.detach().clone() for k, v in ref.state_dict().items()},
    )
    # non-persistent buffers are not in state dicts: compare them too
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    ref_buffers = {k: v.detach().clone() for k, v in ref.named_buffers()}
    x, y = meta_models.batch()
    losses = []
    for m in (model, ref):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        loss = TinyModel.loss(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after, ref_after = common.full_state(model), ref.state_dict()
    return {
        "init_diff": common.max_abs_diff(state, ref_state),
        "buffer_diff": common.max_abs_diff(buffers, ref_buffers),
        "buffer_names": sorted(buffers),
        "loss": losses[0],
        "loss_diff": abs(losses[0] - losses[1]),
        "step_diff": common.max_abs_diff(after, dict(ref_after)),
    }


def shard(model: nn.Module, topology: MiCSTopology, **options: Any) -> nn.Module:
    return apply_mics(model, topology, MiCSConfig(**options))


def try_shard(
    build: Callable[[], nn.Module], topology, **options: Any
) -> tuple[nn.Module | None, dict[str, Any]]:
    """Run apply_mics; report which ranks raised what, and rank 0's message."""
    model, error = None, None
    try:
        model = shard(build(), topology, **options)
    except Exception as err:
        error = err
    raised = [None] * dist.get_world_size()
    dist.all_gather_object(raised, type(error).__name__ if error else None)
    message = str(error) if error else ""
    return model, {
        "raised": raised,
        "message": message,
        "names": sorted(set(re.findall(r"'([\w.]+)' of ", message))),
    }


def expect_error(build: Callable[[], nn.Module], topology, **options: Any) -> dict[str, Any]:
    return try_shard(build, topology, **options)[1]


def on_meta(cls: type[nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with torch.device("meta"):
            return cls()

    return build


def params_on_meta_only() -> nn.Module:
    """accelerate's init_empty_weights(include_buffers=False): buffers keep their values."""
    model = TinyModel()
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(torch.empty_like(p, device="meta")))
    return model


def replacing_init(module: nn.Module) -> None:
    init_module(module)
    if isinstance(module, meta_models.Conv1D):
        module.bias = nn.Parameter(torch.zeros(module.nf))


def partial_init(module: nn.Module) -> None:
    """Covers everything, except that the final norm's weight gets one element per rank."""
    if isinstance(module, RMSNorm) and module.weight.shape == (DIM,) and module._is_final:
        module.weight.to_local()[:1].fill_(1.0)
        return
    init_module(module)


def final_norm_marked() -> nn.Module:
    with torch.device("meta"):
        model = TinyModel()
    for m in model.modules():
        m._is_final = m is model.norm
    return model


class Attention(nn.Module):
    """nn.MultiheadAttention as its own FSDP unit (a ModuleList child): it has only
    ``_reset_parameters()``, and fully_shard swaps its class for FSDPMultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.MultiheadAttention(DIM, 2) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x, x, x, need_weights=False)[0]
        return x


def builtin_case(topology: MiCSTopology) -> dict[str, Any]:
    model, report = try_shard(on_meta(Attention), topology)
    finite = model is not None and bool(torch.isfinite(model(torch.ones(3, 2, DIM))).all())
    return report | {"finite": finite}


def failing_init(module: nn.Module) -> None:
    if dist.get_rank() == 1:
        raise ValueError("init_fn failed on purpose on rank 1")
    init_module(module)


def main() -> None:
    args = common.parser().parse_args()
    dist.init_process_group("gloo")
    world = int(os.environ["WORLD_SIZE"])
    topology = MiCSTopology.create(world, args.ranks_per_node, common.partition_size("2"))
    ref = meta_models.reference
    results: dict[str, Any] = {"mesh": None}

    model = shard(on_meta(HFStyleModel)(), topology)
    results["mesh"] = list(next(iter(model.parameters())).device_mesh.mesh.shape)
    results["hf_style"] = compare(model, ref(HFStyleModel))
    results["titan_style"] = compare(shard(on_meta(TitanStyleModel)(), topology), ref())
    results["init_fn"] = compare(shard(on_meta(TinyModel)(), topology, init_fn=init_module), ref())
    # buffers created with values keep them; the parameters need only init_params
    results["buffers_kept"] = compare(
        shard(params_on_meta_only(), topology, init_fn=init_params), ref()
    )
    results["torch_builtin"] = builtin_case(topology)
    results["missing"] = expect_error(on_meta(TinyModel), topology)
    results["replaced"] = expect_error(on_meta(TinyModel), topology, init_fn=replacing_init)
    results["partial"] = expect_error(final_norm_marked, topology, init_fn=partial_init)
    results["failing"] = expect_error(on_meta(TinyModel), topology, init_fn=failing_init)
    common.report(args.out, **results)
    common.finish()


if __name__ == "__main__":
    main()
