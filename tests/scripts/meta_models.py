"""Tiny models written the way Hugging Face / Llama / BERT / torchtitan models are, for
the meta-device initialisation tests.

- ``Conv1D`` (GPT-2): parameters created in ``__init__``, no ``reset_parameters()``;
- ``RMSNorm`` (Llama): ``torch.ones`` weight, no ``reset_parameters()``;
- ``Rotary`` (Llama): a non-persistent ``inv_freq`` buffer computed in ``__init__``;
- ``Embeddings`` (BERT): a non-persistent ``position_ids`` buffer computed in
  ``__init__`` (garbage indices there give an IndexError or garbage);
- ``nn.Linear`` / ``nn.Embedding``: torch modules with ``reset_parameters()``.

Initialisation is deterministic (no RNG: DTensor random init on a CPU mesh is not
shard-aware), position-dependent values via :func:`det_`, which writes a DTensor's
shards without communication.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

VOCAB, DIM, MAX_POS, LAYERS, SEQ = 32, 8, 16, 2, 8
BASE = 10000.0


def det_(tensor: torch.Tensor) -> None:
    """Fill ``tensor`` (plain or a sharded DTensor) with position-dependent values."""
    n = tensor.numel()
    salt = 0.1 * len(tensor.shape) + 0.01 * tensor.shape[-1]
    full = ((torch.arange(n, dtype=torch.float32) * 0.37 + salt) % 1.0 - 0.5) * 0.4
    full = full.reshape(tensor.shape).to(tensor.dtype)
    if isinstance(tensor, DTensor):
        # NOTE: src_data_rank=None: every rank cuts its own shard, no communication.
        full = distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None)
    tensor.copy_(full)


def inv_freq(dim: int = DIM) -> torch.Tensor:
    return 1.0 / (BASE ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


class Conv1D(nn.Module):
    """GPT-2's linear layer with a transposed weight; no reset_parameters()."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.nf)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class Rotary(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq(dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.arange(x.shape[1], dtype=torch.float32, device=x.device)
        freqs = torch.outer(t, self.inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)


class Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word = nn.Embedding(VOCAB, DIM)
        self.position = nn.Embedding(MAX_POS, DIM)
        self.register_buffer(
            "position_ids", torch.arange(MAX_POS).expand((1, -1)), persistent=False
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.word(idx) + self.position(self.position_ids[:, : idx.shape[1]])


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = RMSNorm(DIM)
        self.attn_in = Conv1D(DIM, DIM)
        self.rotary = Rotary(DIM)
        self.mlp = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(torch.tanh(self.rotary(self.attn_in(self.norm(x)))))


class TinyModel(nn.Module):
    """No initialiser of its own: meta init must fail on the tensors listed in MISSING."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = Embeddings()
        self.h = nn.ModuleList([Block() for _ in range(LAYERS)])
        self.norm = RMSNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(idx)
        for block in self.h:
            x = block(x)
        return self.head(self.norm(x))

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


#: What no initialiser of TinyModel covers: kind and fully qualified name.
MISSING = {
    *(
        name
        for i in range(LAYERS)
        for name in (
            f"h.{i}.norm.weight",
            f"h.{i}.attn_in.weight",
            f"h.{i}.attn_in.bias",
            f"h.{i}.rotary.inv_freq",
        )
    ),
    "norm.weight",
    "embeddings.position_ids",
}


@torch.no_grad()
def init_params(module: nn.Module) -> None:
    """The deterministic init of one module's own parameters (HF ``_init_weights`` style)."""
    if isinstance(module, nn.Linear | Conv1D):
        det_(module.weight)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        det_(module.weight)
    elif isinstance(module, RMSNorm):
        module.weight.fill_(1.0)


@torch.no_grad()
def init_module(module: nn.Module) -> None:
    """:func:`init_params`, plus the buffers computed in ``__init__``, recomputed in place."""
    init_params(module)
    if isinstance(module, Rotary):
        module.inv_freq.copy_(inv_freq(module.inv_freq.numel() * 2))
    elif isinstance(module, Embeddings):
        module.position_ids.copy_(torch.arange(MAX_POS).expand((1, -1)))


class HFStyleModel(TinyModel):
    """Hugging Face style: ``_init_weights(module)``, applied by ``init_weights()``."""

    def _init_weights(self, module: nn.Module) -> None:
        init_module(module)

    def init_weights(self) -> None:  # never called by MiCS (it uses _init_weights)
        raise AssertionError("MiCS must call _init_weights(module), not init_weights()")


class TitanStyleModel(TinyModel):
    """torchtitan style: one ``init_weights()`` on the root initialises everything."""

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        for module in self.modules():
            init_module(module)


def reference(model_cls: type[nn.Module] = TinyModel) -> nn.Module:
    """A normal (non-meta) construction: buffers hold what ``__init__`` computed, and the
    parameters get the same deterministic init."""
    model = model_cls()
    model.apply(init_params)
    return model


def batch(batch_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    idx = (torch.arange(batch_size * (SEQ + 1)) * 7 % VOCAB).view(batch_size, SEQ + 1)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
