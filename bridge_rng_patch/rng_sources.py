"""The RNG sources the loops checkpoint per rank, read live in the checkpoint's own format, and their fingerprints.

A checkpoint entry holds python's ``random``, numpy's, torch's CPU generator, the device generator and the CUDA RNG
tracker's named streams; a fingerprint is 8 bytes of a hash of each, by the name a user knows it by (``python``,
``numpy``, ``torch``, ``cuda``, each tracker stream's own name), so that a rank's restored state can be compared
with what it was handed and with every other rank's at a few bytes per source.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import random
from collections.abc import Iterator, Mapping
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


def live_rng_state() -> dict[str, Any]:
    """This rank's live RNG state in the checkpoint's format, the device generator included where this process has
    one (a reader, a CPU-only job, has none)."""
    state = current_rng_state(with_device=False)
    with contextlib.suppress(RuntimeError, AssertionError):  # no device generator in this process
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


@contextlib.contextmanager
def every_source_kept() -> Iterator[None]:
    """Leave every RNG source as it was before the block, whatever the block draws or seeds: the restored state
    stays for the first training step. A graph-safe tracker keeps its states in generators, which its
    ``get_states`` hands out as they are: their states are copied, and put back into the same generators."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    kept = live_rng_state()
    streams = {name: _copy(state) for name, state in kept[TRACKER_KEY].items()}
    try:
        yield
    finally:
        random.setstate(kept["random_rng_state"])
        np.random.set_state(kept["np_rng_state"])
        torch.set_rng_state(kept["torch_rng_state"])
        if "cuda_rng_state" in kept:
            torch.cuda.set_rng_state(kept["cuda_rng_state"])
        live = tracker.get_states()
        for name, state in streams.items():
            if isinstance(live.get(name), torch.Generator):
                live[name].set_state(state)
                streams[name] = live[name]
        tracker.set_states(streams)


def _copy(state: Any) -> Any:
    return state.get_state() if isinstance(state, torch.Generator) else state.clone()


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
