"""megatron-core 0.16's CUDA RNG tracker helpers (Megatron-LM PR #2641), for older megatron-core: its own are used
wherever the installed release has them."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from megatron.core import tensor_parallel

_TE_EXTENSION_MODULE = "megatron.core.extensions.transformer_engine"


def _own_convert_cuda_rng_state(
    state: torch.Tensor | torch.Generator, to_graphable: bool = False
) -> torch.Tensor | torch.Generator:
    """A saved CUDA RNG state in the form the tracker in use keeps: a graph-safe Generator or a ByteTensor."""
    if isinstance(state, torch.Generator):
        return state if to_graphable else state.get_state()
    if not isinstance(state, torch.Tensor):
        raise ValueError(f"Invalid CUDA RNG state type: {type(state).__name__} (expected torch.Tensor or Generator)")
    if not to_graphable:
        return state
    # A graph-safe state is a clone of the device generator holding ``state``; the device state is put back.
    device_generator = torch.cuda.default_generators[torch.cuda.current_device()]
    current = device_generator.get_state()
    device_generator.set_state(state)
    graphable = device_generator.clone_state()
    device_generator.set_state(current)
    return graphable


def _own_is_graph_safe_cuda_rng_tracker(tracker: Any) -> bool:
    # A TE tracker can only exist once megatron-core's TE extension is imported, so its absence answers no.
    # Without Transformer Engine that module defines placeholders, not classes.
    te_extension = sys.modules.get(_TE_EXTENSION_MODULE)
    te_tracker_class = getattr(te_extension, "TECudaRNGStatesTracker", None)
    if isinstance(te_tracker_class, type) and isinstance(tracker, te_tracker_class):
        return True
    return bool(getattr(tracker, "use_cudagraphable_rng", False))


convert_cuda_rng_state: Callable[..., torch.Tensor | torch.Generator] = getattr(
    tensor_parallel, "convert_cuda_rng_state", _own_convert_cuda_rng_state
)
is_graph_safe_cuda_rng_tracker: Callable[[Any], bool] = getattr(
    tensor_parallel, "is_graph_safe_cuda_rng_tracker", _own_is_graph_safe_cuda_rng_tracker
)
USES_OWN_HELPERS = convert_cuda_rng_state is _own_convert_cuda_rng_state
