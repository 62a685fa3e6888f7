"""A test-only process-group backend: gloo underneath, plus NCCL's ``AVG`` and
``PREMUL_SUM`` reductions, which gloo lacks.

On gloo, `apply_mics` makes FSDP reduce with sums only (``set_force_sum_reduction_for_comms``)
and `_stage_ops` sums twice and divides once, so the reduce ops FSDP picks on NCCL (``AVG``
for the reduce-scatter and the cross-replica all-reduce; ``PREMUL_SUM(1/f)`` with a custom
gradient divide factor) never run on a CPU-only machine. Registering this backend under a
name that is neither ``"gloo"`` nor ``"nccl"`` and initialising the default group with it
makes the whole stack behave as on NCCL: FSDP keeps its own reduce ops, the hierarchical
reduce-scatter splits them across its stages as it does for NCCL, and the ops reach this
backend, which implements them with gloo sums:

- ``AVG``: sum, then divide by the group size (NCCL's ``ncclAvg``);
- ``PREMUL_SUM(f)``: scale each rank's input by ``f`` (the factor is readable from Python as
  ``ReduceOp.factor`` in torch 2.13), then sum; the input buffer of a reduce-scatter is not
  modified, as with NCCL;
- everything else goes to gloo unchanged.

Every reduction that reaches the backend is recorded in `EMULATED` (op, group size). The
gloo backend is also registered for the CPU device (c10d's C++ dispatch needs one).

NOTE (deadlock): torch's trampoline for Python process groups (``PyProcessGroup``) takes
the GIL to look for a Python override and, when there is none, calls the C++ default
*with the GIL held*; the default enqueues on gloo, whose worker may be holding the queue's
mutex while it frees a finished work, which needs the GIL. Functional collectives
(DTensor's ``full_tensor()``) took that path and hung. So every collective the trampoline
knows is defined here in Python, and only calls gloo through its bindings, which release
the GIL.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch.distributed import ReduceOp
from torch.futures import Future

#: The backend name: contains neither "gloo" nor "nccl", so that no code path mistakes it
#: for either.
NAME = "emulated_ccl"

#: (op name, group size) -> number of reductions with that op that reached the backend.
EMULATED: Counter[tuple[str, int]] = Counter()


def op_name(op: ReduceOp | ReduceOp.RedOpType) -> str:
    """``"AVG"``, ``"SUM"``, ``"PREMUL_SUM(0.125)"``, ... of a ``ReduceOp`` or its type."""
    name = str(getattr(op, "op", op)).rsplit(".", 1)[-1]
    if isinstance(op, ReduceOp) and op == ReduceOp.PREMUL_SUM:
        factor = op.factor
        factor = factor.item() if isinstance(factor, torch.Tensor) else factor
        name = f"{name}({factor:g})"
    return name


def _completed(result: object) -> dist.Work:
    future: Future = Future()
    future.set_result(result)
    return _create_work_from_future(future)


def _sum_options(cls: type) -> object:
    opts = cls()
    opts.reduceOp = ReduceOp.SUM
    return opts


class EmulatedNCCLProcessGroup(dist.ProcessGroup):
    """gloo with ``AVG`` and ``PREMUL_SUM`` (see the module docstring)."""

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: timedelta) -> None:
        super().__init__(rank, size)
        self._gloo = dist.ProcessGroupGloo(store, rank, size, timeout)
        # NOTE: functional collectives (DTensor) dispatch in C++ to the device's backend.
        self._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, self._gloo)

    def getBackendName(self) -> str:  # c10d's name
        return NAME

    # ------------------------------------------------------------------ reductions
    def _translate(self, op: ReduceOp) -> ReduceOp:
        if op == ReduceOp.AVG or op == ReduceOp.PREMUL_SUM:
            EMULATED[(op_name(op), self.size())] += 1
        return op

    def allreduce(self, tensors: list[torch.Tensor], opts: dist.AllreduceOptions) -> dist.Work:
        op = self._translate(opts.reduceOp)
        if op == ReduceOp.PREMUL_SUM:
            for t in tensors:
                t.mul_(op.factor)
        elif op != ReduceOp.AVG:
            return self._gloo.allreduce(tensors, opts)
        self._gloo.allreduce(tensors, _sum_options(dist.AllreduceOptions)).wait()
        if op == ReduceOp.AVG:
            for t in tensors:
                t.div_(self.size())
        return _completed(tensors)

    def reduce_scatter_single(
        self, output: torch.Tensor, input: torch.Tensor, opts: dist.ReduceScatterOptions
    ) -> dist.Work:
        op = self._translate(opts.reduceOp)
        if op == ReduceOp.PREMUL_SUM:
            input = input * op.factor  # NCCL leaves the input buffer as it is
        elif op != ReduceOp.AVG:
            return self._gloo._reduce_scatter_base(output, input, opts)
        self._gloo._reduce_scatter_base(
            output, input, _sum_options(dist.ReduceScatterOptions)
        ).wait()
        if op == ReduceOp.AVG:
            output.div_(self.size())
        return _completed([output])

    def reduce_scatter(
        self,
        outputs: list[torch.Tensor],
        inputs: list[list[torch.Tensor]],
        opts: dist.ReduceScatterOptions,
    ) -> dist.Work:
        op = opts.reduceOp
        if op == ReduceOp.AVG or op == ReduceOp.PREMUL_SUM:
            raise NotImplementedError(f"{NAME}: list reduce_scatter with {op_name(op)}")
        return self._gloo.reduce_scatter(outputs, inputs, opts)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts) -> dist.Work:
        op = opts.reduceOp
        if op == ReduceOp.AVG or op == ReduceOp.PREMUL_SUM:
            raise NotImplementedError(f"{NAME}: allreduce_coalesced with {op_name(op)}")
        return self._gloo.allreduce_coalesced(tensors, opts)

    def reduce_scatter_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts
    ) -> dist.Work:
        for output, input in zip(outputs, inputs, strict=True):
            self.reduce_scatter_single(output, input, opts).wait()
        return _completed(outputs)

    # ----------------------------------------------------------- everything else
    def all_gather_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts
    ) -> dist.Work:
        for output, input in zip(outputs, inputs, strict=True):
            self._gloo._allgather_base(output, input, opts).wait()
        return _completed(outputs)

    def all_to_all_single(self, output, input, output_splits, input_splits, opts) -> dist.Work:
        return self._gloo.alltoall_base(output, input, output_splits, input_splits, opts)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts) -> dist.Work:
        return self._gloo._allgather_base(output, input, opts)

    def allgather(self, outputs, inputs, opts) -> dist.Work:
        return self._gloo.allgather(outputs, inputs, opts)

    def allgather_coalesced(self, outputs, inputs, opts) -> dist.Work:
        return self._gloo.allgather_coalesced(outputs, inputs, opts)

    def broadcast(self, tensors, opts) -> dist.Work:
        return self._gloo.broadcast(tensors, opts)

    def barrier(self, opts) -> dist.Work:
        return self._gloo.barrier(opts)

    def gather(self, outputs, inputs, opts) -> dist.Work:
        return self._gloo.gather(outputs, inputs, opts)

    def scatter(self, outputs, inputs, opts) -> dist.Work:
        return self._gloo.scatter(outputs, inputs, opts)

    def alltoall(self, outputs, inputs, opts) -> dist.Work:
        return self._gloo.alltoall(outputs, inputs, opts)

    def send(self, tensors, dst: int, tag: int) -> dist.Work:
        return self._gloo.send(tensors, dst, tag)

    def recv(self, tensors, src: int, tag: int) -> dist.Work:
        return self._gloo.recv(tensors, src, tag)


def _create(store: dist.Store, rank: int, size: int, timeout: timedelta) -> dist.ProcessGroup:
    return EmulatedNCCLProcessGroup(store, rank, size, timeout)


def register() -> str:
    """Register the backend (idempotent); returns its name for ``init_process_group``."""
    if NAME.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(NAME, _create, devices=["cpu"])
    return NAME
