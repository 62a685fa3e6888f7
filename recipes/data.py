"""Training data for the recipes: real text from local files, or synthetic tokens.

Only torch and numpy here (the multi-process tests import `SyntheticTokens`); the
LightningDataModules are in `recipes.datamodules`.

Nothing is downloaded. ``TextDataModule`` reads local files (by default the Python standard
library's sources, present on every Python install), tokenizes them once into a
memory-mapped token file in a cache directory keyed on the files and the tokenizer, and
serves fixed-length windows: ``(input_ids, targets)`` for GPT, masked ``(input_ids,
labels)`` for BERT (15% of the tokens: 80% ``[MASK]``, 10% a random token, 10% unchanged).
The end of the token stream is held out for validation.

Tokenizers: ``byte`` (UTF-8 bytes plus 4 special tokens; nothing to train) or ``bpe``
(a byte-level BPE trained here with the ``tokenizers`` library, cached with the tokens).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from recipes.bert import IGNORE_INDEX

#: Bump when the cache layout or tokenization changes: old caches are then rebuilt.
CACHE_VERSION = 1
SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[PAD]", "[CLS]")
BYTE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


@dataclass(frozen=True)
class Vocab:
    """Token ids of a tokenizer: its size, special tokens, and the ordinary tokens' range."""

    size: int
    eos_id: int  # ends every document (GPT) / [SEP] (BERT)
    mask_id: int
    pad_id: int
    cls_id: int
    content_start: int  # ordinary (non-special) tokens are content_start <= id < content_end
    content_end: int


def byte_vocab() -> Vocab:
    """Bytes 0-255, then the special tokens."""
    return Vocab(BYTE_VOCAB_SIZE, 256, 257, 258, 259, 0, 256)


def tail_special_vocab(size: int) -> Vocab:
    """``size`` ids whose last 4 are the special tokens (synthetic data)."""
    if size <= len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocabulary size {size} leaves no room for ordinary tokens")
    n = size - len(SPECIAL_TOKENS)
    return Vocab(size, n, n + 1, n + 2, n + 3, 0, n)


# ----------------------------------------------------------------------------- sources
def default_text_source() -> Path:
    """The directory of the Python standard library's sources (where ``os.py`` lives)."""
    return Path(os.__file__).resolve().parent


def find_text_files(
    source: str | None, pattern: str = "*.py", recursive: bool = False
) -> list[Path]:
    """The files of a text source: a file, a directory (``pattern`` inside it) or a glob.

    Sorted, so every rank and every run sees the same order.
    """
    root = default_text_source() if source is None else Path(os.path.expanduser(source))
    if root.is_file():
        files = [root]
    elif root.is_dir():
        matches = root.rglob(pattern) if recursive else root.glob(pattern)
        files = [p for p in matches if p.is_file()]
    else:
        files = [Path(p) for p in glob.glob(str(root), recursive=recursive) if Path(p).is_file()]
    if not files:
        raise FileNotFoundError(
            f"No text files found at data.source={source!r} (pattern {pattern!r}, "
            f"recursive={recursive}). Point data.source at a file, a directory or a glob."
        )
    return sorted(p.resolve() for p in files)


# --------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes as tokens, plus 4 special tokens: 260 ids, nothing to train."""

    name = "byte"

    def __init__(self) -> None:
        self.vocab = byte_vocab()

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        pass


class BPETokenizer:
    """A byte-level BPE (GPT-2 style) trained locally with the ``tokenizers`` library."""

    name = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        size = tokenizer.get_vocab_size()
        # `tokenizers` gives special tokens the first ids.
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise ValueError(f"unexpected special token ids {ids} in the BPE tokenizer")
        self.vocab = Vocab(size, *ids, content_start=len(SPECIAL_TOKENS), content_end=size)

    @classmethod
    def train(cls, files: Sequence[Path], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train([str(f) for f in files], trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, directory: Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(directory / "tokenizer.json")))

    def encode(self, data: bytes) -> np.ndarray:
        ids = self.tokenizer.encode(data.decode("utf-8", errors="replace")).ids
        return np.asarray(ids, dtype=np.uint32)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def save(self, directory: Path) -> None:
        self.tokenizer.save(str(directory / "tokenizer.json"))


# ------------------------------------------------------------------------- token cache
@dataclass(frozen=True)
class TokenCache:
    """A tokenized text source on disk: ``tokens.bin`` (raw ids), ``meta.json`` and, for
    BPE, ``tokenizer.json``, in a directory named after everything that determines them."""

    directory: Path

    @classmethod
    def locate(
        cls, cache_dir: str | Path, files: Sequence[Path], tokenizer: str, vocab_size: int | None
    ) -> TokenCache:
        h = hashlib.sha256(f"v{CACHE_VERSION} {tokenizer} {vocab_size}".encode())
        for f in files:
            st = f.stat()
            h.update(f"\n{f} {st.st_size} {st.st_mtime_ns}".encode())
        return cls(Path(cache_dir) / f"{tokenizer}-{h.hexdigest()[:16]}")

    @property
    def ready(self) -> bool:
        return (self.directory / "meta.json").is_file()

    def build(self, files: Sequence[Path], tokenizer: str, vocab_size: int | None) -> None:
        """Tokenize ``files`` into this cache (atomically: other processes never see a
        half-written cache, and a concurrent build of the same cache is harmless)."""
        if self.ready:
            return
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.directory.parent))
        try:
            tok = (
                BPETokenizer.train(files, vocab_size or 8192)
                if tokenizer == "bpe"
                else ByteTokenizer()
            )
            dtype = np.uint16 if tok.vocab.size <= 2**16 else np.uint32
            n_tokens = 0
            with open(tmp / "tokens.bin", "wb") as out:
                for f in files:
                    ids = np.append(tok.encode(f.read_bytes()), tok.vocab.eos_id).astype(dtype)
                    out.write(ids.tobytes())
                    n_tokens += ids.size
            tok.save(tmp)
            meta = {
                "version": CACHE_VERSION,
                "tokenizer": tokenizer,
                "dtype": np.dtype(dtype).name,
                "num_tokens": n_tokens,
                "num_files": len(files),
                "vocab": asdict(tok.vocab),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                tmp.rename(self.directory)
            except OSError:  # another process published the same cache first
                if not self.ready:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def meta(self) -> dict[str, Any]:
        return json.loads((self.directory / "meta.json").read_text())

    def vocab(self) -> Vocab:
        return Vocab(**self.meta()["vocab"])

    def tokens(self) -> np.ndarray:
        """The whole token stream, memory-mapped (read-only)."""
        meta = self.meta()
        return np.memmap(
            self.directory / "tokens.bin",
            dtype=meta["dtype"],
            mode="r",
            shape=(meta["num_tokens"],),
        )

    def tokenizer(self) -> ByteTokenizer | BPETokenizer:
        if self.meta()["tokenizer"] == "bpe":
            return BPETokenizer.load(self.directory)
        return ByteTokenizer()


# ----------------------------------------------------------------------------- datasets
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


class NextTokenWindows(Dataset):
    """Non-overlapping windows of a token stream: ``(tokens[s:s+T], tokens[s+1:s+T+1])``."""

    def __init__(self, tokens: np.ndarray | torch.Tensor, seq_len: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.seq_len
        window = torch.as_tensor(
            np.asarray(self.tokens[start : start + self.seq_len + 1], np.int64)
        )
        return window[:-1], window[1:]


def mask_tokens(
    ids: torch.Tensor, vocab: Vocab, probability: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: pick ``probability`` of the ordinary tokens; of those, 80% become
    ``[MASK]``, 10% a random ordinary token, 10% stay. Returns ``(input_ids, labels)`` with
    ``labels`` = the original token at picked positions, ``IGNORE_INDEX`` elsewhere."""
    ordinary = (ids >= vocab.content_start) & (ids < vocab.content_end)
    picked = (torch.rand(ids.shape, generator=generator) < probability) & ordinary
    labels = torch.where(picked, ids, torch.full_like(ids, IGNORE_INDEX))
    draw = torch.rand(ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[picked & (draw < 0.8)] = vocab.mask_id
    replace = picked & (draw >= 0.8) & (draw < 0.9)
    random_ids = torch.randint(
        vocab.content_start, vocab.content_end, ids.shape, generator=generator
    )
    inputs[replace] = random_ids[replace]
    return inputs, labels


class MaskedWindows(Dataset):
    """``[CLS] window [SEP]`` sequences of ``seq_len`` tokens, masked for MLM.

    Training masks afresh each time (dynamic masking, from torch's global RNG); with
    ``fixed_masks`` (validation) each sample's mask is seeded by its index, so every
    evaluation scores the same positions.
    """

    def __init__(
        self,
        tokens: np.ndarray | torch.Tensor,
        seq_len: int,
        vocab: Vocab,
        probability: float = 0.15,
        fixed_masks: bool = False,
        seed: int = 0,
    ) -> None:
        if seq_len < 3:
            raise ValueError(f"BERT sequences need seq_len >= 3, got {seq_len}")
        self.windows = NextTokenWindows(tokens, seq_len - 2)
        self.vocab = vocab
        self.probability = probability
        self.fixed_masks = fixed_masks
        self.seed = seed

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window, _ = self.windows[i]
        ids = torch.cat(
            [torch.tensor([self.vocab.cls_id]), window, torch.tensor([self.vocab.eos_id])]
        )
        generator = torch.Generator().manual_seed(self.seed + i) if self.fixed_masks else None
        return mask_tokens(ids, self.vocab, self.probability, generator)
