"""A BERT masked-language model, readable top to bottom (in the style of recipes/gpt.py).

Post-LayerNorm encoder blocks as in Devlin et al. (2019), learned position and token-type
embeddings, and the MLM head (dense + GELU + LayerNorm + a decoder tied to the word
embedding). No pooler / next-sentence head: pre-training uses the MLM loss only (as
RoBERTa does).

Blocks live in ``encoder`` (an ``nn.ModuleList``), which is what MiCS's default wrap policy
shards one FSDP unit at a time. The model has no buffers: position and token-type ids are
made in ``forward``, so a model created on the meta device is completely initialised by
``reset_parameters()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: Label of the positions that do not count in the MLM loss (PyTorch's default ignore_index).
IGNORE_INDEX = -100


@dataclass
class BERTConfig:
    vocab_size: int = 30522
    block_size: int = 512  # maximum sequence length (learned position embeddings)
    type_vocab_size: int = 2
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.1
    # Share the word embedding with the MLM decoder (BERT does).
    tie_weights: bool = True
    layer_norm_eps: float = 1e-12


class Embeddings(nn.Module):
    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.n_embd)
        self.position = nn.Embedding(config.block_size, config.n_embd)
        self.token_type = nn.Embedding(config.type_vocab_size, config.n_embd)
        self.ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, idx: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(idx)
        x = self.word(idx) + self.position(pos) + self.token_type(token_type_ids)
        return self.dropout(self.ln(x))


class SelfAttention(nn.Module):
    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # attention_mask: (B, T), True/1 where a token may be attended to (not padding).
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    """One encoder layer: attention and feed-forward, each followed by add & LayerNorm."""

    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(config)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.ln_1(x + self.dropout(self.attn(x, attention_mask)))
        return self.ln_2(x + self.dropout(self.proj(F.gelu(self.fc(x)))))


class MLMHead(nn.Module):
    """Transform each hidden state, then score every vocabulary entry."""

    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(x)))) + self.bias


class BERT(nn.Module):
    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.mlm_head = MLMHead(config)
        if config.tie_weights:
            # NOTE: both uses of the shared weight live outside the blocks, so under MiCS/FSDP
            # they belong to the same (root) unit and the weight is sharded once.
            self.mlm_head.decoder.weight = self.embeddings.word.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT init (normal, std 0.02); also used to materialise a meta-device model.

        Covers every parameter (the model has no buffers).
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.mlm_head.bias)

    def forward(
        self,
        idx: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MLM logits of shape ``(B, T, vocab_size)``."""
        _, T = idx.shape
        if self.config.block_size < T:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        x = self.embeddings(idx, token_type_ids)
        for block in self.encoder:
            x = block(x, attention_mask)
        return self.mlm_head(x)

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the masked positions (labels elsewhere are ``IGNORE_INDEX``)."""
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
