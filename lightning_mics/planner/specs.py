"""What the cost model and the planner reason about: a model's shape, a cluster's
hardware, a training run's shape, and a parallelism strategy.

Pure Python arithmetic: no torch, no process group. Every dataclass checks itself in
``__post_init__`` and raises ``ValueError`` naming the offending field.

Units, everywhere in :mod:`lightning_mics.planner`: bytes (B), seconds (s), FLOPs (floating
point operations, a multiply-add counts 2). Configuration fields carry their unit in the
name: ``*_gbps`` gigabits per second (1e9 bit/s), ``*_us`` microseconds, ``*_gib`` GiB
(2**30 bytes), ``*_tflops`` 1e12 FLOP/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from lightning_mics.config import AccumulationMode

GIB = 2**30

#: Bytes per element of the dtype names the recipes and `MiCSConfig` accept.
DTYPE_BYTES = {
    "fp32": 4,
    "float32": 4,
    "32": 4,
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "16": 2,
}


def dtype_bytes(name: str | None, default: int) -> int:
    """Bytes per element of ``name`` (``"bf16"``, ``"torch.float32"``, ...); ``default``
    for ``None``."""
    if name is None:
        return default
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


def _positive(obj: Any, *names: str, integer: bool = False, allow_none: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None and allow_none:
            continue
        ok = (
            isinstance(value, int) and not isinstance(value, bool)
            if integer
            else isinstance(value, (int, float)) and not isinstance(value, bool)
        )
        if not ok or value <= 0 or (not integer and not math.isfinite(value)):
            kind = "a positive int" if integer else "a positive number"
            raise ValueError(f"{type(obj).__name__}.{name} must be {kind}, got {value!r}")


def _fraction(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be in (0, 1], got {value!r}")


# ------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class ModelSpec:
    """The shape of a recipe GPT (``recipes/gpt.py``) or BERT (``recipes/bert.py``).

    Parameter shapes are listed per FSDP unit exactly as the recipes build them, so that
    parameter counts and the padded shard sizes FSDP communicates are exact. Units: one
    per transformer block (what MiCS's default wrap policy shards) and the *root* (the
    embeddings, final LayerNorm and output head, which live outside the blocks).
    """

    arch: str
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    block_size: int
    bias: bool = True
    tie_weights: bool = True
    type_vocab_size: int = 2
    name: str = ""

    def __post_init__(self) -> None:
        if self.arch not in ("gpt", "bert"):
            raise ValueError(f"ModelSpec.arch must be 'gpt' or 'bert', got {self.arch!r}")
        _positive(self, "n_layer", "n_head", "n_embd", "vocab_size", "block_size", integer=True)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"ModelSpec.n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
            )

    @classmethod
    def from_config(cls, cfg: dict[str, Any], name: str = "") -> ModelSpec:
        """From a ``conf/model/*.yaml`` mapping (extra keys such as ``_target_`` ignored)."""
        return cls(
            arch=str(cfg["arch"]),
            n_layer=int(cfg["n_layer"]),
            n_head=int(cfg["n_head"]),
            n_embd=int(cfg["n_embd"]),
            vocab_size=int(cfg["vocab_size"]),
            block_size=int(cfg["block_size"]),
            bias=bool(cfg.get("bias", True)),
            tie_weights=bool(cfg.get("tie_weights", cfg["arch"] == "bert")),
            type_vocab_size=int(cfg.get("type_vocab_size", 2)),
            name=name,
        )

    # ---------------------------------------------------------------- parameter shapes
    def block_shapes(self) -> list[tuple[int, ...]]:
        """Parameter shapes of one transformer block, in registration order."""
        h = self.n_embd
        if self.arch == "gpt":
            b = self.bias
            linear = lambda i, o: [(o, i)] + ([(o,)] if b else [])  # noqa: E731
            ln = [(h,)] + ([(h,)] if b else [])
            return [
                *ln,
                *linear(h, 3 * h),
                *linear(h, h),
                *ln,
                *linear(h, 4 * h),
                *linear(4 * h, h),
            ]
        # BERT: qkv, proj, ln_1, fc, proj, ln_2 (all with biases)
        return [
            (3 * h, h),
            (3 * h,),
            (h, h),
            (h,),
            (h,),
            (h,),
            (4 * h, h),
            (4 * h,),
            (h, 4 * h),
            (h,),
            (h,),
            (h,),
        ]

    def root_shapes(self) -> list[tuple[int, ...]]:
        """Parameter shapes outside the blocks (embeddings, final LayerNorm, head); a tied
        weight is counted once."""
        h, v, t = self.n_embd, self.vocab_size, self.block_size
        if self.arch == "gpt":
            shapes = [(v, h), (t, h), (h,)] + ([(h,)] if self.bias else [])
            if not self.tie_weights:
                shapes.append((v, h))
            return shapes
        shapes = [(v, h), (t, h), (self.type_vocab_size, h), (h,), (h,)]  # embeddings + ln
        shapes += [(h, h), (h,), (h,), (h,)]  # MLM head: dense + LayerNorm
        if not self.tie_weights:
            shapes.append((v, h))
        shapes.append((v,))  # MLM output bias
        return shapes

    @property
    def block_params(self) -> int:
        return sum(math.prod(s) for s in self.block_shapes())

    @property
    def root_params(self) -> int:
        return sum(math.prod(s) for s in self.root_shapes())

    @property
    def num_params(self) -> int:
        return self.n_layer * self.block_params + self.root_params

    # --------------------------------------------------------------------------- FLOPs
    def block_forward_flops(self, batch: int, seq_len: int) -> float:
        """Forward FLOPs of one block on ``batch`` x ``seq_len`` tokens: the weight
        matmuls (``2 x 12 h^2`` per token) and the attention score and context matmuls
        (``4 s h`` per token, the full ``s x s`` square as Megatron-LM counts it, causal or
        not). Element-wise work (LayerNorm, softmax, GELU) is not counted."""
        h, tokens = self.n_embd, batch * seq_len
        return 24.0 * tokens * h * h + 4.0 * batch * seq_len * seq_len * h

    def root_forward_flops(self, batch: int, seq_len: int) -> float:
        """Forward FLOPs outside the blocks: the vocabulary projection (``2 h V`` per
        token; BERT's MLM head adds its ``h x h`` dense layer)."""
        h, tokens = self.n_embd, batch * seq_len
        flops = 2.0 * tokens * h * self.vocab_size
        if self.arch == "bert":
            flops += 2.0 * tokens * h * h
        return flops

    def model_flops(self, batch: int, seq_len: int) -> float:
        """Training FLOPs of one micro-batch without recomputation (forward + backward =
        3 x forward): the ``72 b s l h^2 (1 + s/6h + V/12lh)`` of Narayanan et al. (2021)
        for a GPT. This is what MFU and Lightning's ThroughputMonitor count."""
        blocks = self.n_layer * self.block_forward_flops(batch, seq_len)
        return 3.0 * (blocks + self.root_forward_flops(batch, seq_len))

    def hardware_flops(self, batch: int, seq_len: int, activation_checkpointing: bool) -> float:
        """FLOPs executed: model FLOPs plus one more forward of every block when
        activation checkpointing recomputes them (Megatron-LM's ``96 b s l h^2 (...)``)."""
        extra = self.n_layer * self.block_forward_flops(batch, seq_len)
        return self.model_flops(batch, seq_len) + (extra if activation_checkpointing else 0.0)

    def describe(self) -> str:
        return (
            f"{self.name or self.arch}: {self.arch} {self.n_layer} layers x {self.n_embd} "
            f"({self.n_head} heads), vocabulary {self.vocab_size}, "
            f"{self.num_params / 1e9:.3g}B parameters"
        )


# ---------------------------------------------------------------------------- cluster
class Backend(str, Enum):
    NCCL = "nccl"
    GLOO = "gloo"


@dataclass(frozen=True)
class ClusterSpec:
    """A homogeneous cluster of ``nodes`` x ``ranks_per_node`` devices.

    Args:
        name: the cluster config's name (``conf/cluster/<name>.yaml``).
        nodes: number of nodes.
        ranks_per_node: ranks (GPUs) per node, ``k``.
        peak_tflops: dense bf16/fp16 peak per device (1e12 FLOP/s).
        compute_efficiency: fraction of ``peak_tflops`` a transformer layer achieves on
            its own (matmuls plus the element-wise work between them, no communication).
            Not predicted: A100 bf16 GEMMs of the 100B-scale shapes run at 75-85% of peak;
            whole layers with LayerNorm/softmax/GELU lower that to about 0.6.
        gpu_memory_gib: memory per device (GiB); ``None`` (CPU) means unknown.
        reserved_gib: memory per device the model cannot use: CUDA context, NCCL's
            communicator buffers, cuBLAS workspaces (GiB).
        fragmentation: fraction of the remaining memory lost to allocator fragmentation.
        intra_node_gbps: bandwidth of one device into the intra-node fabric, each way
            (NVLink through NVSwitch: 2400 Gbps = 300 GB/s on A100).
        inter_node_gbps: network bandwidth of one node, each way (EFA: 400 Gbps on p4d);
            every ring crossing nodes is limited by its per-node share of this.
        intra_node_efficiency, inter_node_efficiency: fraction of the nominal bandwidth a
            large collective achieves (NCCL bus bandwidth / link bandwidth).
        intra_node_latency_us, inter_node_latency_us: latency of one step of a ring
            algorithm (one hop: a message to the next rank), inside a node and across
            nodes. A ring over ``g`` ranks takes ``g-1`` steps per all-gather.
        collective_overhead_us: fixed cost of one collective call (kernel launch and
            proxy on NCCL; thread hand-off and Python on gloo).
        unit_overhead_us: host-side cost of one FSDP unit's forward or backward hooks
            (copy-in/copy-out, bookkeeping) that the compute pays; 0 on GPUs, where the
            host runs ahead of the device and hides it.
        memory_bandwidth_gbps: device memory bandwidth (for the optimizer step, which is
            memory-bound): 1555 GB/s = 12440 Gbps on A100 40 GB.
        backend: ``nccl`` (GPUs: collectives run on their own streams and overlap with
            compute) or ``gloo`` (CPU: FSDP2's collectives block the issuing thread, so
            nothing overlaps, and a reduce-scatter is an all-reduce: twice the bytes).
    """

    name: str
    nodes: int
    ranks_per_node: int
    peak_tflops: float
    intra_node_gbps: float
    inter_node_gbps: float
    gpu_memory_gib: float | None = None
    compute_efficiency: float = 0.6
    reserved_gib: float = 1.5
    fragmentation: float = 0.05
    intra_node_efficiency: float = 0.8
    inter_node_efficiency: float = 0.75
    intra_node_latency_us: float = 3.0
    inter_node_latency_us: float = 20.0
    collective_overhead_us: float = 5.0
    unit_overhead_us: float = 0.0
    memory_bandwidth_gbps: float = 12440.0
    backend: Backend | str = Backend.NCCL

    def __post_init__(self) -> None:
        _positive(self, "nodes", "ranks_per_node", integer=True)
        _positive(
            self,
            "peak_tflops",
            "intra_node_gbps",
            "inter_node_gbps",
            "memory_bandwidth_gbps",
        )
        _positive(self, "gpu_memory_gib", allow_none=True)
        _fraction(self, "compute_efficiency", "intra_node_efficiency", "inter_node_efficiency")
        for name in (
            "reserved_gib",
            "fragmentation",
            "intra_node_latency_us",
            "inter_node_latency_us",
            "collective_overhead_us",
            "unit_overhead_us",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ClusterSpec.{name} must be >= 0, got {value!r}")
        if self.fragmentation >= 1:
            raise ValueError(f"ClusterSpec.fragmentation must be < 1, got {self.fragmentation}")
        try:
            object.__setattr__(self, "backend", Backend(self.backend))
        except ValueError:
            raise ValueError(
                f"ClusterSpec.backend must be 'nccl' or 'gloo', got {self.backend!r}"
            ) from None

    # ----------------------------------------------------------------- derived values
    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def flops_per_s(self) -> float:
        """Achievable FLOP/s of one device (peak x compute_efficiency)."""
        return self.peak_tflops * 1e12 * self.compute_efficiency

    @property
    def intra_bytes_per_s(self) -> float:
        return self.intra_node_gbps * 1e9 / 8 * self.intra_node_efficiency

    @property
    def inter_bytes_per_s(self) -> float:
        return self.inter_node_gbps * 1e9 / 8 * self.inter_node_efficiency

    @property
    def memory_bytes_per_s(self) -> float:
        return self.memory_bandwidth_gbps * 1e9 / 8

    @property
    def overlap(self) -> bool:
        """Whether communication overlaps with compute (NCCL streams) or blocks (gloo)."""
        return self.backend is Backend.NCCL

    @property
    def usable_memory_bytes(self) -> float | None:
        """Device memory the model may use: capacity minus ``reserved_gib``, minus the
        ``fragmentation`` share of the rest; ``None`` when unknown."""
        if self.gpu_memory_gib is None:
            return None
        return (self.gpu_memory_gib - self.reserved_gib) * GIB * (1 - self.fragmentation)

    def with_nodes(self, nodes: int) -> ClusterSpec:
        from dataclasses import replace

        return replace(self, nodes=nodes)

    #: Keys of a ``conf/cluster/*.yaml`` that set `ClusterSpec` fields of the same name.
    OPTIONAL_KEYS = (
        "compute_efficiency",
        "reserved_gib",
        "fragmentation",
        "intra_node_efficiency",
        "inter_node_efficiency",
        "intra_node_latency_us",
        "inter_node_latency_us",
        "collective_overhead_us",
        "unit_overhead_us",
        "memory_bandwidth_gbps",
    )

    @classmethod
    def from_config(cls, cfg: dict[str, Any], nodes: int, **overrides: Any) -> ClusterSpec:
        """From a ``conf/cluster/*.yaml`` mapping: ``gpus_per_node`` (or the emulated
        ``ranks_per_node``), ``gpu_memory_gb`` (read as GiB, as the recipes' memory check
        does), ``peak_tflops``, ``intra_node_gbps``, ``inter_node_gbps``, and any of
        :attr:`OPTIONAL_KEYS`. Raises ``ValueError`` naming a missing key."""
        missing = [
            key for key in ("peak_tflops", "intra_node_gbps", "inter_node_gbps") if not cfg.get(key)
        ]
        if missing:
            raise ValueError(
                f"cluster {cfg.get('name')!r} does not set {', '.join(missing)}: the cost model "
                "needs the device's peak and the intra-/inter-node bandwidths (set them in "
                "conf/cluster/<name>.yaml or as overrides, e.g. cluster.peak_tflops=312)"
            )
        k = cfg.get("ranks_per_node") or cfg.get("gpus_per_node") or cfg.get("devices_per_node")
        kwargs = {key: cfg[key] for key in cls.OPTIONAL_KEYS if cfg.get(key) is not None}
        if cfg.get("accelerator") == "cpu":
            kwargs.setdefault("backend", Backend.GLOO)
        kwargs.update(overrides)
        return cls(
            name=str(cfg.get("name", "")),
            nodes=int(nodes),
            ranks_per_node=int(k),
            peak_tflops=float(cfg["peak_tflops"]),
            intra_node_gbps=float(cfg["intra_node_gbps"]),
            inter_node_gbps=float(cfg["inter_node_gbps"]),
            gpu_memory_gib=float(cfg["gpu_memory_gb"]) if cfg.get("gpu_memory_gb") else None,
            **kwargs,
        )


# --------------------------------------------------------------------------- training
#: Lightning precisions whose parameters (and so gradients and AdamW moments) are 16-bit.
LOW_PRECISION_TRUE = ("bf16-true", "16-true", "bf16", "16")
#: Lightning precisions that compute in 16 bits (autocast or converted).
LOW_PRECISION_COMPUTE = ("bf16-mixed", "16-mixed", "bf16-true", "16-true", "bf16", "16")


@dataclass(frozen=True)
class TrainingSpec:
    """The shape and numerics of one optimizer step on every rank.

    Args:
        micro_batch: sequences per rank per micro-step.
        seq_len: tokens per sequence.
        accumulation: micro-steps per optimizer step, ``s``.
        precision: Lightning's ``Trainer(precision=...)``.
        param_dtype: dtype of gathered parameters (MiCS/FSDP mixed precision); ``None``
            gathers them in their own dtype.
        reduce_dtype: dtype of gradient reduce-scatters and all-reduces (MiCS default
            ``fp32``).
        activation_checkpointing: recompute each block's activations in backward.
        reshard_after_forward: free each block's gathered parameters after forward and
            gather them again in backward (MiCS and the recipes' default).
        flash_attention: attention does not store the ``s x s`` score matrix (PyTorch's
            SDPA flash / memory-efficient kernels on GPUs).
    """

    micro_batch: int
    seq_len: int
    accumulation: int = 1
    precision: str = "bf16-mixed"
    param_dtype: str | None = None
    reduce_dtype: str | None = "fp32"
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True
    flash_attention: bool = True

    def __post_init__(self) -> None:
        _positive(self, "micro_batch", "seq_len", "accumulation", integer=True)
        dtype_bytes(self.param_dtype, 4)
        dtype_bytes(self.reduce_dtype, 4)
        for name in ("activation_checkpointing", "reshard_after_forward", "flash_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainingSpec.{name} must be a bool, got {getattr(self, name)!r}")
        known = ("32-true", "32", "64-true", "bf16-mixed", "16-mixed", *LOW_PRECISION_TRUE)
        if str(self.precision) not in known:
            raise ValueError(
                f"TrainingSpec.precision must be one of {known}, got {self.precision!r}"
            )

    # ------------------------------------------------------------ bytes per element
    @property
    def master_bytes(self) -> int:
        """Stored (sharded) parameters; also their gradients and each AdamW moment."""
        if self.precision in LOW_PRECISION_TRUE:
            return 2
        return 8 if self.precision == "64-true" else 4

    @property
    def gather_bytes(self) -> int:
        """Gathered (unsharded) parameters: ``param_dtype``, else the stored dtype."""
        return dtype_bytes(self.param_dtype, self.master_bytes)

    @property
    def reduce_bytes(self) -> int:
        return dtype_bytes(self.reduce_dtype, self.master_bytes)

    @property
    def compute_bytes(self) -> int:
        """Bytes per activation element: 2 when the compute is 16-bit."""
        low = self.precision in LOW_PRECISION_COMPUTE or self.gather_bytes == 2
        return 2 if low else 4

    @property
    def state_bytes_per_param(self) -> int:
        """Sharded model states per parameter: weights + gradients + AdamW's two moments
        (16 B in fp32, 8 B for ``*-true`` 16-bit precision)."""
        return 4 * self.master_bytes

    @property
    def tokens_per_micro_step(self) -> int:
        return self.micro_batch * self.seq_len


# --------------------------------------------------------------------------- strategy
class StrategyKind(str, Enum):
    DDP = "ddp"
    FSDP = "fsdp"  # ZeRO-3: one shard group of the whole world
    HSDP = "hsdp"  # shard in a node, all-reduce across nodes every micro-step
    MICS = "mics"  # shard over partition groups, two-hop gradient sync


@dataclass(frozen=True)
class StrategySpec:
    """One of the strategies the benchmark compares, as the cost model sees it.

    Args:
        kind: ``ddp``, ``fsdp`` (ZeRO-3 over the world), ``hsdp`` or ``mics``.
        partition_size: ranks sharing one replica (``mics``/``hsdp``; ``fsdp`` shards over
            the world and ``ddp`` over 1 whatever this says).
        hierarchical: two-stage (inter-node, then intra-node) all-gathers and
            reduce-scatters when a partition spans nodes (``mics`` only).
        accumulation: when gradients are reduce-scattered and all-reduced.
        root_reshard_after_forward: the root unit (embeddings, head) is freed after
            forward and gathered again in backward (FSDP2's behaviour when the option is
            passed explicitly, as the recipes' ``fsdp`` does; MiCS keeps it gathered).
        bucket_elements: split each unit's all-gather and reduce-scatter into
            collectives of at most this many elements (DeepSpeed ZeRO-3's
            ``stage3_prefetch_bucket_size``/``reduce_bucket_size`` are 5e7 by default);
            ``None``: one collective per FSDP unit (FSDP2). DDP always uses 25 MiB buckets.
        async_gathers: all-gathers run asynchronously, overlapping compute. ``None``: the
            backend's behaviour (NCCL yes, gloo no); ``True`` on gloo models FSDP2's
            asynchronous unshard with forward prefetching (reduce-scatters still block).
    """

    kind: StrategyKind | str
    partition_size: int | None = None
    hierarchical: bool = True
    accumulation: AccumulationMode | str = AccumulationMode.TWO_HOP
    root_reshard_after_forward: bool = False
    bucket_elements: int | None = None
    async_gathers: bool | None = None
    label: str = ""

    def __post_init__(self) -> None:
        _coerce_enum(self, "kind", StrategyKind)
        _coerce_enum(self, "accumulation", AccumulationMode)
        _positive(self, "partition_size", "bucket_elements", integer=True, allow_none=True)
        if self.kind is StrategyKind.MICS and self.partition_size is None:
            raise ValueError("StrategySpec(kind='mics') needs a partition_size")

    @classmethod
    def ddp(cls) -> StrategySpec:
        return cls(
            StrategyKind.DDP, accumulation=AccumulationMode.LAST_MICRO_STEP_ONLY, label="ddp"
        )

    @classmethod
    def zero3(cls, bucket_elements: int | None = None, **kw: Any) -> StrategySpec:
        return cls(
            StrategyKind.FSDP,
            accumulation=AccumulationMode.EVERY_MICRO_STEP,
            bucket_elements=bucket_elements,
            label=kw.pop("label", "fsdp (ZeRO-3)"),
            **kw,
        )

    @classmethod
    def hsdp(cls, ranks_per_node: int | None = None) -> StrategySpec:
        return cls(
            StrategyKind.HSDP,
            partition_size=ranks_per_node,
            hierarchical=False,
            accumulation=AccumulationMode.EVERY_MICRO_STEP,
            label="hsdp",
        )

    @classmethod
    def mics(cls, partition_size: int, hierarchical: bool = True, **kw: Any) -> StrategySpec:
        label = kw.pop("label", f"mics p={partition_size}" + ("" if hierarchical else " flat"))
        return cls(
            StrategyKind.MICS,
            partition_size=partition_size,
            hierarchical=hierarchical,
            label=label,
            **kw,
        )

    def shard_size(self, cluster: ClusterSpec) -> int:
        """Ranks one replica of the model states is sharded over."""
        if self.kind is StrategyKind.DDP:
            return 1
        if self.kind is StrategyKind.FSDP:
            return cluster.world_size
        if self.kind is StrategyKind.HSDP:
            return self.partition_size or cluster.ranks_per_node
        return int(self.partition_size)  # type: ignore[arg-type]

    def uses_hierarchical(self, cluster: ClusterSpec) -> bool:
        """MiCS's ``hierarchical="auto"``: on exactly when the partition spans nodes of
        more than one rank."""
        p, k = self.shard_size(cluster), cluster.ranks_per_node
        return self.kind is StrategyKind.MICS and self.hierarchical and p > k > 1 and p % k == 0

    def name(self) -> str:
        return self.label or self.kind.value


@dataclass(frozen=True)
class Workload:
    """A model trained on a cluster with a training shape: the cost model's whole input
    apart from the strategy."""

    model: ModelSpec
    cluster: ClusterSpec
    training: TrainingSpec
    extras: dict[str, Any] = field(default_factory=dict, compare=False)


def _coerce_enum(spec: Any, name: str, enum: type[Enum]) -> None:
    """Replace ``spec.name`` (a frozen dataclass field) by its ``enum`` member."""
    value = getattr(spec, name)
    try:
        object.__setattr__(spec, name, enum(value))
    except ValueError:
        raise ValueError(
            f"{type(spec).__name__}.{name} must be one of {[m.value for m in enum]}, got {value!r}"
        ) from None
