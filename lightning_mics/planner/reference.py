"""Published MiCS results the planner compares its predictions with.

Zhang et al., "MiCS: Near-linear Scaling for Training Gigantic Model on Public Cloud",
VLDB 2023 (arXiv 2205.00119), and the Amazon Science blog post on it. The paper's 100B
model is proprietary: its exact shape, micro-batch, sequence length and gradient dtype
are not published, so the planner runs the repository's ``gpt_100b`` config (80 layers x
10240) in its place. TFLOPS in the paper most likely follow Megatron-LM's formula, which
counts activation recomputation (our *hardware* TFLOPS).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reference:
    """One published data point.

    ``tflops_per_gpu``: achieved TFLOPS per GPU; ``fraction_of_peak``: as published;
    ``weak_scaling``: ``(from_nodes, to_nodes, mics_efficiency, zero3_efficiency)``.
    """

    label: str
    model: str
    cluster: str
    nodes: int
    tflops_per_gpu: float
    fraction_of_peak: float | None = None
    weak_scaling: tuple[int, int, float, float | None] | None = None
    unpublished: str = "the run's micro-batch, sequence length and gradient dtype"
    source: str = "MiCS (Zhang et al., VLDB 2023; arXiv 2205.00119)"


REFERENCES = (
    Reference(
        label="100B on 64 p4d.24xlarge (512 A100 40 GB)",
        model="gpt_100b",
        cluster="p4d_24xlarge",
        nodes=64,
        tflops_per_gpu=170.0,
        fraction_of_peak=0.545,
        weak_scaling=(16, 64, 0.994, 0.72),
        unpublished="the model's shape (it is proprietary), micro-batch, sequence length "
        "and gradient dtype",
    ),
    Reference(
        label="175B (sequence 2048) on 16 p4de.24xlarge (128 A100 80 GB)",
        model="gpt_175b",
        cluster="p4de_24xlarge",
        nodes=16,
        tflops_per_gpu=169.0,
        unpublished="the run's micro-batch, partition size and gradient dtype",
    ),
)


def find_reference(model: str, cluster: str) -> Reference | None:
    """The published point for this model and cluster config, if any."""
    for ref in REFERENCES:
        if ref.model == model and ref.cluster == cluster:
            return ref
    return None
