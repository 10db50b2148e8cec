"""The RNG sources the loops checkpoint per rank, read live in the checkpoint's own format, their fingerprints, and
what the stored-layout load handed this rank's restore (for the resume audit to check afterwards).

A checkpoint entry holds python's ``random``, numpy's, torch's CPU generator, the device generator and the CUDA RNG
tracker's named streams; a fingerprint is 8 bytes of a hash of each, by the name a user knows it by (``python``,
``numpy``, ``torch``, ``cuda``, each tracker stream's own name), so that a rank's restored state can be compared
with what it was handed and with every other rank's at a few bytes per source.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from megatron.core import tensor_parallel

# The checkpoint's key of each source, by the name a user knows it by; the tracker's streams follow by their names.
_ENTRY_KEYS = {
    "python": "random_rng_state",
    "numpy": "np_rng_state",
    "torch": "torch_rng_state",
    "cuda": "cuda_rng_state",
}
TRACKER_KEY = "rng_tracker_states"


def current_rng_state(with_device: bool = True) -> dict[str, Any]:
    """This rank's live RNG state, in the checkpoint's format: restoring it leaves every source as it is. Without
    ``with_device``, the device generator is left out (for a reader in a process that has none)."""
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        TRACKER_KEY: tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if with_device:
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def fingerprint(entry: Mapping[str, Any]) -> dict[str, str]:
    """Each source an entry holds, by its user-facing name, with 16 hex digits of a hash of its state."""
    digests = {name: _digest(_bytes_of(entry[key])) for name, key in _ENTRY_KEYS.items() if key in entry}
    for name, state in sorted((entry.get(TRACKER_KEY) or {}).items()):
        digests[str(name)] = _digest(_bytes_of(state))
    return digests


def _bytes_of(state: Any) -> bytes:
    if isinstance(state, torch.Generator):
        state = state.get_state()
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().numpy().tobytes()
    if isinstance(state, tuple) and state and isinstance(state[0], str):  # numpy's (name, keys, pos, has_gauss, cached)
        return b"".join(part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode() for part in state)
    return pickle.dumps(state, protocol=4)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


OWN, SHARED, FRESH = "own", "shared", "fresh"


@dataclass
class Handed:
    """What the stored-layout load handed this rank's restore in the resume under way: which kind of entry
    (``OWN``: stored for this rank's coordinates; ``SHARED``: the one state stored for its (pp, tp) under EP > 1;
    ``FRESH``: its own live state, by design), the entry (fingerprinted by the audit after the restore, so that a
    resume without the audit pays nothing for it), and whether the states were gathered over DP
    (``data_parallel_random_init``, which seeds every stream per DP rank)."""

    kind: str
    entry: Mapping[str, Any]
    data_parallel_random_init: bool


@dataclass
class ResumeRecord:
    """What this rank's package saw of the resume under way: loads of a checkpoint, whether one asked for RNG state,
    and what the restore was handed (nothing where the package's stored-layout load did not hand it). The same on
    every rank but ``handed``, which the audit compares."""

    loads: int = 0
    rng_requested: bool = False
    checkpoint_dir: str | None = None
    handed: Handed | None = None


_record = ResumeRecord()


def begin_resume() -> None:
    global _record
    _record = ResumeRecord()


def resume_record() -> ResumeRecord:
    return _record


def note_load(rng_requested: bool, checkpoint_dir: str | None) -> None:
    """A load of a checkpoint (every rank makes it), and whether it asked for RNG state."""
    _record.loads += 1
    _record.rng_requested = _record.rng_requested or rng_requested
    if checkpoint_dir is not None:
        _record.checkpoint_dir = checkpoint_dir


def note_handed(kind: str, entry: Mapping[str, Any], data_parallel_random_init: bool) -> None:
    """The entry handed to this rank's restore, to be compared with what the restore set."""
    _record.handed = Handed(kind, entry, data_parallel_random_init)
