"""The CUDA calls Megatron-Bridge's checkpointing reaches, faked on a CPU-only torch. Nothing else is faked.

A CPU ``torch.Generator`` stands in for the GPU's default generator, so that the device RNG state Bridge
saves and restores (``torch.cuda.get_rng_state`` / ``set_rng_state``), the tracker seeding
(``torch.cuda.manual_seed``, which Bridge's seeding reaches only when ``torch.cuda.device_count()`` is
positive) and the graph-safe conversion (``torch.cuda.default_generators``) all act on a state the tests
can observe. ``synchronize`` and ``current_device`` are needed by megatron-core's checkpoint writer, which
places small tensors on "the current device". ``is_initialized`` answers as on a GPU in use, so that torch
runs at once the device-state calls it would queue until CUDA is initialised (megatron-core's
``_set_cuda_rng_state``: the tracker's ``add`` puts the device state back, its ``fork`` swaps it), and the tracker
reads the device state through ``torch.cuda.random.get_rng_state``, the same call as ``torch.cuda.get_rng_state``.
"""

from __future__ import annotations

import torch


def install(seed: int, device_generator: torch.Generator | None = None) -> torch.Generator:
    """The stand-ins, with ``device_generator`` (a CPU generator of its own by default) as the device's, seeded."""
    device_generator = torch.Generator() if device_generator is None else device_generator
    device_generator.manual_seed(seed)
    torch.cuda.get_rng_state = lambda device="cuda": device_generator.get_state()
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state  # the same function, as megatron-core calls it
    torch.cuda.set_rng_state = lambda new_state, device="cuda": device_generator.set_state(new_state.clone())
    torch.cuda.manual_seed = lambda new_seed: device_generator.manual_seed(int(new_seed))
    torch.cuda.device_count = lambda: 1
    torch.cuda.is_initialized = lambda: True
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.default_generators = {"cpu": device_generator}
    return device_generator


class _NoStream:
    """A CUDA stream or event where work runs in order, as on the CPU: waiting and recording do nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: None


def install_streams() -> None:
    """Streams and events that megatron-core's DDP and MoE dispatchers order their work by, doing nothing."""
    import contextlib

    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.Stream = torch.cuda.Event = _NoStream
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
