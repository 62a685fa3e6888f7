"""What a lightning-mics checkpoint is on disk: file names, markers, format version,
the two formats (``StateDictType``) and the error every damaged checkpoint raises."""

from __future__ import annotations

import time
from typing import Literal

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
LIGHTNING_KEYS = ("pytorch-lightning_version", "global_step", "epoch")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged or unsafe to load."""


class MissingEntryError(CheckpointError, KeyError):
    """A checkpoint lacks an entry that was asked for (a ``KeyError`` too, as Lightning
    raises for strict loading)."""

    __str__ = RuntimeError.__str__  # NOTE: KeyError's would quote the message


def validate_state_dict_type(state_dict_type: str) -> StateDictType:
    if state_dict_type not in ("sharded", "full"):
        raise ValueError(f"state_dict_type must be 'sharded' or 'full', got {state_dict_type!r}.")
    return state_dict_type  # type: ignore[return-value]


def new_marker(state_dict_type: StateDictType, **entries: object) -> dict[str, object]:
    """The marker of a checkpoint being written (``created`` is the time it is written)."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "state_dict_type": state_dict_type,
        "created": time.time(),
        **entries,
    }
