"""Writing and reading the two formats of state dicts and plain data.

- **sharded**: a directory written with ``torch.distributed.checkpoint`` (DCP). Every
  rank writes only its own shards, and a shard replicated across partition groups is
  written once (DCP's planner deduplicates chunks with the same offsets). It holds
  ``.metadata`` (DCP's index), ``__<rank>_0.distcp`` (tensor data), ``meta.pt`` (the
  plain data: loop progress, scheduler states, RNG states, ...) and, written last, the
  completion marker ``mics-checkpoint.json`` with the size of every file. Tensors are
  addressed by name and global offsets, so a checkpoint saved under one topology loads
  under any other (partition size, replication size, world size, or one process).
- **full**: one ``torch.save`` file of unsharded state dicts and plain data, written by
  rank 0. Its entry ``"lightning_mics"`` (removed again on loading) marks it as complete
  and ours.

Both are published atomically (:mod:`~lightning_mics.checkpoint.publish`).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from lightning_mics.checkpoint.discovery import read_marker, verify_sharded
from lightning_mics.checkpoint.distributed import agree, barrier, is_dist, rank, world_size
from lightning_mics.checkpoint.format import (
    FULL_MARKER_KEY,
    MARKER_FILE,
    META_FILE,
    CheckpointError,
    new_marker,
)
from lightning_mics.checkpoint.publish import new_tmp, publish, remove, write_text, write_torch
from lightning_mics.checkpoint.safe_loading import (
    load_planner,
    read_metadata,
    reader,
    torch_load,
)


def _dcp_errors() -> tuple[type[BaseException], ...]:
    # NOTE: DCP reports failures of any rank as CheckpointException, a BaseException.
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


_DCP_ERRORS = _dcp_errors()


# ------------------------------------------------------------------------------ save
def save_sharded(
    path: str | os.PathLike,
    tensors: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    *,
    model_key: str = "model",
    info: dict[str, Any] | None = None,
) -> Path:
    """Collective: write a sharded checkpoint and publish it atomically.

    ``tensors`` is a (nested) state dict of DTensors / tensors / plain values: model and
    optimizer state dicts, under keys of the caller's choosing (``model_key`` names the
    model's, for consolidation). ``metadata`` (plain data) goes into ``meta.pt``.
    """
    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    target = Path(path).absolute()
    tmp = new_tmp(target)
    if rank() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    barrier()
    try:
        dcp_save(
            tensors,
            storage_writer=FileSystemWriter(tmp, sync_files=True),
            planner=DefaultSavePlanner(),
        )
    except _DCP_ERRORS as exc:
        raise CheckpointError(
            f"Writing checkpoint {target} failed on this or another rank (did a rank die?). "
            f"Nothing was published under that name; earlier checkpoints are intact and "
            f"the partial files are in {tmp}. Cause: {exc}"
        ) from exc
    error = None
    if rank() == 0:
        try:
            write_torch(metadata or {}, tmp / META_FILE)
            files = {
                str(f.relative_to(tmp)): f.stat().st_size
                for f in sorted(tmp.rglob("*"))
                if f.is_file()
            }
            marker = new_marker(
                "sharded",
                model_key=model_key,
                world_size=world_size(),
                **(info or {}),
                files=files,
                bytes=sum(files.values()),
            )
            write_text(json.dumps(marker, indent=1), tmp / MARKER_FILE)
            publish(tmp, target)
        except Exception as exc:
            error = exc
    agree(error)
    return target


def save_full(
    path: str | os.PathLike,
    checkpoint: dict[str, Any],
    *,
    model_key: str | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Collective: rank 0 writes ``checkpoint`` (unsharded state dicts and plain data)
    as one file, atomically, with the entry ``"lightning_mics"`` that marks it as a
    complete lightning-mics checkpoint (:func:`load_full` removes it again).
    ``model_key`` names the model's entry (default: ``"model"`` or ``"state_dict"``)."""
    target = Path(path).absolute()
    tmp = new_tmp(target)
    error = None
    if rank() == 0:
        try:
            if model_key is None:
                model_key = next((k for k in ("model", "state_dict") if k in checkpoint), None)
            marker = new_marker(
                "full", model_key=model_key, world_size=world_size(), **(info or {})
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            write_torch({**checkpoint, FULL_MARKER_KEY: marker}, tmp)
            publish(tmp, target)
        except Exception as exc:
            remove(tmp)
            error = exc
    agree(error)
    return target


# ------------------------------------------------------------------------------ load
def load_sharded(
    path: str | os.PathLike, tensors: dict[str, Any], *, strict: bool = True
) -> dict[str, Any]:
    """Collective: fill ``tensors`` (a state dict of templates: DTensor shards of the
    current topology, or plain tensors in one process) in place from the sharded
    checkpoint ``path``, resharding as needed; return its ``meta.pt`` content."""
    path = Path(path)
    _dcp_load(path, tensors, allow_partial_load=not strict, no_dist=not is_dist())
    return load_meta(path)


def load_sharded_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill flat ``{dotted.name: tensor}`` from a sharded checkpoint, in this process
    only (no collectives, whatever the process group)."""
    _dcp_load(path, tensors, allow_partial_load=True, no_dist=True)


def _dcp_load(
    path: Path, tensors: dict[str, Any], *, allow_partial_load: bool, no_dist: bool
) -> None:
    """DCP load of a verified checkpoint, its failures turned into `CheckpointError`."""
    from torch.distributed.checkpoint import load as dcp_load

    verify_sharded(path)
    try:
        with _quiet_single_process():
            dcp_load(
                tensors,
                storage_reader=reader(path),
                planner=load_planner(allow_partial_load=allow_partial_load),
                no_dist=no_dist,
            )
    except CheckpointError:
        raise
    except _DCP_ERRORS as exc:
        raise CheckpointError(f"Could not load the sharded checkpoint {path}: {exc}") from exc


@contextlib.contextmanager
def _quiet_single_process():
    # NOTE: DCP warns on every load without a process group, which is intended here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The plain data (``meta.pt``) of the sharded checkpoint ``path``."""
    meta = torch_load(Path(path) / META_FILE)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{Path(path) / META_FILE} does not hold a dict.")
    return meta


def load_full(path: str | os.PathLike) -> dict[str, Any]:
    """A full checkpoint file (``weights_only=True``, memory-mapped), without the
    ``"lightning_mics"`` marker entry."""
    return load_full_and_marker(path)[0]


def load_full_and_marker(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """A full checkpoint file and its marker (``{}`` for a file not written by us)."""
    path = Path(path)
    checkpoint = torch_load(path, mmap=zipfile.is_zipfile(path))
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"Checkpoint file {path} does not hold a dict.")
    marker = checkpoint.pop(FULL_MARKER_KEY, None)
    return checkpoint, marker if isinstance(marker, dict) else {}


def checkpoint_keys(path: str | os.PathLike) -> set[str]:
    """Top-level keys of the tensors of a sharded checkpoint (e.g. ``state_dict``,
    ``optimizer_0``)."""
    metadata = read_metadata(Path(path))
    return {key.split(".", 1)[0] for key in metadata.state_dict_metadata}


def written_bytes(path: str | os.PathLike) -> dict[str, int]:
    """Bytes per file of a sharded checkpoint, from its marker."""
    return dict(read_marker(path)["files"])
