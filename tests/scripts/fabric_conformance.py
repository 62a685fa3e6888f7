"""Fabric idioms written as Lightning's docs teach them, under MiCS, against a single
process running the same global batch with the same precision plugin.

Every rank runs the same checks (``--checks``); rank 0 reports one entry per check:

- ``setup``: ``model, optimizer = fabric.setup(model, optimizer)`` vs ``setup_module`` +
  ``setup_optimizers``; an optimizer that already has state is refused; an optimizer
  created from meta-device parameters is rebound to the sharded ones.
- ``resume``: ``fabric.save`` / ``fabric.load`` mid-way through an LR warmup, for both
  checkpoint formats, vs an uninterrupted run: schedulers and custom stateful objects are
  restored in place, plain values are written into the state, the rest is returned.
- ``clip``: ``fabric.clip_gradients`` raises on a NaN norm by default; after a window
  whose last micro-step skipped its backward, norm clipping under ``16-mixed`` (gradient
  scaler) and value clipping give the reference's gradients.
- ``precision``: a short run under each ``--precisions`` entry vs the reference.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import (
    DoublePrecision,
    HalfPrecision,
    MixedPrecision,
    Precision,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from lightning_mics.fabric import MiCSStrategy
from recipes.gpt import GPT
from tests.scripts import common

MICRO_BATCH = 2
WARMUP = 4  # steps of the LR warmup in the resume check


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / WARMUP)


class Counter:
    """A user object with ``state_dict`` / ``load_state_dict`` (Lightning's ``_Stateful``)."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = state["count"]


# ------------------------------------------------------------------------- precision
def scaler_16_mixed() -> torch.amp.GradScaler:
    # NOTE: a smaller initial scale than GradScaler's 2**16 keeps fp16 gradients of the
    # first steps from overflowing, so that no step is skipped in either run.
    return torch.amp.GradScaler("cpu", init_scale=2.0**10)


def precision_plugin(name: str) -> Precision:
    """A fresh plugin, the same that ``Fabric(precision=name)`` builds.

    ``"16-mixed-cpu"``: fp16 autocast with a gradient scaler on CPU, which Lightning
    builds for ``precision="16-mixed"`` on GPUs only (on CPU it substitutes bf16-mixed).
    """
    if name == "32-true":
        return Precision()
    if name in ("bf16-mixed", "16-mixed-cpu"):
        if name == "bf16-mixed":
            return MixedPrecision("bf16-mixed", "cpu")
        return MixedPrecision("16-mixed", "cpu", scaler=scaler_16_mixed())
    if name in ("bf16-true", "16-true"):
        return HalfPrecision(name)  # type: ignore[arg-type]
    if name == "64-true":
        return DoublePrecision()
    raise ValueError(name)


def make_fabric(
    world: int,
    precision: str = "32-true",
    *,
    partition_size: int = 2,
    accumulation: str = "two_hop",
    state_dict_type: str = "sharded",
) -> Fabric:
    kwargs: dict[str, Any] = {}
    if precision == "16-mixed-cpu":
        kwargs["plugins"] = [precision_plugin(precision)]
    else:
        kwargs["precision"] = precision
    strategy = MiCSStrategy(
        partition_size=partition_size,
        ranks_per_node=2,
        accumulation=accumulation,
        state_dict_type=state_dict_type,
    )
    fabric = Fabric(strategy=strategy, accelerator="cpu", devices=world, **kwargs)
    fabric.launch()
    return fabric


# ------------------------------------------------------------------------- training
def train(
    fabric: Fabric | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    accum: int,
    *,
    precision: Precision | None = None,
    first_window: int = 0,
    windows: int | None = None,
    skip_last: bool = False,
    max_norm: float | None = None,
    clip_val: float | None = None,
    scheduler: Any = None,
    counter: Counter | None = None,
) -> dict[str, list[float]]:
    """The loop of Lightning's Fabric docs (``fabric`` given), or the same loop in one
    process through the precision plugin's hooks, as Fabric calls them (``precision``).

    Runs windows ``first_window`` .. ``first_window + windows`` of ``accum`` micro-batches;
    ``skip_last`` runs no backward on each window's last micro-step (the optimizer still
    steps). Returns per-micro-step losses (mean over ranks) and per-step LRs and norms.
    """
    out: dict[str, list[float]] = {"losses": [], "lrs": [], "norms": []}
    end = None if windows is None else (first_window + windows) * accum
    for i, (x, y) in enumerate(loader):
        if i < first_window * accum or (end is not None and i >= end):
            continue
        is_last = (i + 1) % accum == 0
        if fabric is not None:
            with fabric.no_backward_sync(model, enabled=not is_last):
                loss = GPT.loss(model(x), y)
                if not (skip_last and is_last):
                    fabric.backward(loss / accum)
            out["losses"].append(common.mean_over_world(loss.item()))
        else:
            assert precision is not None
            with precision.forward_context():
                logits = model(precision.convert_input(x))
            loss = GPT.loss(precision.convert_output(logits), y)
            if not (skip_last and is_last):
                precision.backward(loss / accum, model)
            out["losses"].append(loss.item())
        if not is_last:
            continue
        out["lrs"].append(optimizer.param_groups[0]["lr"])
        if fabric is not None:
            if max_norm is not None:
                out["norms"].append(
                    fabric.clip_gradients(model, optimizer, max_norm=max_norm).item()
                )
            if clip_val is not None:
                fabric.clip_gradients(model, optimizer, clip_val=clip_val)
            optimizer.step()
        else:
            if max_norm is not None:
                precision.unscale_gradients(optimizer)
                out["norms"].append(
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
                )
            if clip_val is not None:
                precision.unscale_gradients(optimizer)
                torch.nn.utils.clip_grad_value_(model.parameters(), clip_val)
            precision.optimizer_step(optimizer)
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        if counter is not None:
            counter.count += 1
    return out


def reference(
    world: int,
    accum: int,
    steps: int,
    precision: str = "32-true",
    *,
    scheduler: bool = False,
    **kwargs: Any,
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """One process, global batch ``world * MICRO_BATCH``, a fresh plugin of the same
    precision: the ground truth."""
    plugin = precision_plugin(precision)
    model = plugin.convert_module(common.make_model())
    optimizer = common.make_optimizer(model.parameters())
    sched = LambdaLR(optimizer, warmup) if scheduler else None
    data = DataLoader(
        common.make_dataset(world, MICRO_BATCH, accum, steps), batch_size=world * MICRO_BATCH
    )
    out = train(None, model, optimizer, data, accum, precision=plugin, scheduler=sched, **kwargs)
    return out, {k: v.detach().clone() for k, v in model.state_dict().items()}


def loader(world: int, accum: int, steps: int) -> DataLoader:
    return common.make_loader(world, MICRO_BATCH, accum, steps)


def compare(
    run: dict[str, list[float]],
    state: dict[str, torch.Tensor],
    ref: dict[str, list[float]],
    ref_state: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """Differences from the reference (relative for gradient norms) and, to show that the
    comparison is meaningful, how far training moved the parameters from their init."""
    init = {k: v.to(ref_state[k].dtype) for k, v in common.make_model().state_dict().items()}
    result: dict[str, Any] = {
        "param_diff": common.max_abs_diff(state, ref_state),
        "param_change": common.max_abs_diff(ref_state, init),
        "loss_diff": max_diff(run["losses"], ref["losses"]),
        "lr_diff": max_diff(run["lrs"], ref["lrs"]),
    }
    if ref["norms"]:
        result["norms"] = run["norms"]
        result["ref_norms"] = ref["norms"]
        result["norm_rel_diff"] = max_diff(run["norms"], ref["norms"], rel=True)
    return result


def max_diff(a: list[float], b: list[float], rel: bool = False) -> float | str:
    if len(a) != len(b):
        return f"{len(a)} values vs {len(b)} in the reference"
    if not a:
        return 0.0
    return max(abs(x - y) / (abs(y) if rel else 1.0) for x, y in zip(a, b, strict=True))


def rank0(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a single-process reference comparison on rank 0 only."""
    return fn() if dist.get_rank() == 0 else {}


def error_of(fn: Callable[[], Any]) -> str | None:
    try:
        fn()
    except Exception as err:  # the message is the result
        return f"{type(err).__name__}: {err}"
    return None


# --------------------------------------------------------------------------- checks
def check_setup(world: int, args: argparse.Namespace) -> dict[str, Any]:
    accum, steps = 2, args.steps
    fabric = make_fabric(world)

    # The idiom of Lightning's docs: one call for the model and its optimizer.
    model = common.make_model()
    optimizer = common.make_optimizer(model.parameters())
    model, optimizer = fabric.setup(model, optimizer)
    joint = train(fabric, model, optimizer, loader(world, accum, steps), accum)
    joint_state = common.full_state(model)
    rebound = {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters()
    }

    # The separate set-up that MiCS supported before.
    model = fabric.setup_module(common.make_model())
    optimizer = fabric.setup_optimizers(common.make_optimizer(model.parameters()))
    separate = train(fabric, model, optimizer, loader(world, accum, steps), accum)
    separate_state = common.full_state(model)

    # An optimizer with state (here: momentum buffers from a step) is refused, untouched.
    model = common.make_model()
    optimizer = common.make_optimizer(model.parameters())
    x, y = next(iter(loader(world, accum, steps)))
    GPT.loss(model(x), y).backward()
    optimizer.step()
    refused = error_of(lambda: fabric.setup(model, optimizer))
    left_unsharded = not isinstance(model, FSDPModule)

    # An optimizer created from meta-device parameters is rebound to the materialised
    # shards (numbers are not compared: meta init on a CPU mesh is not shard-aware).
    with fabric.init_module(empty_init=True):
        meta_model = GPT(common.TINY)
    meta_optimizer = common.make_optimizer(meta_model.parameters())
    meta_model, meta_optimizer = fabric.setup(meta_model, meta_optimizer)
    meta_params = [p for g in meta_optimizer.param_groups for p in g["params"]]
    meta_rebound = {id(p) for p in meta_params} == {id(p) for p in meta_model.parameters()} and all(
        isinstance(p, DTensor) and not p.is_meta for p in meta_params
    )

    def against_reference() -> dict[str, Any]:
        ref, ref_state = reference(world, accum, steps)
        return {
            "joint": compare(joint, joint_state, ref, ref_state),
            "separate": compare(separate, separate_state, ref, ref_state),
            "joint_vs_separate": common.max_abs_diff(joint_state, separate_state),
        }

    return {
        "rebound": rebound,
        "refused_with_state": refused,
        "left_unsharded": left_unsharded,
        "meta_rebound": meta_rebound,
        **rank0(against_reference),
    }


def check_resume(world: int, args: argparse.Namespace) -> dict[str, Any]:
    accum, steps, stop = 2, 4, 2  # a 4-step warmup, interrupted after step 2
    results: dict[str, Any] = {}
    for state_dict_type in ("sharded", "full"):
        fabric = make_fabric(world, state_dict_type=state_dict_type)
        path = Path(args.out).parent / f"ckpt-{state_dict_type}"

        def new_run(seed: int = 0, fabric: Fabric = fabric) -> tuple[Any, Any, LambdaLR, Counter]:
            model = common.make_model(seed)
            optimizer = common.make_optimizer(model.parameters())
            scheduler = LambdaLR(optimizer, warmup)
            model, optimizer, scheduler = fabric.setup(model, optimizer, scheduler=scheduler)
            return model, optimizer, scheduler, Counter()

        # Uninterrupted.
        model, optimizer, scheduler, counter = new_run()
        whole = train(
            fabric, model, optimizer, loader(world, accum, steps), accum, scheduler=scheduler
        )
        whole_state = common.full_state(model)

        # Interrupted after `stop` steps, saved, resumed into fresh objects.
        model, optimizer, scheduler, counter = new_run()
        first = train(
            fabric,
            model,
            optimizer,
            loader(world, accum, steps),
            accum,
            windows=stop,
            scheduler=scheduler,
            counter=counter,
        )
        fabric.save(
            path,
            {
                "model": model,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "counter": counter,
                "step": stop,
                "note": "not requested",
            },
        )
        model, optimizer, scheduler, counter = new_run(seed=1)
        state = {
            "model": model,
            "optimizer": optimizer,
            "scheduler": scheduler,
            "counter": counter,
            "step": 0,
        }
        remainder = fabric.load(path, state)
        restored = {
            "scheduler_same_object": state["scheduler"] is scheduler,
            "scheduler_last_epoch": scheduler.last_epoch,
            "counter_same_object": state["counter"] is counter,
            "counter": counter.count,
            "step": state["step"],
            "remainder": remainder,
        }
        second = train(
            fabric,
            model,
            optimizer,
            loader(world, accum, steps),
            accum,
            first_window=stop,
            scheduler=scheduler,
            counter=counter,
        )
        resumed_state = common.full_state(model)

        def against_reference(
            whole=whole, whole_state=whole_state, first=first, second=second, resumed=resumed_state
        ) -> dict[str, Any]:
            ref, ref_state = reference(world, accum, steps, scheduler=True)
            return {
                "lrs": first["lrs"] + second["lrs"],
                "whole_lrs": whole["lrs"],
                "ref_lrs": ref["lrs"],
                "resumed_vs_whole": common.max_abs_diff(resumed, whole_state),
                "whole_vs_reference": compare(whole, whole_state, ref, ref_state),
            }

        results[state_dict_type] = {**restored, **rank0(against_reference)}
    return results


def check_clip(world: int, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    steps = args.steps

    # A NaN loss on one rank: every rank's global norm is NaN, and Fabric's default
    # error_if_nonfinite=True raises on every rank.
    fabric = make_fabric(world)
    model = common.make_model()
    model, optimizer = fabric.setup(model, common.make_optimizer(model.parameters()))
    x, y = next(iter(loader(world, 1, 1)))
    loss = GPT.loss(model(x), y)
    if dist.get_rank() == 1:
        loss = loss * float("nan")
    fabric.backward(loss)
    results["nan_default"] = error_of(lambda: fabric.clip_gradients(model, optimizer, max_norm=1.0))
    norm = fabric.clip_gradients(model, optimizer, max_norm=1.0, error_if_nonfinite=False)
    results["nan_allowed_norm"] = norm.item()
    optimizer.zero_grad()

    # Windows whose last micro-step skips its backward: the parked gradients must be
    # flushed, then unscaled, then clipped.
    cases = {
        # name: precision, partition size, accumulation mode, max_norm, clip_val
        "16-mixed-clip-active": ("16-mixed-cpu", 2, "two_hop", 0.05, None),
        "16-mixed-clip-inactive": ("16-mixed-cpu", 4, "last_micro_step_only", 100.0, None),
        "value": ("32-true", 2, "two_hop", None, 0.002),
    }
    accum = 3
    for name, (precision, partition, mode, max_norm, clip_val) in cases.items():
        fabric = make_fabric(world, precision, partition_size=partition, accumulation=mode)
        model = common.make_model()
        model, optimizer = fabric.setup(model, common.make_optimizer(model.parameters()))
        kwargs = dict(skip_last=True, max_norm=max_norm, clip_val=clip_val)
        run = train(fabric, model, optimizer, loader(world, accum, steps), accum, **kwargs)
        state = common.full_state(model)
        scale = getattr(fabric.strategy.precision, "scaler", None)
        scale = scale.get_scale() if scale is not None else None

        def against_reference(run=run, state=state, precision=precision, kwargs=kwargs):
            ref, ref_state = reference(world, accum, steps, precision, **kwargs)
            return compare(run, state, ref, ref_state)

        results[name] = {"scale": scale, **rank0(against_reference)}
    return results


def check_precision(world: int, args: argparse.Namespace) -> dict[str, Any]:
    accum, steps = 2, args.steps
    results: dict[str, Any] = {}
    for precision in filter(None, args.precisions.split(",")):
        fabric = make_fabric(world, precision)
        model = common.make_model()
        model, optimizer = fabric.setup(model, common.make_optimizer(model.parameters()))
        run = train(fabric, model, optimizer, loader(world, accum, steps), accum)
        state = common.full_state(model)
        plugin = fabric.strategy.precision
        facts = {
            "plugin": type(plugin).__name__,
            "plugin_precision": getattr(plugin, "precision", None),
            "param_dtype": str(next(iter(state.values())).dtype),
        }

        def against_reference(run=run, state=state, precision=precision):
            ref, ref_state = reference(world, accum, steps, precision)
            result = compare(run, state, ref, ref_state)
            result["finite"] = all(math.isfinite(v) for v in run["losses"])
            return result

        results[precision] = {**facts, **rank0(against_reference)}
    return results


CHECKS = {
    "setup": check_setup,
    "resume": check_resume,
    "clip": check_clip,
    "precision": check_precision,
}


def main() -> None:
    p = common.parser()
    p.add_argument("--checks", default=",".join(CHECKS))
    p.add_argument(
        "--precisions", default="32-true,bf16-mixed,16-mixed-cpu,bf16-true,16-true,64-true"
    )
    args = p.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    results = {name: CHECKS[name](world, args) for name in args.checks.split(",")}
    common.report(args.out, **results)
    common.finish()


if __name__ == "__main__":
    main()
