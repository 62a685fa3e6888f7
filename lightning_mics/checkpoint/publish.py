"""Publishing a checkpoint atomically, and replacing or removing one crash-safely.

Everything is written under a temporary name ``.mics-tmp-<id>`` next to the target, and
rank 0 renames it to the final name only after every rank has finished (a rename is
atomic). Replacing a checkpoint of the same name (``last.ckpt``): a file replaces a file
with one atomic ``os.replace``. A directory cannot be replaced atomically on every
filesystem, so the old checkpoint is first renamed aside to ``<stem>.mics-old<suffix>``
(``last.mics-old.ckpt``), the new one is renamed in, and only then is the old one
removed. A crash between the two renames leaves the name missing and the old complete
checkpoint aside, where readers find it (:mod:`~lightning_mics.checkpoint.discovery`).
Loading never changes a directory (it runs on many ranks at once); the next save into
the directory (rank 0, before it publishes) finishes what an interrupted save left: it
restores a set-aside checkpoint whose name is missing, removes one whose name exists,
and removes every ``.mics-tmp-*`` entry. One run writes into a directory at a time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from lightning_mics.checkpoint.discovery import aside_path, aside_target
from lightning_mics.checkpoint.distributed import broadcast_object, info, log, rank
from lightning_mics.checkpoint.format import ASIDE_TAG, TMP_PREFIX


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def discard(path: Path) -> None:
    """Remove a checkpoint: first rename it to a temporary name (atomic), so that an
    interrupted removal never leaves a half-deleted checkpoint under a readable name."""
    if not os.path.lexists(path):
        return
    hidden = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        return
    remove(hidden)


def _step(name: str) -> None:
    """Call the test hook ``lightning_mics.checkpoint._on_publish_step`` (crash tests
    kill the process at each step of publishing)."""
    from lightning_mics import checkpoint  # NOTE: the hook is set on the package

    if checkpoint._on_publish_step is not None:
        checkpoint._on_publish_step(name)


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def recover_directory(
    directory: str | os.PathLike, *, keep: str | os.PathLike | None = None
) -> None:
    """Finish what interrupted saves left in ``directory`` (rank 0 of the one run that
    writes there): restore a set-aside checkpoint whose name is missing, remove one whose
    name exists (it was replaced), and remove every temporary entry (``.mics-tmp-*``) but
    ``keep``. Called by every save before it publishes."""
    directory = Path(directory)
    keep = Path(keep).name if keep is not None else None
    for entry in sorted(directory.iterdir()):
        if entry.name == keep:
            continue
        try:
            if entry.name.startswith(TMP_PREFIX):
                remove(entry)
                continue
            target = aside_target(entry) if ASIDE_TAG in entry.name else None
            if target is None:
                continue
            if os.path.lexists(target):
                discard(entry)
            else:
                os.rename(entry, target)
                info(f"Restored checkpoint {target} (a save replacing it was interrupted).")
        except OSError as exc:  # a leftover that cannot go must not fail the save
            log.warning(f"Could not clean up {entry} (left by an interrupted save): {exc}")
    fsync_dir(directory)


def publish(tmp: Path, target: Path) -> None:
    """Rename the complete checkpoint ``tmp`` to ``target`` (rank 0 only), so that a
    crash at any point leaves the old or the new checkpoint readable under ``target``
    or, between the two renames of a replaced directory, under ``aside_path(target)``."""
    parent = target.parent
    _step("written")
    recover_directory(parent, keep=tmp)
    if not os.path.lexists(target):
        os.rename(tmp, target)
    elif not _is_real_dir(tmp) and not _is_real_dir(target):
        os.replace(tmp, target)  # atomic: readers see the old file or the new one
    else:
        aside = aside_path(target)
        os.rename(target, aside)
        fsync_dir(parent)
        _step("set-aside")
        os.rename(tmp, target)
        fsync_dir(parent)
        _step("renamed-in")
        discard(aside)
    fsync_dir(parent)


def new_tmp(target: Path) -> Path:
    name = broadcast_object(f"{TMP_PREFIX}{uuid.uuid4().hex}" if rank() == 0 else None)
    return target.parent / name


def write_torch(obj: Any, file: Path) -> None:
    with open(file, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_text(text: str, file: Path) -> None:
    with open(file, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Remove a checkpoint file or directory (call on rank 0). It is renamed away first,
    so an interrupted removal never leaves a partial checkpoint under its name."""
    discard(Path(path))
