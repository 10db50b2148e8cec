"""The CUDA calls Megatron-Bridge's checkpointing reaches, faked on a CPU-only torch. Nothing else is faked.

A CPU ``torch.Generator`` stands in for the GPU's default generator, so that the device RNG state Bridge
saves and restores (``torch.cuda.get_rng_state`` / ``set_rng_state``), the tracker seeding
(``torch.cuda.manual_seed``, which Bridge's seeding reaches only when ``torch.cuda.device_count()`` is
positive) and the graph-safe conversion (``torch.cuda.default_generators``) all act on a state the tests
can observe. ``synchronize`` and ``current_device`` are needed by megatron-core's checkpoint writer, which
places small tensors on "the current device".
"""

from __future__ import annotations

import torch


def install(seed: int) -> torch.Generator:
    device_generator = torch.Generator()
    device_generator.manual_seed(seed)
    torch.cuda.get_rng_state = lambda device="cuda": device_generator.get_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": device_generator.set_state(new_state.clone())
    torch.cuda.manual_seed = lambda new_seed: device_generator.manual_seed(int(new_seed))
    torch.cuda.device_count = lambda: 1
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.default_generators = {"cpu": device_generator}
    return device_generator
