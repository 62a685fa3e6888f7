"""The recipes' LightningDataModules: local text (``TextDataModule``) and synthetic tokens
(``SyntheticDataModule``), as next-token windows (GPT) or masked sequences (BERT).
See `recipes.data` for the tokenizers, the token cache and the datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from recipes.data import (
    MaskedWindows,
    NextTokenWindows,
    SyntheticTokens,
    TokenCache,
    Vocab,
    find_text_files,
    tail_special_vocab,
)


class _LanguageDataModule(LightningDataModule):
    """What the GPT/BERT data modules share: datasets for an objective, and the loaders."""

    def __init__(
        self,
        objective: str,
        seq_len: int,
        micro_batch_size: int,
        mlm_probability: float = 0.15,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if objective not in ("next_token", "mlm"):
            raise ValueError(f"objective must be 'next_token' or 'mlm', got {objective!r}")
        self.objective = objective
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.mlm_probability = mlm_probability
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _dataset(self, tokens: np.ndarray | torch.Tensor, vocab: Vocab, val: bool) -> Dataset:
        if self.objective == "next_token":
            return NextTokenWindows(tokens, self.seq_len)
        return MaskedWindows(
            tokens, self.seq_len, vocab, self.mlm_probability, fixed_masks=val, seed=self.seed
        )

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() first")
        return DataLoader(
            dataset,
            batch_size=self.micro_batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


class TextDataModule(_LanguageDataModule):
    """Local text files, tokenized once into a cached, memory-mapped token file.

    ``prepare_data`` (Lightning runs it on local rank 0 of each node, then a barrier)
    builds the cache; ``setup`` (every rank) maps it. With Fabric, call ``prepare_data``
    inside ``fabric.rank_zero_first(local=True)``.
    """

    def __init__(
        self,
        objective: str,
        seq_len: int,
        micro_batch_size: int,
        cache_dir: str | Path,
        source: str | None = None,
        pattern: str = "*.py",
        recursive: bool = False,
        tokenizer: str = "byte",
        vocab_size: int | None = None,
        val_fraction: float = 0.02,
        mlm_probability: float = 0.15,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(objective, seq_len, micro_batch_size, mlm_probability, num_workers, seed)
        if tokenizer not in ("byte", "bpe"):
            raise ValueError(f"tokenizer must be 'byte' or 'bpe', got {tokenizer!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.files = find_text_files(source, pattern, recursive)
        self.tokenizer_name = tokenizer
        self.vocab_size = vocab_size
        self.val_fraction = val_fraction
        self.cache = TokenCache.locate(cache_dir, self.files, tokenizer, vocab_size)
        self.vocab: Vocab | None = None

    def prepare_data(self) -> None:
        self.cache.build(self.files, self.tokenizer_name, self.vocab_size)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.cache.ready:
            raise RuntimeError(
                f"The token cache {self.cache.directory} is missing: prepare_data() builds it "
                "(Lightning calls it on local rank 0 of each node before setup)."
            )
        tokens = self.cache.tokens()
        self.vocab = self.cache.vocab()
        split = len(tokens) - max(int(len(tokens) * self.val_fraction), self.seq_len + 1)
        self.train_set = self._dataset(tokens[:split], self.vocab, val=False)
        self.val_set = self._dataset(tokens[split:], self.vocab, val=True)
        if len(self.train_set) == 0 or len(self.val_set) == 0:
            raise ValueError(
                f"{len(tokens)} tokens in {self.cache.directory} are too few for windows of "
                f"{self.seq_len}: add text (data.source) or lower data.seq_len."
            )


class SyntheticDataModule(_LanguageDataModule):
    """Learnable synthetic tokens (see `SyntheticTokens`); the vocabulary's last 4 ids are
    the special tokens."""

    def __init__(
        self,
        objective: str,
        seq_len: int,
        micro_batch_size: int,
        vocab_size: int,
        num_samples: int = 4096,
        branching: int = 4,
        mlm_probability: float = 0.15,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(objective, seq_len, micro_batch_size, mlm_probability, num_workers, seed)
        self.vocab = tail_special_vocab(vocab_size)
        self.num_samples = num_samples
        self.branching = branching

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return

        def stream(num_samples: int, seed: int) -> torch.Tensor:
            data = SyntheticTokens(
                num_samples, self.seq_len, self.vocab.content_end, seed, self.branching
            )
            return data.tokens[:, :-1].reshape(-1)  # concatenated samples of seq_len tokens

        # NOTE: samples laid end to end; a window's last target (GPT) is the next sample's
        # first token, which the bigram table does not predict: a little noise.
        self.train_set = self._dataset(stream(self.num_samples, self.seed), self.vocab, val=False)
        val_samples = max(self.num_samples // 8, 2)
        self.val_set = self._dataset(stream(val_samples, self.seed + 1), self.vocab, val=True)
