"""Checkpoints to and from full model files: consolidation of any checkpoint into one
safetensors (or ``torch.save``) file, optionally of one submodule, and initialisation of
a MiCS model from such a file. Everything here runs in one process."""

from __future__ import annotations

import os
import uuid
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_mics.checkpoint.discovery import model_key_of, resolve_checkpoint, stored_model_key
from lightning_mics.checkpoint.format import TMP_PREFIX, CheckpointError
from lightning_mics.checkpoint.publish import write_torch
from lightning_mics.checkpoint.safe_loading import read_metadata
from lightning_mics.checkpoint.state_dicts import set_model_state, unwrap_module
from lightning_mics.checkpoint.storage import (
    load_full,
    load_full_and_marker,
    load_sharded_tensors,
)


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
        checkpoint, marker = load_full_and_marker(path)
        key = model_key or model_key_of(checkpoint, marker)
        state = _required(checkpoint, key, path)
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return _select_submodule(state, sub, path)
    key = model_key or stored_model_key(path, "sharded")
    metadata = read_metadata(path)
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
        write_torch(state, tmp)
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
    set_model_state(unwrap_module(model), read_model_file(path), full=True, strict=strict)


def _required(checkpoint: dict[str, Any], key: str, path: Path) -> Any:
    if key not in checkpoint:
        raise CheckpointError(f"Checkpoint {path} has no {key!r} entry (has {sorted(checkpoint)}).")
    return checkpoint[key]
