"""Checkpoints of MiCS models: sharded (distributed checkpoint) and full, published
atomically, loadable under any other topology, and consolidated into one file.

Two formats:

- **sharded** (default): a directory written with ``torch.distributed.checkpoint`` (DCP).
  Every rank writes only its own shards, and a shard replicated across partition groups
  is written once (DCP's planner deduplicates chunks with the same offsets). The
  directory holds ``.metadata`` (DCP's index), ``__<rank>_0.distcp`` (tensor data),
  ``meta.pt`` (everything that is not a tensor: loop progress, scheduler states, RNG
  states, ...) and, written last, the completion marker ``mics-checkpoint.json`` with
  the size of every file. Because tensors are addressed by name and global offsets, a
  checkpoint saved under one topology loads under any other (partition size,
  replication size, world size, or one process).
- **full**: one ``torch.save`` file with unsharded state dicts, written by rank 0. Its
  entry ``"lightning_mics"`` (removed again on loading) marks it as complete and ours.

Crash safety: everything is written under a temporary name ``.mics-tmp-<id>`` next to
the target, and rank 0 renames it to the final name only after every rank has finished
(a rename is atomic). A checkpoint that exists under its final name is complete;
:func:`find_latest_checkpoint` picks the newest complete one of a directory.

Replacing a checkpoint of the same name (``last.ckpt``): a file replaces a file with
one atomic ``os.replace``. A directory cannot be replaced atomically on every
filesystem, so the old checkpoint is first renamed aside to ``<stem>.mics-old<suffix>``
(``last.mics-old.ckpt``), the new one is renamed in, and only then is the old one
removed. A crash between the two renames leaves the name missing and the old complete
checkpoint aside: readers (:func:`resolve_checkpoint`, :func:`find_latest_checkpoint`,
and Lightning's ``ckpt_path="last"``, which matches ``last*.ckpt``) load it. Loading
never changes a directory (it runs on many ranks at once); the next save into the
directory (rank 0, before it publishes) finishes what an interrupted save left: it
restores a set-aside checkpoint whose name is missing, removes one whose name exists,
and removes every ``.mics-tmp-*`` entry. One run writes into a directory at a time.

Security: files are never unpickled with code execution: ``torch.load(...,
weights_only=True)`` for ``meta.pt`` and full files, a restricted unpickler for DCP's
``.metadata``, and a DCP load planner that reads non-tensor values with
``weights_only=True``. Exports are safetensors. Damaged files raise
:class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import pickle
import shutil
import time
import uuid
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

StateDictType = Literal["sharded", "full"]

#: Completion marker and manifest of a sharded checkpoint, written last.
MARKER_FILE = "mics-checkpoint.json"
#: Non-tensor state of a sharded checkpoint.
META_FILE = "meta.pt"
#: Prefix of checkpoints being written (never mistaken for checkpoints, and free of
#: ``ckpt_`` so that Lightning's ``hpc_ckpt_<n>`` version scan ignores them).
TMP_PREFIX = ".mics-tmp-"
#: Tag of a checkpoint set aside while a new one replaces it (``last.mics-old.ckpt``).
ASIDE_TAG = ".mics-old"
#: Entry of a full checkpoint that marks it as written (completely) by lightning-mics.
FULL_MARKER_KEY = "lightning_mics"
FORMAT_NAME = "lightning-mics"
FORMAT_VERSION = 1
#: Keys of a Lightning checkpoint: ``state_dict`` and one of these.
_LIGHTNING_KEYS = ("pytorch-lightning_version", "global_step", "epoch")

_log = logging.getLogger(__name__)
if not logging.getLogger().handlers and not _log.handlers:
    # NOTE: as Lightning does for its own loggers: INFO is shown unless the application
    # configured logging itself.
    _log.setLevel(logging.INFO)
    _log.addHandler(logging.StreamHandler())

#: Test hook: called with the name of each step of publishing a checkpoint
#: (``"written"``, ``"set-aside"``, ``"renamed-in"``); crash tests kill the process there.
_on_publish_step: Callable[[str], None] | None = None


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged or unsafe to load."""


def _dcp_errors() -> tuple[type[BaseException], ...]:
    # NOTE: DCP reports failures of any rank as CheckpointException, a BaseException.
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


_DCP_ERRORS = _dcp_errors()


def _validate_type(state_dict_type: str) -> StateDictType:
    if state_dict_type not in ("sharded", "full"):
        raise ValueError(f"state_dict_type must be 'sharded' or 'full', got {state_dict_type!r}.")
    return state_dict_type  # type: ignore[return-value]


# ------------------------------------------------------------------------ distributed
def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _info(message: str) -> None:
    """Log on the global rank 0 only (also before the process group exists)."""
    rank = dist.get_rank() if _is_dist() else int(os.environ.get("RANK", "0"))
    if rank == 0:
        _log.info(message)


def _broadcast_object(obj: Any) -> Any:
    if not _is_dist():
        return obj
    objs = [obj]
    dist.broadcast_object_list(objs, src=0)
    return objs[0]


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def _agree(error: BaseException | None) -> None:
    """Collective: raise on every rank if rank 0 failed (its error, by message)."""
    message = _broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise CheckpointError(f"Rank 0 failed to publish the checkpoint: {message}")


# ------------------------------------------------------------------------ state dicts
def model_state_dict(model: nn.Module, *, full: bool = False) -> dict[str, Any]:
    """The model's state dict: DTensor shards, or (``full``) unsharded CPU tensors on
    rank 0 and an empty dict on the other ranks. Collective for ``full``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    return get_model_state_dict(model, options=options)


def optimizer_state_dict(
    model: nn.Module, optimizer: Optimizer, *, full: bool = False
) -> dict[str, Any]:
    """The optimizer's state dict keyed by parameter names (so it survives resharding)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    return get_optimizer_state_dict(model, optimizer, options=options)


def set_model_state(
    model: nn.Module, state: Mapping[str, Any], *, full: bool, strict: bool = True
) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=full, strict=strict)
    set_model_state_dict(model, dict(state), options=options)


def set_optimizer_state(
    model: nn.Module, optimizer: Optimizer, state: Mapping[str, Any], *, full: bool
) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    state = dict(state)
    if full and not _has_tensor_state(state):
        # NOTE: nothing to distribute (e.g. SGD without momentum keeps no state): the
        # full state dict is also this rank's, and DCP's full path cannot load it
        # ("Expected device to be set": it infers the device from tensor state).
        full = False
    options = StateDictOptions(full_state_dict=full)
    set_optimizer_state_dict(model, optimizer, state, options=options)


def _has_tensor_state(state: Mapping[str, Any]) -> bool:
    """An optimizer state dict holds a per-parameter tensor that is not a scalar."""
    found = False

    def visit(value: Any) -> None:
        nonlocal found
        if isinstance(value, torch.Tensor):
            found = found or value.dim() > 0
        elif isinstance(value, Mapping):
            for v in value.values():
                visit(v)
        elif isinstance(value, list | tuple):
            for v in value:
                visit(v)

    visit(state.get("state", {}))
    return found


# ------------------------------------------------------------------------ RNG states
def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, Python, NumPy) in a form that loads with
    ``weights_only=True`` (tensors, tuples and ints only)."""
    import random

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    with contextlib.suppress(ImportError):
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    import random

    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        with contextlib.suppress(ImportError):
            import numpy as np

            name, keys, pos, has_gauss, gauss = state["numpy"]
            np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _to_tuple(value: Any) -> Any:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def gather_rng_states() -> list[dict[str, Any]]:
    """Collective: every rank's :func:`rng_state`, indexed by rank."""
    state = rng_state()
    if not _is_dist():
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


# ------------------------------------------------------------------------ safe reading
_SAFE_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: only its own dataclasses, torch dtypes and sizes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: not a type a checkpoint index contains"
        )


def _read_metadata(path: Path) -> Any:
    """DCP's index of checkpoint ``path`` (or the index file ``path`` itself)."""
    from torch.distributed.checkpoint.metadata import Metadata

    file = path if path.name.endswith(".metadata") and not path.is_dir() else path / ".metadata"
    try:
        with open(file, "rb") as f:
            metadata = _SafeUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint index {file} is missing.") from None
    except Exception as exc:
        raise CheckpointError(f"Checkpoint index {file} is damaged or unsafe: {exc}") from exc
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"Checkpoint index {file} does not hold DCP metadata.")
    return metadata


def _reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """Reads the index without arbitrary unpickling and names the file that fails."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = _read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan: Any, planner: Any) -> Any:
            per_file: dict[str, list[Any]] = {}
            for item in plan.items:
                per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(
                    item
                )
            fut = None
            for relative_path, items in per_file.items():
                try:
                    fut = super().read_data(dataclasses.replace(plan, items=items), planner)
                except Exception as exc:
                    file = Path(self.path) / relative_path
                    raise CheckpointError(f"Checkpoint file {file} is damaged: {exc}") from exc
            if fut is None:
                fut = super().read_data(plan, planner)
            return fut

    return SafeReader(path)


def _load_planner(allow_partial_load: bool = False) -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    from lightning_mics._fsdp_internals import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        """Non-tensor values (learning rates, step counts, ...) load with
        ``weights_only=True`` (DCP's default planner unpickles them freely)."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner(allow_partial_load=allow_partial_load)


def _torch_load(file: Path, *, mmap: bool = False) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint file {file} is missing.") from None
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"Checkpoint file {file} holds objects that are not plain data, so it is not "
            "loaded (weights_only=True; loading it could run code). If you trust the file "
            "and its types, allow them with torch.serialization.add_safe_globals([...]). "
            f"Details: {exc}"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"Checkpoint file {file} is damaged or truncated: {exc}") from exc


# ------------------------------------------------------------------------ discovery
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
    _read_metadata(path)  # a clear error for a damaged or unsafe index, before DCP
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


class _Opaque:
    """Stands for every object but plain containers and scalars when a pickle is only
    scanned for its keys: no class or function named in the file is imported or run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _ScanUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return _Opaque

    def persistent_load(self, pid: Any) -> Any:
        return _Opaque()


def _scan_torch_file(path: Path) -> dict[str, Any] | None:
    """The top level of the ``torch.save`` zip file ``path`` if it is a dict: plain
    values as they are, anything else (tensors, objects) as placeholders. Reads only the
    pickle (not the tensor data) and runs none of its code. ``None`` if ``path`` is not
    such a file."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.count("/") == 1]
            pickles = [n for n in names if n.endswith("/data.pkl")]
            if not pickles:
                return None
            with archive.open(pickles[0]) as f:
                root = _ScanUnpickler(f).load()
    except Exception:
        return None
    return root if isinstance(root, dict) else None


def _full_checkpoint_marker(root: Mapping[str, Any]) -> dict[str, Any] | None:
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
        root = _scan_torch_file(path)
        if root is None:
            return None
        marker = _full_checkpoint_marker(root)
        if marker is not None:
            return "full", float(marker.get("created", path.stat().st_mtime))
        if "state_dict" in root and any(key in root for key in _LIGHTNING_KEYS):
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
            _info(
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
    _info(f"Loading the newest complete checkpoint in {path}: {latest.name}")
    return resolve_checkpoint(latest)


def aside_path(target: str | os.PathLike) -> Path:
    """Where the checkpoint ``target`` waits while a new one replaces it:
    ``last.ckpt`` -> ``last.mics-old.ckpt`` (Lightning's ``ckpt_path="last"`` finds it)."""
    target = Path(target)
    suffix = target.suffix
    stem = target.name[: len(target.name) - len(suffix)]
    return target.with_name(f"{stem}{ASIDE_TAG}{suffix}")


def _aside_target(aside: Path) -> Path | None:
    """The name that ``aside`` was set aside from, or ``None`` if it is no aside."""
    head, tag, tail = aside.name.rpartition(ASIDE_TAG)
    if not tag or not head:
        return None
    target = aside.with_name(head + tail)
    return target if aside_path(target) == aside else None


# ------------------------------------------------------------------------ atomic writes
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _discard(path: Path) -> None:
    """Remove a checkpoint: first rename it to a temporary name (atomic), so that an
    interrupted removal never leaves a half-deleted checkpoint under a readable name."""
    if not os.path.lexists(path):
        return
    hidden = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        return
    _remove(hidden)


def _step(name: str) -> None:
    if _on_publish_step is not None:
        _on_publish_step(name)


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
                _remove(entry)
                continue
            target = _aside_target(entry) if ASIDE_TAG in entry.name else None
            if target is None:
                continue
            if os.path.lexists(target):
                _discard(entry)
            else:
                os.rename(entry, target)
                _info(f"Restored checkpoint {target} (a save replacing it was interrupted).")
        except OSError as exc:  # a leftover that cannot go must not fail the save
            _log.warning(f"Could not clean up {entry} (left by an interrupted save): {exc}")
    _fsync_dir(directory)


def _publish(tmp: Path, target: Path) -> None:
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
        _fsync_dir(parent)
        _step("set-aside")
        os.rename(tmp, target)
        _fsync_dir(parent)
        _step("renamed-in")
        _discard(aside)
    _fsync_dir(parent)


def _new_tmp(target: Path) -> Path:
    name = _broadcast_object(f"{TMP_PREFIX}{uuid.uuid4().hex}" if _rank() == 0 else None)
    return target.parent / name


# ------------------------------------------------------------------------ save
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
    tmp = _new_tmp(target)
    if _rank() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    _barrier()
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
    if _rank() == 0:
        try:
            _write_torch(metadata or {}, tmp / META_FILE)
            files = {
                str(f.relative_to(tmp)): f.stat().st_size
                for f in sorted(tmp.rglob("*"))
                if f.is_file()
            }
            marker = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "state_dict_type": "sharded",
                "model_key": model_key,
                "created": time.time(),
                "world_size": dist.get_world_size() if _is_dist() else 1,
                **(info or {}),
                "files": files,
                "bytes": sum(files.values()),
            }
            _write_text(json.dumps(marker, indent=1), tmp / MARKER_FILE)
            _publish(tmp, target)
        except Exception as exc:
            error = exc
    _agree(error)
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
    tmp = _new_tmp(target)
    error = None
    if _rank() == 0:
        try:
            if model_key is None:
                model_key = next((k for k in ("model", "state_dict") if k in checkpoint), None)
            marker = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "state_dict_type": "full",
                "model_key": model_key,
                "created": time.time(),
                "world_size": dist.get_world_size() if _is_dist() else 1,
                **(info or {}),
            }
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_torch({**checkpoint, FULL_MARKER_KEY: marker}, tmp)
            _publish(tmp, target)
        except Exception as exc:
            _remove(tmp)
            error = exc
    _agree(error)
    return target


def _write_torch(obj: Any, file: Path) -> None:
    with open(file, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(text: str, file: Path) -> None:
    with open(file, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Remove a checkpoint file or directory (call on rank 0). It is renamed away first,
    so an interrupted removal never leaves a partial checkpoint under its name."""
    _discard(Path(path))


# ------------------------------------------------------------------------ load
def load_sharded(
    path: str | os.PathLike, tensors: dict[str, Any], *, strict: bool = True
) -> dict[str, Any]:
    """Collective: fill ``tensors`` (a state dict of templates: DTensor shards of the
    current topology, or plain tensors in one process) in place from the sharded
    checkpoint ``path``, resharding as needed; return its ``meta.pt`` content."""
    path = Path(path)
    _dcp_load(path, tensors, allow_partial_load=not strict, no_dist=not _is_dist())
    return load_meta(path)


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
                storage_reader=_reader(path),
                planner=_load_planner(allow_partial_load=allow_partial_load),
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
    meta = _torch_load(Path(path) / META_FILE)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{Path(path) / META_FILE} does not hold a dict.")
    return meta


def load_full(path: str | os.PathLike) -> dict[str, Any]:
    """A full checkpoint file (``weights_only=True``, memory-mapped), without the
    ``"lightning_mics"`` marker entry."""
    return _load_full_and_marker(path)[0]


def _load_full_and_marker(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    path = Path(path)
    checkpoint = _torch_load(path, mmap=zipfile.is_zipfile(path))
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"Checkpoint file {path} does not hold a dict.")
    marker = checkpoint.pop(FULL_MARKER_KEY, None)
    return checkpoint, marker if isinstance(marker, dict) else {}


def checkpoint_keys(path: str | os.PathLike) -> set[str]:
    """Top-level keys of the tensors of a sharded checkpoint (e.g. ``state_dict``,
    ``optimizer_0``)."""
    metadata = _read_metadata(Path(path))
    return {key.split(".", 1)[0] for key in metadata.state_dict_metadata}


# ------------------------------------------------------------------------ plain API
def _unwrap_module(model: nn.Module) -> nn.Module:
    """The module itself behind a Fabric wrapper (``fabric.setup_module``)."""
    return getattr(model, "_original_module", None) or model


def _unwrap_optimizer(optimizer: Optimizer | None) -> Optimizer | None:
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, Optimizer) else optimizer


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: Optimizer | None = None,
    *,
    state_dict_type: StateDictType = "sharded",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Collective: save ``model`` (and ``optimizer``) of a MiCS run.

    Keys: ``"model"``, ``"optimizer"``; ``extra`` (plain data: step counters, scheduler
    state, ...) is stored alongside and returned by :func:`load_checkpoint`.
    """
    full = _validate_type(state_dict_type) == "full"
    model, optimizer = _unwrap_module(model), _unwrap_optimizer(optimizer)
    tensors: dict[str, Any] = {"model": model_state_dict(model, full=full)}
    if optimizer is not None:
        tensors["optimizer"] = optimizer_state_dict(model, optimizer, full=full)
    if full:
        return save_full(path, {**tensors, **(extra or {})})
    return save_sharded(path, tensors, extra, model_key="model")


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: Optimizer | None = None,
    *,
    strict: bool = True,
    model_key: str | None = None,
    optimizer_key: str = "optimizer",
) -> dict[str, Any]:
    """Collective: load a checkpoint into ``model`` (sharded with MiCS under any
    topology, or unsharded in one process) and ``optimizer``; return the extra data.

    ``path`` may be a checkpoint or a directory of checkpoints (the newest complete one
    is loaded). ``model_key`` defaults to the key the checkpoint was saved with.
    """
    model, optimizer = _unwrap_module(model), _unwrap_optimizer(optimizer)
    path, kind = resolve_checkpoint(path)
    if kind == "full":
        checkpoint = load_full(path)
        key = model_key or ("model" if "model" in checkpoint else "state_dict")
        set_model_state(model, _required(checkpoint, key, path), full=True, strict=strict)
        if optimizer is not None:
            state = _required(checkpoint, optimizer_key, path)
            set_optimizer_state(model, optimizer, state, full=True)
        return {k: v for k, v in checkpoint.items() if k not in (key, optimizer_key)}
    key = model_key or read_marker(path).get("model_key", "model")
    tensors: dict[str, Any] = {key: model_state_dict(model)}
    if optimizer is not None:
        if optimizer_key not in checkpoint_keys(path):
            raise CheckpointError(f"Checkpoint {path} holds no optimizer state {optimizer_key!r}.")
        tensors[optimizer_key] = optimizer_state_dict(model, optimizer)
    meta = load_sharded(path, tensors, strict=strict)
    set_model_state(model, tensors[key], full=False, strict=strict)
    if optimizer is not None:
        set_optimizer_state(model, optimizer, tensors[optimizer_key], full=False)
    return meta


def _required(checkpoint: Mapping[str, Any], key: str, path: Path) -> Any:
    if key not in checkpoint:
        raise CheckpointError(f"Checkpoint {path} has no {key!r} entry (has {sorted(checkpoint)}).")
    return checkpoint[key]


# ------------------------------------------------------------------------ consolidation
def consolidated_model_state(
    path: str | os.PathLike, model_key: str | None = None, *, submodule: str | None = None
) -> dict[str, torch.Tensor]:
    """The model's unsharded state dict from any checkpoint, in one process.

    ``path``: sharded checkpoint, full checkpoint file, or directory of checkpoints.
    ``submodule`` (a dotted attribute path such as ``"model"``): only that submodule's
    entries, named as in the submodule's own state dict (``model.lm_head.weight`` ->
    ``lm_head.weight``).
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    sub = _submodule_prefix(submodule)
    path, kind = resolve_checkpoint(path)
    if kind == "full":
        checkpoint, marker = _load_full_and_marker(path)
        key = model_key or marker.get("model_key")
        key = key or ("model" if "model" in checkpoint else "state_dict")
        state = _required(checkpoint, key, path)
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return _select_submodule(state, sub, path)
    key = model_key or read_marker(path).get("model_key", "model")
    metadata = _read_metadata(path)
    prefix = f"{key}."
    names = [
        name
        for name, meta in metadata.state_dict_metadata.items()
        if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    ]
    if not names:
        raise CheckpointError(f"Checkpoint {path} holds no model tensors under {key!r}.")
    selected = [name for name in names if name.startswith(prefix + sub)]
    if not selected:
        _select_submodule({name.removeprefix(prefix): None for name in names}, sub, path)
    tensors = {
        name: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name in selected
        for meta in (metadata.state_dict_metadata[name],)
    }
    load_sharded_tensors(path, tensors)
    return {name.removeprefix(prefix + sub): t for name, t in tensors.items()}


def _submodule_prefix(submodule: str | None) -> str:
    """``"model"`` or ``"model."`` -> ``"model."``; ``None`` or ``""`` -> ``""``."""
    name = (submodule or "").strip().strip(".")
    return f"{name}." if name else ""


def _select_submodule(state: dict[str, Any], sub: str, path: Path) -> dict[str, Any]:
    if not sub:
        return state
    selected = {k.removeprefix(sub): v for k, v in state.items() if k.startswith(sub)}
    if not selected:
        depth = sub.count(".")
        names = sorted({".".join(k.split(".")[:depth]) for k in state if k.count(".") >= depth})
        raise CheckpointError(
            f"The model in checkpoint {path} has no submodule {sub.rstrip('.')!r}; "
            f"submodules at that depth: {names[:20]}. Pass one of them, or no submodule "
            "for the whole model."
        )
    return selected


def load_sharded_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill flat ``{dotted.name: tensor}`` from a sharded checkpoint, in this process
    only (no collectives, whatever the process group)."""
    _dcp_load(path, tensors, allow_partial_load=True, no_dist=True)


def consolidate_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    torch_out: str | os.PathLike | None = None,
    model_key: str | None = None,
    submodule: str | None = None,
) -> dict[str, torch.Tensor]:
    """Write the model of checkpoint ``path`` as one safetensors file ``out`` (and, with
    ``torch_out``, as a plain ``torch.save`` state dict); return the state dict.

    The file loads into the unsharded model with ``load_state_dict(strict=True)``; with
    ``submodule`` (e.g. ``"model"`` for a LightningModule that holds its network as
    ``self.model``), into that submodule alone, under its own parameter names (e.g. to
    ``save_pretrained`` a Hugging Face model afterwards).
    """
    from safetensors.torch import save_file

    state = consolidated_model_state(path, model_key, submodule=submodule)
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    metadata = {"format": "pt", "source": str(path)}
    if submodule:
        metadata["submodule"] = _submodule_prefix(submodule).rstrip(".")
    save_file(state, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # like any file this user creates
    os.replace(tmp, out)
    if torch_out is not None:
        torch_out = Path(torch_out)
        torch_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = torch_out.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        _write_torch(state, tmp)
        os.replace(tmp, torch_out)
    return state


def read_model_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An unsharded model state dict from a safetensors file, a ``torch.save`` state
    dict, or any lightning-mics checkpoint (loaded safely)."""
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"Model file {path} is damaged or truncated: {exc}") from exc
    if path.is_file():
        loaded = load_full(path)
        if all(isinstance(v, torch.Tensor) for v in loaded.values()):
            return loaded
    return consolidated_model_state(path)


def load_model_weights(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Initialise ``model`` (sharded with MiCS, or not) from a full model file: a
    safetensors export, a plain state dict, or a checkpoint. Every rank reads the file
    and keeps only its own shards."""
    set_model_state(_unwrap_module(model), read_model_file(path), full=True, strict=strict)


def written_bytes(path: str | os.PathLike) -> dict[str, int]:
    """Bytes per file of a sharded checkpoint, from its marker."""
    return dict(read_marker(path)["files"])
