"""Synthetic, learnable token data: no downloads, identical on every rank."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class SyntheticTokens(Dataset):
    """Sequences from a fixed random bigram table, so a model can learn them.

    Each item is ``(input_ids, targets)`` with targets shifted by one. The data depend
    only on ``seed``, never on the rank, so every rank and the single-process reference
    see the same dataset.
    """

    def __init__(
        self, num_samples: int, seq_len: int, vocab_size: int, seed: int = 0, branching: int = 4
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        successors = torch.randint(vocab_size, (vocab_size, branching), generator=g)
        tokens = torch.empty(num_samples, seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(vocab_size, (num_samples,), generator=g)
        choice = torch.randint(branching, (num_samples, seq_len), generator=g)
        for t in range(seq_len):
            tokens[:, t + 1] = successors[tokens[:, t], choice[:, t]]
        self.tokens = tokens

    def __len__(self) -> int:
        return self.tokens.size(0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.tokens[i]
        return row[:-1], row[1:]
