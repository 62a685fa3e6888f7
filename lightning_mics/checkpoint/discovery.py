"""Finding checkpoints and telling what they are, without unpickling anything.

A sharded checkpoint is complete when its completion marker exists; a full checkpoint
file is ours when it holds the ``"lightning_mics"`` marker entry; Lightning checkpoint
files are recognised by their keys. A checkpoint set aside while a new one replaced it
(``last.mics-old.ckpt``) is found when its name is missing.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_mics.checkpoint.distributed import info
from lightning_mics.checkpoint.format import (
    ASIDE_TAG,
    FORMAT_NAME,
    FORMAT_VERSION,
    FULL_MARKER_KEY,
    LIGHTNING_KEYS,
    MARKER_FILE,
    CheckpointError,
    StateDictType,
)
from lightning_mics.checkpoint.safe_loading import read_metadata, scan_torch_file, torch_load


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    """The completion marker of the sharded checkpoint ``path`` (raises if incomplete)."""
    path = Path(path)
    file = path / MARKER_FILE
    try:
        marker = json.loads(file.read_text())
    except FileNotFoundError:
        if not path.exists():
            raise CheckpointError(f"Checkpoint {path} does not exist.") from None
        raise CheckpointError(
            f"{path} is not a complete lightning-mics checkpoint: its completion marker "
            f"{file} is missing (the save was probably interrupted)."
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Completion marker {file} is damaged: {exc}") from exc
    if not isinstance(marker, dict) or marker.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{file} is not a lightning-mics completion marker.")
    if marker.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer lightning-mics (format {marker['version']})."
        )
    return marker


def verify_sharded(path: str | os.PathLike) -> dict[str, Any]:
    """Check that every file listed in the marker exists with its recorded size."""
    path = Path(path)
    marker = read_marker(path)
    read_metadata(path)  # a clear error for a damaged or unsafe index, before DCP
    for name, size in marker.get("files", {}).items():
        file = path / name
        try:
            actual = file.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"Checkpoint file {file} is missing.") from None
        if actual != size:
            raise CheckpointError(
                f"Checkpoint file {file} is truncated or damaged: {actual} bytes, {size} expected."
            )
    return marker


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """``path`` is a complete sharded checkpoint (its marker exists)."""
    return (Path(path) / MARKER_FILE).is_file()


def full_checkpoint_marker(root: Mapping[str, Any]) -> dict[str, Any] | None:
    marker = root.get(FULL_MARKER_KEY)
    if isinstance(marker, dict) and marker.get("format") == FORMAT_NAME:
        return marker
    return None


def checkpoint_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is: ``"sharded"`` (a complete sharded checkpoint), ``"full"`` (a
    full checkpoint written by lightning-mics), ``"lightning"`` (a Lightning checkpoint
    file: ``state_dict`` and ``pytorch-lightning_version``/``global_step``/``epoch``),
    or ``None`` (anything else, e.g. an exported model file). Unpickles nothing."""
    found = _inspect(Path(path))
    return found[0] if found is not None else None


def _inspect(path: Path) -> tuple[str, float] | None:
    """``(kind, time written)`` of checkpoint ``path`` (see :func:`checkpoint_kind`):
    the time recorded in ours, the modification time of a Lightning file."""
    try:
        if path.is_dir():
            if not is_sharded_checkpoint(path):
                return None
            return "sharded", float(read_marker(path).get("created", path.stat().st_mtime))
        if not path.is_file() or not zipfile.is_zipfile(path):
            return None
        root = scan_torch_file(path)
        if root is None:
            return None
        marker = full_checkpoint_marker(root)
        if marker is not None:
            return "full", float(marker.get("created", path.stat().st_mtime))
        if "state_dict" in root and any(key in root for key in LIGHTNING_KEYS):
            return "lightning", path.stat().st_mtime
    except (CheckpointError, OSError, TypeError, ValueError):
        pass
    return None


def find_latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directly inside ``directory``, or ``None``.

    Counted: sharded checkpoints with their completion marker and full checkpoints
    written by lightning-mics (ordered by the time recorded in them), and Lightning
    checkpoint files (by modification time). Other files (an exported model, a plain
    state dict) and checkpoints still being written (``.mics-tmp-*``) never count; a
    checkpoint set aside by an interrupted replacement (``*.mics-old*``) counts (it is
    older than its replacement, if that exists).
    """
    directory = Path(directory)
    candidates: list[tuple[float, str, Path]] = []
    if not directory.is_dir():
        return None
    for entry in directory.iterdir():
        if entry.name.startswith("."):
            continue
        found = _inspect(entry)
        if found is not None:
            candidates.append((found[1], entry.name, entry))
    return max(candidates)[2] if candidates else None


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, StateDictType]:
    """Where and in which format the checkpoint ``path`` is.

    ``path`` is a sharded checkpoint directory, a full checkpoint file, or a directory of
    checkpoints (its newest complete one is taken). If ``path`` is missing because a
    save replacing it was interrupted, its previous version (set aside) is taken.
    """
    path = Path(path)
    if path.is_file():
        return path, "full"
    if not path.exists():
        aside = aside_path(path)
        if checkpoint_kind(aside) is not None:
            info(
                f"Checkpoint {path} is missing because a save replacing it was interrupted; "
                f"loading its previous version {aside}."
            )
            return resolve_checkpoint(aside)
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    if (path / MARKER_FILE).exists():
        return path, "sharded"
    if (path / ".metadata").exists():
        read_marker(path)  # raises: written without a completion marker
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint nor a directory holding a complete one "
            "(lightning-mics checkpoints and Lightning checkpoint files count; exported "
            "model files do not)."
        )
    info(f"Loading the newest complete checkpoint in {path}: {latest.name}")
    return resolve_checkpoint(latest)


def aside_path(target: str | os.PathLike) -> Path:
    """Where the checkpoint ``target`` waits while a new one replaces it:
    ``last.ckpt`` -> ``last.mics-old.ckpt`` (Lightning's ``ckpt_path="last"`` finds it)."""
    target = Path(target)
    suffix = target.suffix
    stem = target.name[: len(target.name) - len(suffix)]
    return target.with_name(f"{stem}{ASIDE_TAG}{suffix}")


def aside_target(aside: Path) -> Path | None:
    """The name that ``aside`` was set aside from, or ``None`` if it is no aside."""
    head, tag, tail = aside.name.rpartition(ASIDE_TAG)
    if not tag or not head:
        return None
    target = aside.with_name(head + tail)
    return target if aside_path(target) == aside else None


def model_key_of(root: Mapping[str, Any], marker: Mapping[str, Any]) -> str:
    """The entry of a full checkpoint (top level ``root``) that holds the model: the one
    its marker records, else ``"model"`` or Lightning's ``"state_dict"``."""
    return marker.get("model_key") or ("model" if "model" in root else "state_dict")


def stored_model_key(path: Path, kind: StateDictType) -> str:
    """The entry that holds the model in the checkpoint ``path`` (a resolved one)."""
    if kind == "sharded":
        return read_marker(path).get("model_key") or "model"
    root = scan_torch_file(path)
    if root is None:  # not a zip file (legacy serialisation): read it whole
        root = torch_load(path)
    return model_key_of(root, full_checkpoint_marker(root) or {})
