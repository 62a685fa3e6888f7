"""Choose a partition size and project a run's throughput (``lightning-mics plan``).

The planner picks the **smallest partition size whose memory fits one GPU** (MiCS's
principle: the smaller the partition, the smaller the communication scale), among the
sizes MiCS accepts (divisors of a node, multiples of a node that divide the world). When
the micro-batch or activation checkpointing is left to it (``None``), it then prefers, at
that partition size, the largest micro-batch up to the requested one (keeping the
sequences per optimizer step by raising the accumulation), then no checkpointing if that
fits too (recomputation costs a third more compute).

It then predicts the step of MiCS and of ZeRO-3 with :func:`predict_step`, the
weak-scaling efficiency over growing clusters, and compares with the published MiCS
results (:mod:`lightning_mics.planner.reference`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from lightning_mics.planner.cost_model import StepPrediction, predict_step
from lightning_mics.planner.memory import (
    MemoryBreakdown,
    gib,
    memory_breakdown,
    valid_partition_sizes,
)
from lightning_mics.planner.reference import Reference
from lightning_mics.planner.specs import (
    GIB,
    ClusterSpec,
    ModelSpec,
    StrategySpec,
    TrainingSpec,
)

#: DeepSpeed ZeRO-3's default prefetch/reduce bucket (elements), for the "DeepSpeed-like"
#: ZeRO-3 projection.
DEEPSPEED_BUCKET_ELEMENTS = 50_000_000


class PlanError(ValueError):
    """Nothing fits, or the inputs cannot be planned; the message says what to change."""


@dataclass(frozen=True)
class PartitionChoice:
    """The planner's choice for MiCS.

    ``partition_size`` is ``None`` when nothing fits; ``memory`` is then the breakdown of
    the largest partition at the smallest micro-batch (what comes closest).
    ``candidates``: ``(partition_size, bytes without checkpointing, bytes with)`` at the
    chosen micro-batch, for every valid size.
    """

    partition_size: int | None
    training: TrainingSpec
    memory: MemoryBreakdown
    hierarchical: bool
    explanation: str
    candidates: tuple[tuple[int, float, float], ...] = field(default=())

    @property
    def fits(self) -> bool:
        return self.partition_size is not None


def _micro_batches(requested: int) -> list[int]:
    """``requested``, then halvings down to 1."""
    out, b = [], requested
    while b >= 1:
        out.append(b)
        b //= 2
    if out[-1] != 1:
        out.append(1)
    return out


def _with_micro_batch(training: TrainingSpec, micro_batch: int) -> TrainingSpec:
    """Same sequences per rank per optimizer step, ``micro_batch`` at a time."""
    sequences = training.micro_batch * training.accumulation
    accumulation = max(1, -(-sequences // micro_batch))
    return replace(training, micro_batch=micro_batch, accumulation=accumulation)


def choose_partition(
    model: ModelSpec,
    cluster: ClusterSpec,
    training: TrainingSpec,
    *,
    micro_batch: int | None = None,
    activation_checkpointing: bool | None = None,
    hierarchical: bool = True,
) -> PartitionChoice:
    """The smallest MiCS partition size whose memory fits (see the module docstring).

    ``micro_batch=None``: at most ``training.micro_batch``, chosen; an int: exactly that.
    ``activation_checkpointing=None``: chosen; a bool: exactly that. Without a known GPU
    memory (``cluster.gpu_memory_gib`` is ``None``) the partition is one node.
    """
    k, world = cluster.ranks_per_node, cluster.world_size
    sizes = valid_partition_sizes(world, k)
    batches = _micro_batches(training.micro_batch) if micro_batch is None else [micro_batch]
    ckpts = [False, True] if activation_checkpointing is None else [activation_checkpointing]

    def strategy(p: int) -> StrategySpec:
        return StrategySpec.mics(p, hierarchical=hierarchical)

    def mem(p: int, t: TrainingSpec, ckpt: bool) -> MemoryBreakdown:
        return memory_breakdown(model, cluster, t, strategy(p), activation_checkpointing=ckpt)

    if cluster.usable_memory_bytes is None:
        p = k if world % k == 0 else sizes[-1]
        t = _with_micro_batch(training, batches[0])
        t = replace(t, activation_checkpointing=ckpts[0])
        return PartitionChoice(
            partition_size=p,
            training=t,
            memory=mem(p, t, ckpts[0]),
            hierarchical=strategy(p).uses_hierarchical(cluster),
            explanation=(
                f"cluster {cluster.name!r} has no gpu_memory_gb, so memory cannot be checked: "
                f"partition = one node ({p} ranks)"
            ),
        )

    for p in sizes:
        for b in batches:
            t = _with_micro_batch(training, b)
            fitting = [ckpt for ckpt in ckpts if mem(p, t, ckpt).fits]
            if not fitting:
                continue
            ckpt = fitting[0]
            t = replace(t, activation_checkpointing=ckpt)
            memory = mem(p, t, ckpt)
            candidates = tuple((q, mem(q, t, False).total, mem(q, t, True).total) for q in sizes)
            smaller = [q for q in sizes if q < p]
            why = [
                f"partition_size={p}: the smallest of {sizes} whose parameters, gradients, "
                f"AdamW states, activations and buffers fit in {gib(memory.capacity or 0)} "
                f"usable per GPU ({gib(memory.total)} needed)"
            ]
            if smaller:
                q = smaller[-1]
                need = min(mem(q, t, c).total for c in ckpts)
                why.append(f"partition_size={q} would need {gib(need)}")
            if b != training.micro_batch:
                why.append(
                    f"micro-batch {b} (requested {training.micro_batch} does not fit at this "
                    f"partition size), accumulation {t.accumulation} keeps "
                    f"{t.micro_batch * t.accumulation} sequences per rank per step"
                )
            if activation_checkpointing is None:
                why.append(
                    "activation checkpointing "
                    + ("on: needed to fit" if ckpt else "off: not needed")
                )
            return PartitionChoice(
                partition_size=p,
                training=t,
                memory=memory,
                hierarchical=strategy(p).uses_hierarchical(cluster),
                explanation="; ".join(why),
                candidates=candidates,
            )
    t = replace(_with_micro_batch(training, batches[-1]), activation_checkpointing=ckpts[-1])
    memory = mem(sizes[-1], t, ckpts[-1])
    return PartitionChoice(
        partition_size=None,
        training=t,
        memory=memory,
        hierarchical=strategy(sizes[-1]).uses_hierarchical(cluster),
        explanation=(
            f"nothing fits: even partition_size={sizes[-1]} (the whole world) at micro-batch "
            f"{t.micro_batch}{' with activation checkpointing' if t.activation_checkpointing else ''}"
            f" needs {gib(memory.total)} per GPU of {gib(memory.capacity or 0)} usable. Use "
            "more nodes, a shorter sequence, a smaller micro-batch, activation checkpointing, "
            "or CPU offload (not modelled)"
        ),
        candidates=tuple((q, mem(q, t, False).total, mem(q, t, True).total) for q in sizes),
    )


# ------------------------------------------------------------------------ projections
@dataclass(frozen=True)
class ScalingRow:
    nodes: int
    mics: StepPrediction | None
    zero3: StepPrediction
    zero3_deepspeed: StepPrediction


@dataclass(frozen=True)
class Plan:
    """Everything ``lightning-mics plan`` prints."""

    model: ModelSpec
    cluster: ClusterSpec
    choice: PartitionChoice
    mics: StepPrediction | None
    mics_flat: StepPrediction | None
    zero3: StepPrediction | None
    zero3_deepspeed: StepPrediction | None
    zero3_memory: MemoryBreakdown | None
    scaling: tuple[ScalingRow, ...]
    reference: Reference | None
    sensitivity: tuple[tuple[str, StepPrediction | None, bool], ...] = ()

    def weak_scaling(self, attr: str) -> list[float | None]:
        """Per-GPU throughput at each cluster size over that at the smallest."""
        rows = [getattr(r, attr) for r in self.scaling]
        base = next((r for r in rows if r is not None), None)
        if base is None:
            return [None for _ in rows]
        per_gpu0 = base.tokens_per_s / base.world_size
        return [None if r is None else (r.tokens_per_s / r.world_size) / per_gpu0 for r in rows]


def default_scaling_nodes(nodes: int, nodes_per_partition: int) -> list[int]:
    """``nodes/4, nodes/2, nodes`` (those that hold a whole partition)."""
    out = sorted({max(1, nodes // 4), max(1, nodes // 2), nodes})
    return [n for n in out if n >= nodes_per_partition and (n == nodes or nodes % n == 0)]


def make_plan(
    model: ModelSpec,
    cluster: ClusterSpec,
    training: TrainingSpec,
    *,
    micro_batch: int | None = None,
    activation_checkpointing: bool | None = None,
    partition_size: int | None = None,
    hierarchical: bool = True,
    scaling_nodes: list[int] | None = None,
    reference: Reference | None = None,
) -> Plan:
    """Choose the partition (unless ``partition_size`` is given) and project MiCS and
    ZeRO-3 on ``cluster`` and on the clusters of ``scaling_nodes`` nodes."""
    if partition_size is not None:
        if partition_size not in valid_partition_sizes(cluster.world_size, cluster.ranks_per_node):
            raise PlanError(
                f"partition_size={partition_size} is not valid on {cluster.world_size} ranks "
                f"of {cluster.ranks_per_node} per node; choose one of "
                f"{valid_partition_sizes(cluster.world_size, cluster.ranks_per_node)}"
            )
        ckpt = (
            training.activation_checkpointing
            if activation_checkpointing is None
            else activation_checkpointing
        )
        t = replace(
            _with_micro_batch(training, micro_batch or training.micro_batch),
            activation_checkpointing=ckpt,
        )
        spec = StrategySpec.mics(partition_size, hierarchical=hierarchical)
        memory = memory_breakdown(model, cluster, t, spec)
        choice = PartitionChoice(
            partition_size=partition_size,
            training=t,
            memory=memory,
            hierarchical=spec.uses_hierarchical(cluster),
            explanation=f"partition_size={partition_size} as requested"
            + ("" if memory.fits else f" (does NOT fit: {gib(memory.total)} needed)"),
        )
    else:
        choice = choose_partition(
            model,
            cluster,
            training,
            micro_batch=micro_batch,
            activation_checkpointing=activation_checkpointing,
            hierarchical=hierarchical,
        )
    t = choice.training
    p = choice.partition_size
    mics = mics_flat = zero3 = zero3_ds = zero3_mem = None
    sensitivity: list[tuple[str, StepPrediction | None, bool]] = []
    z3 = StrategySpec.zero3()
    ds = StrategySpec.zero3(
        DEEPSPEED_BUCKET_ELEMENTS, label="ZeRO-3, DeepSpeed-like 5e7-element buckets"
    )
    if p is not None:
        spec = StrategySpec.mics(p, hierarchical=hierarchical)
        mics = predict_step(model, cluster, t, spec)
        if mics.hierarchical:
            mics_flat = predict_step(model, cluster, t, StrategySpec.mics(p, hierarchical=False))
        zero3 = predict_step(model, cluster, t, z3)
        zero3_ds = predict_step(model, cluster, t, ds)
        zero3_mem = memory_breakdown(model, cluster, t, z3)
        sensitivity = _sensitivity(model, cluster, t, spec)
    nodes_per_partition = max(1, (p or cluster.ranks_per_node) // cluster.ranks_per_node)
    nodes_list = scaling_nodes or default_scaling_nodes(cluster.nodes, nodes_per_partition)
    rows = []
    if p is not None:
        for n in nodes_list:
            c = cluster.with_nodes(n)
            fits_p = c.world_size % p == 0 and p <= c.world_size
            rows.append(
                ScalingRow(
                    nodes=n,
                    mics=predict_step(model, c, t, StrategySpec.mics(p, hierarchical=hierarchical))
                    if fits_p
                    else None,
                    zero3=predict_step(model, c, t, z3),
                    zero3_deepspeed=predict_step(model, c, t, ds),
                )
            )
    return Plan(
        model=model,
        cluster=cluster,
        choice=choice,
        mics=mics,
        mics_flat=mics_flat,
        zero3=zero3,
        zero3_deepspeed=zero3_ds,
        zero3_memory=zero3_mem,
        scaling=tuple(rows),
        reference=reference,
        sensitivity=tuple(sensitivity),
    )


def _sensitivity(
    model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, spec: StrategySpec
) -> list[tuple[str, StepPrediction | None, bool]]:
    """What moves the MiCS prediction: ``(label, prediction, fits in memory)``."""
    out = []
    variants: list[tuple[str, ModelSpec, ClusterSpec, TrainingSpec]] = [
        ("as planned", model, cluster, training),
    ]
    if training.gather_bytes > 2:
        variants.append(
            ("bf16 parameter all-gathers", model, cluster, replace(training, param_dtype="bf16"))
        )
    if training.reduce_bytes > 2:
        variants.append(
            ("bf16 gradient reduction", model, cluster, replace(training, reduce_dtype="bf16"))
        )
    # the largest micro-batch that still fits (x2 steps), and the next one up
    b = training.micro_batch
    while (
        b < 64 and memory_breakdown(model, cluster, replace(training, micro_batch=2 * b), spec).fits
    ):
        b *= 2
    for mb in sorted({b, 2 * b} - {training.micro_batch}):
        label = f"micro-batch {mb}" + (" (largest that fits)" if mb == b else "")
        variants.append((label, model, cluster, replace(training, micro_batch=mb)))
    variants.append(
        (
            "inter-node links at 100% of nominal",
            model,
            replace(cluster, inter_node_efficiency=1.0),
            training,
        )
    )
    variants.append(
        (
            "compute at 70% of peak",
            model,
            replace(cluster, compute_efficiency=0.7),
            training,
        )
    )
    for label, m, c, t in variants:
        fits = memory_breakdown(m, c, t, spec).fits
        out.append((label, predict_step(m, c, t, spec), fits))
    return out


# ------------------------------------------------------------------------- formatting
def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:,.1f} GB"


def _row(pred: StepPrediction) -> str:
    return (
        f"  {pred.strategy:<44} {pred.step_time:9.2f} s {pred.tokens_per_s:12,.0f} "
        f"{pred.model_tflops_per_gpu:8.1f} {pred.hardware_tflops_per_gpu:8.1f} "
        f"{100 * pred.mfu:6.1f}% {100 * pred.exposed_communication_time / pred.step_time:7.1f}%"
    )


def format_plan(plan: Plan) -> str:
    """The text ``lightning-mics plan`` prints."""
    m, c, ch = plan.model, plan.cluster, plan.choice
    t = ch.training
    lines = [
        f"model    {m.describe()}",
        f"cluster  {c.name}: {c.nodes} nodes x {c.ranks_per_node} GPUs = {c.world_size} GPUs, "
        f"{c.gpu_memory_gib if c.gpu_memory_gib is not None else '?'} GiB, "
        f"{c.peak_tflops:g} TFLOPS peak, {c.intra_node_gbps:g} Gbps intra-node per GPU, "
        f"{c.inter_node_gbps:g} Gbps per node",
        f"run      micro-batch {t.micro_batch} x {t.seq_len} tokens x {t.accumulation} "
        f"micro-steps, precision {t.precision}, gathered {t.gather_bytes * 8}-bit, "
        f"gradients reduced in {t.reduce_bytes * 8}-bit, "
        f"activation checkpointing {'on' if t.activation_checkpointing else 'off'}",
        "",
    ]
    if ch.partition_size is None:
        lines += [f"PARTITION  {ch.explanation}", "", "Closest (memory per GPU):"]
        lines.append(ch.memory.describe())
        return "\n".join(lines)
    p = ch.partition_size
    spans = p // c.ranks_per_node if p > c.ranks_per_node else 0
    lines.append(
        f"partition_size = {p}   ({c.world_size // p} replicas; "
        + (
            f"spans {spans} nodes: hierarchical all-gathers/reduce-scatters "
            + ("ON" if ch.hierarchical else "off")
            if spans
            else (
                "no sharding: every GPU holds a replica"
                if p == 1
                else "inside one node: flat intra-node collectives"
            )
        )
        + ")"
    )
    lines.append(f"  why: {ch.explanation}")
    if t.gather_bytes == 4 and t.compute_bytes == 2:
        lines.append(
            "  hint: parameters are gathered in fp32 although the compute is 16-bit: "
            "strategy.param_dtype=bf16 (with trainer.precision=32-true) halves the gathered "
            "buffers and the all-gather bytes"
        )
    lines.append("")
    lines.append(f"Memory per GPU at partition_size={p}:")
    lines.append(ch.memory.describe())
    if ch.candidates:
        lines.append("  by partition size (without / with activation checkpointing):")
        cap = ch.memory.capacity or float("inf")
        for q, without, with_ in ch.candidates:
            mark = "fits" if min(without, with_) <= cap else "too big"
            lines.append(
                f"    {q:>5}: {gib(without):>11} / {gib(with_):>11}  {mark}"
                + ("   <- chosen" if q == p else "")
            )
    lines.append("")
    header = (
        f"  {'strategy':<44} {'step':>11} {'tokens/s':>12} {'model':>8} {'hardware':>8} "
        f"{'MFU':>7} {'exposed':>8}\n"
        f"  {'':<44} {'':>11} {'':>12} {'TFLOPS':>8} {'TFLOPS':>8} {'':>7} {'comm':>8}"
    )
    lines.append(f"Predicted optimizer step ({t.accumulation} micro-steps, per GPU):")
    lines.append(header)
    for pred in (plan.mics, plan.mics_flat, plan.zero3, plan.zero3_deepspeed):
        if pred is not None:
            lines.append(_row(pred))
    if plan.mics is not None and plan.mics_flat is not None:
        faster = plan.mics.step_time <= plan.mics_flat.step_time
        lines.append(
            "  hierarchical vs flat: "
            + (
                f"{100 * (1 - plan.mics.step_time / plan.mics_flat.step_time):.1f}% faster"
                if faster
                else f"{100 * (plan.mics.step_time / plan.mics_flat.step_time - 1):.1f}% slower "
                "(its two stages run one after the other, while a flat ring uses the intra- and "
                "inter-node links at once; strategy.hierarchical=false to compare)"
            )
            + f", {100 * (1 - plan.mics.inter_node_bytes / plan.mics_flat.inter_node_bytes):.1f}% "
            "fewer inter-node bytes"
        )
    if plan.mics is not None:
        lines.append(
            f"  inter-node traffic per node and step: MiCS {_gb(plan.mics.inter_node_bytes_per_node)}, "
            f"ZeRO-3 {_gb(plan.zero3.inter_node_bytes_per_node)}"  # type: ignore[union-attr]
        )
        if plan.zero3_memory is not None and not plan.zero3_memory.fits:
            lines.append(
                f"  (ZeRO-3 would need {gib(plan.zero3_memory.total)} per GPU: does not fit)"
            )
    if plan.scaling:
        lines.append("")
        lines.append(
            "Weak scaling (same micro-batch and accumulation per GPU; efficiency = per-GPU "
            f"throughput vs {plan.scaling[0].nodes} node"
            f"{'s' if plan.scaling[0].nodes > 1 else ''}):"
        )
        lines.append(
            f"  {'nodes':>5} {'GPUs':>5}  {'MiCS TFLOPS':>11} {'eff':>6}  "
            f"{'ZeRO-3 TFLOPS':>13} {'eff':>6}  {'DeepSpeed-like':>14} {'eff':>6}"
        )
        effs = (
            plan.weak_scaling("mics"),
            plan.weak_scaling("zero3"),
            plan.weak_scaling("zero3_deepspeed"),
        )
        for i, row in enumerate(plan.scaling):
            cells = []
            for pred, eff in zip(
                (row.mics, row.zero3, row.zero3_deepspeed), (e[i] for e in effs), strict=True
            ):
                if pred is None:
                    cells.append(f"{'n/a':>11} {'':>6}")
                else:
                    cells.append(f"{pred.hardware_tflops_per_gpu:11.1f} {100 * eff:5.1f}%")
            lines.append(
                f"  {row.nodes:>5} {row.nodes * c.ranks_per_node:>5}  {cells[0]}  "
                f"  {cells[1]}     {cells[2]}"
            )
        lines.append("  (TFLOPS here are hardware TFLOPS, recomputation counted)")
    if plan.reference is not None and plan.mics is not None:
        lines.append("")
        lines += reference_lines(plan)
    return "\n".join(lines)


def reference_lines(plan: Plan) -> list[str]:
    """The comparison with the published point, and why the model differs."""
    ref, pred, c, t = plan.reference, plan.mics, plan.cluster, plan.choice.training
    assert ref is not None and pred is not None
    lines = [f"Published reference: {ref.label}, {ref.source}"]
    hw, mf = pred.hardware_tflops_per_gpu, pred.model_tflops_per_gpu
    at = "" if c.nodes == ref.nodes else f" (this plan is for {c.nodes} nodes)"
    lines.append(
        f"  published {ref.tflops_per_gpu:.0f} TFLOPS per GPU"
        + (f" ({100 * ref.fraction_of_peak:.1f}% of peak)" if ref.fraction_of_peak else "")
        + f"{at}; predicted {hw:.1f} hardware / {mf:.1f} model TFLOPS "
        f"= {100 * hw / ref.tflops_per_gpu:.0f}% / {100 * mf / ref.tflops_per_gpu:.0f}% of it"
    )
    if ref.weak_scaling is not None:
        lo, hi, mics_eff, zero3_eff = ref.weak_scaling
        published = (
            f"  weak scaling {lo * c.ranks_per_node} -> {hi * c.ranks_per_node} GPUs: "
            f"published MiCS {100 * mics_eff:.1f}%"
            + (f", ZeRO-3 {100 * zero3_eff:.0f}%" if zero3_eff else "")
        )
        nodes = [r.nodes for r in plan.scaling]
        if lo in nodes and hi in nodes:
            i, j = nodes.index(lo), nodes.index(hi)

            def eff(attr: str) -> str:
                rows = [getattr(plan.scaling[i], attr), getattr(plan.scaling[j], attr)]
                if None in rows:
                    return "n/a"
                a, b = (r.tokens_per_s / r.world_size for r in rows)
                return f"{100 * b / a:.1f}%"

            lines.append(
                published + f"; predicted MiCS {eff('mics')}, ZeRO-3 (FSDP2) {eff('zero3')}, "
                f"ZeRO-3 (DeepSpeed-like buckets) {eff('zero3_deepspeed')}"
            )
        else:
            need = max(1, (plan.choice.partition_size or 0) // c.ranks_per_node)
            lines.append(
                published
                + (
                    f"; not comparable: partition_size={plan.choice.partition_size} spans "
                    f"{need} nodes, more than the {lo} the comparison starts from"
                    if need > lo
                    else f"; not predicted here (--scaling-nodes {lo},{hi} to include it)"
                )
            )
    # why: the communication each micro-step needs against the compute at the published rate
    micro_flops = pred.hardware_flops_per_gpu / t.accumulation
    compute_at_ref = micro_flops / (ref.tflops_per_gpu * 1e12)
    ag_rs = (
        sum(
            col.inter_node_bytes_per_node
            for col in pred.collectives
            if "all-gather" in col.name or "reduce-scatter" in col.name
        )
        / t.accumulation
    )
    link = c.inter_node_gbps * 1e9 / 8
    lines.append(
        f"  why: per micro-step each node sends {_gb(ag_rs)} of all-gathers and "
        f"reduce-scatters over its {c.inter_node_gbps:g} Gbps link: {ag_rs / link:.1f} s at the "
        f"nominal rate, {ag_rs / c.inter_bytes_per_s:.1f} s at the modelled "
        f"{100 * c.inter_node_efficiency:.0f}%, against {compute_at_ref:.1f} s of compute at "
        f"the published rate ({pred.hardware_flops_per_gpu / t.accumulation / 1e12:,.0f} "
        f"TFLOP per GPU per micro-step of {t.micro_batch} x {t.seq_len} tokens)."
    )
    if ag_rs / link > compute_at_ref:
        lines.append(
            "       With this config the published rate is out of reach even with perfect "
            "overlap at full link speed: the paper's run must have had more tokens per "
            "micro-step and/or 16-bit gradient reduce-scatters (not published: "
            f"{ref.unpublished})."
        )
    lines.append(
        f"       The model charges compute at {100 * c.compute_efficiency:.0f}% of peak "
        f"(an assumption, not a prediction), links at {100 * c.inter_node_efficiency:.0f}% "
        f"(inter) / {100 * c.intra_node_efficiency:.0f}% (intra) of nominal, "
        f"{c.inter_node_latency_us:g} us per inter-node ring step, and ignores congestion, "
        "stragglers and kernel-launch gaps."
    )
    if plan.sensitivity:
        lines.append("  what moves the MiCS prediction (hardware TFLOPS per GPU):")
        for label, p, fits in plan.sensitivity:
            if p is not None:
                lines.append(
                    f"    {label:<40} {p.hardware_tflops_per_gpu:7.1f}"
                    + ("" if fits else "   (does not fit in memory)")
                )
    return lines


__all__ = [
    "DEEPSPEED_BUCKET_ELEMENTS",
    "GIB",
    "PartitionChoice",
    "Plan",
    "PlanError",
    "ScalingRow",
    "choose_partition",
    "default_scaling_nodes",
    "format_plan",
    "make_plan",
]
