"""Communication accounting: every collective MiCS issues, with its size and its reach.

Three kinds of collectives move model states in MiCS training:

- ``all_gather``: parameters, inside the partition group (FSDP's unshard);
- ``reduce_scatter``: gradients, inside the partition group, every synchronising
  micro-step;
- ``all_reduce``: gradient shards across the replication group, once per optimizer step
  in ``two_hop`` accumulation.

Each one is recorded in a :class:`CommStats` with its *logical* bytes (``numel *
element_size`` of the collective's full buffer: the all-gather output, the
reduce-scatter input, the all-reduce tensor) and whether its process group crosses
nodes (its ranks live on more than one node). Logical bytes are what the algorithm
moves, not what a backend puts on the wire (gloo emulates a reduce-scatter with an
all-reduce, NCCL rings move ``(n-1)/n`` of the buffer per rank, ...).

Mechanism: :func:`install_comm_stats` gives every FSDP module a recording
all-gather / reduce-scatter (:meth:`FSDPModule.set_custom_all_gather` and
``set_custom_reduce_scatter``; they are not recursive) that issue exactly FSDP's default
flat collectives (`~lightning_mics.collectives.RecordingAllGather` /
``RecordingReduceScatter``), and, on a 2-D mesh, an all-reduce hook that only *observes* the tensor
FSDP has just all-reduced (``set_all_reduce_hook``; with native HSDP it runs after
FSDP's own all-reduce and changes nothing). :func:`apply_mics` installs it unless
``MiCSConfig(comm_stats=False)``; :func:`comm_stats` finds the recorder of a model.

With hierarchical collectives (`lightning_mics.collectives`), each of their stages is
recorded as its own collective over its own intra- or inter-node group, so counts are
those of the ``torch.distributed`` calls and inter-node bytes shrink to the inter-node
stage's buffers.

NOTE: with a custom comm installed FSDP refuses ``set_symm_mem()`` and
``set_allocate_memory_from_process_group()``; turn ``comm_stats`` off to use them. A
later user call to ``set_all_reduce_hook`` replaces the observing hook, so all-reduces
are then no longer counted.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from lightning_mics.collectives import RecordingAllGather, RecordingReduceScatter, install_comms
from lightning_mics.topology import MiCSTopology

CommKind = Literal["all_gather", "reduce_scatter", "all_reduce"]
KINDS: tuple[CommKind, ...] = ("all_gather", "reduce_scatter", "all_reduce")

#: Attribute under which every FSDP module of a model sharded by `apply_mics` keeps the
#: model's (one, shared) recorder.
STATS_ATTR = "_mics_comm_stats"

#: Decimal megabytes, as the summaries and ``CommStatsMonitor``'s ``inter_node_MB`` label
#: them.
MB = 1_000_000


class CommStats:
    """Counts and logical bytes of collectives, by kind and by intra-/inter-node reach.

    ``node_of_rank`` maps a global rank to its node (any hashable id). Thread-safe:
    FSDP's backward hooks may record from autograd's device threads.
    """

    def __init__(self, node_of_rank: Mapping[int, Any] | Sequence[Any]) -> None:
        if not isinstance(node_of_rank, Mapping):
            node_of_rank = dict(enumerate(node_of_rank))
        self._node_of_rank = dict(node_of_rank)
        self._lock = threading.Lock()
        # id(group) -> (group, crosses nodes); the group is kept so its id is not reused.
        self._reach: dict[int, tuple[Any, bool]] = {}
        self._counts: dict[str, int] = {}
        self.reset()

    @classmethod
    def for_ranks_per_node(cls, world_size: int, ranks_per_node: int) -> CommStats:
        """Node-major layout: rank ``r`` is on node ``r // ranks_per_node``."""
        return cls([r // ranks_per_node for r in range(world_size)])

    @classmethod
    def for_topology(cls, topology: MiCSTopology) -> CommStats:
        """The nodes of ``topology``'s ranks."""
        return cls.for_ranks_per_node(topology.world_size, topology.ranks_per_node)

    # ------------------------------------------------------------------- recording
    def crosses_nodes(self, group: dist.ProcessGroup | None) -> bool:
        """Whether ``group``'s ranks live on more than one node."""
        key = id(group)
        cached = self._reach.get(key)
        if cached is None:
            ranks = (
                range(dist.get_world_size())
                if group is None
                else dist.get_process_group_ranks(group)
            )
            try:
                nodes = {self._node_of_rank[r] for r in ranks}
            except KeyError as err:
                raise ValueError(
                    f"CommStats does not know the node of rank {err.args[0]}; it knows ranks "
                    f"{sorted(self._node_of_rank)}."
                ) from None
            cached = (group, len(nodes) > 1)
            self._reach[key] = cached
        return cached[1]

    def record(self, kind: CommKind, nbytes: int, group: dist.ProcessGroup | None) -> None:
        """Record one collective of ``kind`` moving ``nbytes`` logical bytes over ``group``."""
        self.record_bytes(kind, nbytes, inter_node=self.crosses_nodes(group))

    def record_bytes(self, kind: CommKind, nbytes: int, *, inter_node: bool) -> None:
        if kind not in KINDS:
            raise ValueError(f"Unknown collective kind {kind!r}; use one of {KINDS}.")
        reach = "inter" if inter_node else "intra"
        with self._lock:
            c = self._counts
            c[f"{kind}_count"] += 1
            c[f"{kind}_bytes"] += nbytes
            c[f"{kind}_{reach}_node_bytes"] += nbytes
            c[f"{reach}_node_bytes"] += nbytes

    def reset(self) -> None:
        """Zero every counter (e.g. after each optimizer step)."""
        with self._lock:
            self._counts = dict.fromkeys(_KEYS, 0)

    # -------------------------------------------------------------------- reading
    def snapshot(self) -> dict[str, int]:
        """A copy of every counter: ``{kind}_count``, ``{kind}_bytes``,
        ``{kind}_{inter,intra}_node_bytes`` for each kind, ``inter_node_bytes``,
        ``intra_node_bytes``."""
        with self._lock:
            return dict(self._counts)

    def log_dict(self, prefix: str = "comm/", *, reset: bool = False) -> dict[str, float]:
        """The headline counters as floats for a logger (``fabric.log_dict(...)``):
        counts and bytes per kind, inter- and intra-node bytes. ``reset`` zeroes the
        counters after reading them."""
        snap = self.snapshot()
        if reset:
            self.reset()
        return {f"{prefix}{key}": float(snap[key]) for key in LOG_KEYS}

    def _get(self, key: str) -> int:
        with self._lock:
            return self._counts[key]

    all_gather_count = property(lambda self: self._get("all_gather_count"))
    all_gather_bytes = property(lambda self: self._get("all_gather_bytes"))
    reduce_scatter_count = property(lambda self: self._get("reduce_scatter_count"))
    reduce_scatter_bytes = property(lambda self: self._get("reduce_scatter_bytes"))
    all_reduce_count = property(lambda self: self._get("all_reduce_count"))
    all_reduce_bytes = property(lambda self: self._get("all_reduce_bytes"))
    inter_node_bytes = property(lambda self: self._get("inter_node_bytes"))
    intra_node_bytes = property(lambda self: self._get("intra_node_bytes"))

    def __repr__(self) -> str:
        return f"CommStats({self.snapshot()})"


_KEYS = (
    *(f"{kind}_{what}" for kind in KINDS for what in ("count", "bytes")),
    *(f"{kind}_{reach}_node_bytes" for kind in KINDS for reach in ("inter", "intra")),
    "inter_node_bytes",
    "intra_node_bytes",
)
#: What `CommStats.log_dict` and the Trainer's `CommStatsMonitor` log.
LOG_KEYS = (
    *(f"{kind}_{what}" for kind in KINDS for what in ("count", "bytes")),
    "inter_node_bytes",
    "intra_node_bytes",
)


def format_summary(snapshot: Mapping[str, float], title: str = "per optimizer step") -> str:
    """A short human summary of one snapshot (or an average of several)."""
    lines = [f"communication {title} (logical bytes, this rank):"]
    for kind in KINDS:
        lines.append(
            f"  {kind.replace('_', '-'):<15}{snapshot[f'{kind}_count']:>8.1f} calls"
            f"{snapshot[f'{kind}_bytes'] / MB:>10.2f} MB"
            f"  (inter-node {snapshot[f'{kind}_inter_node_bytes'] / MB:.2f} MB)"
        )
    lines.append(
        f"  inter-node {snapshot['inter_node_bytes'] / MB:.2f} MB, "
        f"intra-node {snapshot['intra_node_bytes'] / MB:.2f} MB"
    )
    return "\n".join(lines)


def mean_snapshot(snapshots: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Key-wise mean of several snapshots (e.g. per-step ones)."""
    if not snapshots:
        return dict.fromkeys(_KEYS, 0.0)
    return {key: sum(s[key] for s in snapshots) / len(snapshots) for key in _KEYS}


# ------------------------------------------------------------------- FSDP2 comm objects
def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class AllReduceObserver:
    """An FSDP all-reduce hook that records the cross-replica all-reduce FSDP just did.

    With native HSDP (a 2-D mesh) FSDP calls the hook right after its own
    ``dist.all_reduce`` of the reduce-scattered gradient over ``group`` (and only on
    micro-steps that all-reduce). The hook reads the tensor's size and nothing else,
    so numerics are untouched. Install it only on a 2-D mesh: on a 1-D mesh FSDP calls
    the hook after the reduce-scatter although no all-reduce happened.
    """

    def __init__(self, stats: CommStats, group: dist.ProcessGroup) -> None:
        self.stats = stats
        self.group = group

    def __call__(self, tensor: torch.Tensor) -> None:
        self.stats.record("all_reduce", _nbytes(tensor), self.group)


# ---------------------------------------------------------------------- installation
def install_comm_stats(
    model: nn.Module,
    stats: CommStats,
    all_reduce_group: dist.ProcessGroup | None,
    *,
    all_gather: RecordingAllGather | None = None,
    reduce_scatter: RecordingReduceScatter | None = None,
) -> CommStats:
    """Record the collectives of every FSDP module in ``model`` into ``stats``.

    ``all_reduce_group`` is the replication group of a 2-D mesh (``None`` on a 1-D mesh,
    where FSDP issues no all-reduce). ``all_gather`` / ``reduce_scatter`` are the comms
    to run (e.g. the hierarchical ones, which record each of their stages); ``None``
    runs FSDP's flat collectives, recorded. Returns ``stats``.
    """
    all_gather = all_gather or RecordingAllGather()
    reduce_scatter = reduce_scatter or RecordingReduceScatter()
    all_gather.attach_stats(stats)
    reduce_scatter.attach_stats(stats)
    install_comms(model, all_gather, reduce_scatter)
    observer = AllReduceObserver(stats, all_reduce_group) if all_reduce_group else None
    for module in model.modules():
        if isinstance(module, FSDPModule):
            if observer is not None:
                module.set_all_reduce_hook(observer)
            setattr(module, STATS_ATTR, stats)
    return stats


def find_comm_stats(model: nn.Module) -> CommStats | None:
    """The recorder of a model sharded by `apply_mics`, or ``None`` when there is none.

    ``model`` may be the sharded root or any module containing it or one of its FSDP
    units (a LightningModule, Fabric's wrapper, ...).
    """
    for module in model.modules():
        stats = module.__dict__.get(STATS_ATTR)
        if stats is not None:
            return stats
    return None


def comm_stats(model: nn.Module) -> CommStats:
    """The :class:`CommStats` recording ``model``'s collectives (see `find_comm_stats`)."""
    stats = find_comm_stats(model)
    if stats is None:
        raise ValueError(
            f"{type(model).__name__} records no communication statistics: shard it with "
            "apply_mics(...) (or strategy='mics') and leave MiCSConfig(comm_stats=True)."
        )
    return stats


__all__ = [
    "KINDS",
    "MB",
    "AllReduceObserver",
    "CommStats",
    "RecordingAllGather",
    "RecordingReduceScatter",
    "comm_stats",
    "find_comm_stats",
    "format_summary",
    "install_comm_stats",
    "mean_snapshot",
]
