"""Checkpoints of MiCS models: sharded (distributed checkpoint) and full, published
atomically, loadable under any other topology, and consolidated into one file.

One engine (:mod:`.engine`: ``save`` / ``load`` of a dict of modules, optimizers,
stateful objects and plain values) serves the plain API (:mod:`.plain_api`), the
Trainer strategy and the Fabric strategy. The rest of the package, by what it holds:

- :mod:`.format`: file names, markers, format version, ``CheckpointError``;
- :mod:`.storage`: writing and reading the two formats (sharded: a
  ``torch.distributed.checkpoint`` directory; full: one file written by rank 0);
- :mod:`.state_dicts`: model and optimizer state dicts (sharded or full);
- :mod:`.publish`: atomic publishing, crash-safe replacement and removal;
- :mod:`.discovery`: which checkpoint a path means, and the newest of a directory;
- :mod:`.safe_loading`: reading files without running code from them;
- :mod:`.export`: consolidation into one safetensors file, and loading one;
- :mod:`.distributed`: what the others need from the process group.

Crash safety: everything is written under a temporary name ``.mics-tmp-<id>`` and
renamed into place once every rank has finished; a checkpoint that exists under its
final name is complete (see :mod:`.publish`). Security: files are never unpickled with
code execution, exports are safetensors, and damaged files raise
:class:`CheckpointError` naming the file (see :mod:`.safe_loading`).
"""

from __future__ import annotations

from collections.abc import Callable

from lightning_mics.checkpoint.discovery import (
    aside_path,
    checkpoint_kind,
    find_latest_checkpoint,
    is_sharded_checkpoint,
    read_marker,
    resolve_checkpoint,
    verify_sharded,
)
from lightning_mics.checkpoint.engine import StateDict, load, save
from lightning_mics.checkpoint.export import (
    consolidate_checkpoint,
    consolidated_model_state,
    load_model_weights,
    read_model_file,
)
from lightning_mics.checkpoint.format import (
    FULL_MARKER_KEY,
    MARKER_FILE,
    META_FILE,
    TMP_PREFIX,
    CheckpointError,
    MissingEntryError,
    StateDictType,
    validate_state_dict_type,
)
from lightning_mics.checkpoint.plain_api import load_checkpoint, save_checkpoint
from lightning_mics.checkpoint.publish import recover_directory, remove_checkpoint
from lightning_mics.checkpoint.safe_loading import read_metadata
from lightning_mics.checkpoint.storage import (
    checkpoint_keys,
    load_full,
    load_meta,
    load_sharded,
    save_full,
    save_sharded,
    written_bytes,
)

#: Test hook: called with the name of each step of publishing a checkpoint
#: (``"written"``, ``"set-aside"``, ``"renamed-in"``); crash tests kill the process there.
_on_publish_step: Callable[[str], None] | None = None

__all__ = [
    "FULL_MARKER_KEY",
    "MARKER_FILE",
    "META_FILE",
    "TMP_PREFIX",
    "CheckpointError",
    "MissingEntryError",
    "StateDict",
    "StateDictType",
    "aside_path",
    "checkpoint_keys",
    "checkpoint_kind",
    "consolidate_checkpoint",
    "consolidated_model_state",
    "find_latest_checkpoint",
    "is_sharded_checkpoint",
    "load",
    "load_checkpoint",
    "load_full",
    "load_meta",
    "load_model_weights",
    "load_sharded",
    "read_marker",
    "read_metadata",
    "read_model_file",
    "recover_directory",
    "remove_checkpoint",
    "resolve_checkpoint",
    "save",
    "save_checkpoint",
    "save_full",
    "save_sharded",
    "validate_state_dict_type",
    "verify_sharded",
    "written_bytes",
]
