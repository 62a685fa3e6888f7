"""Reading checkpoint files without running code from them.

``torch.load(..., weights_only=True)`` for ``meta.pt`` and full files, a restricted
unpickler for DCP's ``.metadata``, a DCP load planner that reads non-tensor values with
``weights_only=True``, and a scan of a ``torch.save`` file's top-level keys that imports
nothing. Damaged or unsafe files raise :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from lightning_mics._fsdp_internals import set_element
from lightning_mics.checkpoint.format import CheckpointError

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


def read_metadata(path: Path) -> Any:
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


def reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """Reads the index without arbitrary unpickling and names the file that fails."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
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


def load_planner(allow_partial_load: bool = False) -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

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


def torch_load(file: Path, *, mmap: bool = False) -> Any:
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


def scan_torch_file(path: Path) -> dict[str, Any] | None:
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
