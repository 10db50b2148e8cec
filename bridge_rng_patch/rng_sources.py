"""The RNG sources the loops checkpoint per rank, read live in the checkpoint's format, kept over a block, and
fingerprinted in 8 bytes per source by the name a user knows (``python``, ``numpy``, ``torch``, ``cuda``, streams)."""

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


def live_rng_state() -> dict[str, Any]:
    """This rank's RNG state in the checkpoint's format, the device's where there is one."""
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        TRACKER_KEY: tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    with contextlib.suppress(RuntimeError, AssertionError):  # no device generator in this process
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


@contextlib.contextmanager
def every_source_kept() -> Iterator[None]:
    """Every source as it was before the block; a graph-safe tracker's generators are set back, not replaced."""
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
    digests = {name: _digest(entry[key]) for name, key in _ENTRY_KEYS.items() if key in entry}
    for name, state in sorted((entry.get(TRACKER_KEY) or {}).items()):
        digests[str(name)] = _digest(state)
    return digests


def _digest(state: Any) -> str:
    if isinstance(state, torch.Generator):
        state = state.get_state()
    if isinstance(state, torch.Tensor):
        data = state.detach().cpu().numpy().tobytes()
    elif isinstance(state, tuple) and state and isinstance(state[0], str):  # numpy's (name, keys, pos, gauss, cached)
        data = b"".join(part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode() for part in state)
    else:
        data = pickle.dumps(state, protocol=4)
    return hashlib.blake2b(data, digest_size=8).hexdigest()
