"""Record the collectives that FSDP and `lightning_mics` hand to ``torch.distributed``.

FSDP calls ``dist.all_reduce`` and its default comms ``dist.all_gather_single`` /
``dist.reduce_scatter_single``; MiCS's recording and hierarchical comms look the same
functions up on every call. Wrapping them therefore sees every buffer that reaches the
backend, with its reduce op, its group and its dtype.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from tests.scripts.emulated_nccl import op_name

# torch.distributed function -> (recorded kind, index of the buffer argument, its name)
_FUNCTIONS = {
    "all_reduce": ("all_reduce", 0, "tensor"),
    "reduce_scatter_single": ("reduce_scatter", 1, "input"),
    "all_gather_single": ("all_gather", 1, "input_tensor"),
}


def op_key(kind: str, op: Any, ranks: list[int], dtype: torch.dtype) -> str:
    """``"reduce_scatter AVG [0, 1] float32"``; all-gathers have ``-`` for the op."""
    op_text = "-" if op is None else op_name(op)
    return f"{kind} {op_text} {ranks} {str(dtype).removeprefix('torch.')}"


class Recorder:
    """Counts, by `op_key`, the collectives issued while `recording` is active.

    Installs itself once per process, on creation.
    """

    def __init__(self, kinds: tuple[str, ...] = ("all_reduce", "reduce_scatter")) -> None:
        self.active = False
        self.ops: Counter[str] = Counter()
        for name, (kind, index, keyword) in _FUNCTIONS.items():
            if kind in kinds:
                setattr(dist, name, self._wrap(getattr(dist, name), kind, index, keyword))

    def _wrap(self, fn: Any, kind: str, index: int, keyword: str) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                tensor = args[index] if len(args) > index else kwargs[keyword]
                op, group_index = None, index + 1
                if kind != "all_gather":
                    op = kwargs.get("op", args[index + 1] if len(args) > index + 1 else None)
                    op, group_index = (dist.ReduceOp.SUM if op is None else op), index + 2
                group = kwargs.get("group", args[group_index] if len(args) > group_index else None)
                group = group or dist.group.WORLD
                ranks = dist.get_process_group_ranks(group)
                self.ops[op_key(kind, op, ranks, tensor.dtype)] += 1
            return fn(*args, **kwargs)

        return wrapper

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def dtypes(self) -> dict[str, dict[str, int]]:
        """``{kind: {dtype: calls}}`` of what was recorded."""
        out: dict[str, Counter[str]] = {}
        for key, count in self.ops.items():
            kind, *_, dtype = key.split(" ")
            out.setdefault(kind, Counter())[dtype] += count
        return {kind: dict(counts) for kind, counts in sorted(out.items())}
