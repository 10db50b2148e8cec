"""What a loop runs between its restore and its first training step, run after the real load in the order the
release's own set-up code runs it, on the CPU.

Megatron-Bridge's ``setup()`` (every release) loads the checkpoint, fires ``on_data_init_start`` (0.5.0 and later),
then calls ``setup_data_iterators``; Megatron-LM's ``pretrain()`` loads in ``setup_model_and_optimizer``, then calls
``build_train_valid_test_data_iterators``. ``setup()`` and ``pretrain()`` themselves build a GPU model, so the job
calls those steps as they do, by the names their modules call them through (where the package wraps them), with a
small dataset. Faked: the flags the builders broadcast are CUDA tensors (CPU ones here). The first step is the
release's real ``train_step``, called with no model: the package checks the state on the way in, then the release
fails at once, before any draw (a step needs a GPU model).
"""

from __future__ import annotations

import inspect
import random
import sys
from typing import Any

import megatron_lm_loop

BRIDGE_SETUP, BRIDGE_TRAIN = "megatron.bridge.training.setup", "megatron.bridge.training.train"
BRIDGE_LOADERS, BRIDGE_CALLBACKS = "megatron.bridge.data.loaders", "megatron.bridge.training.callbacks"
MEGATRON_LM_TRAINING = "megatron.training.training"
# A draw made by ``iter()`` of a DataLoader without a generator: its base seed.
MOST_DRAWS_COUNTED = 8


def modules(loop: str) -> tuple[str, ...]:
    """The modules the loop's set-up and training step live in, imported by the job as the loop's script does."""
    return (BRIDGE_SETUP, BRIDGE_TRAIN) if loop == "megatron-bridge" else (MEGATRON_LM_TRAINING,)


class SmallDataset:
    """Sixty-four samples of eight tokens: enough for the builders' samplers."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> dict:
        import torch

        return {"tokens": torch.full((8,), index, dtype=torch.int64)}


def _datasets(*args: Any, **kwargs: Any) -> tuple[SmallDataset, SmallDataset, SmallDataset]:
    return SmallDataset(), SmallDataset(), SmallDataset()


def run_until_first_step(loop: str, state: Any, spec: dict, device_generator: Any) -> dict:
    """The loop's steps between the restore and the first step; what the first step finds, and how many DataLoader
    base-seed draws the torch generator is past the state the restore left."""
    import torch

    restored_torch = torch.get_rng_state()
    if loop == "megatron-bridge":
        if spec.get("data_init_callback"):
            _fire_data_init_callback(state, device_generator)
        _bridge_iterators(state)
    else:
        _megatron_lm_iterators()
    return {"torch_draws_past_restore": _draws_between(restored_torch, torch.get_rng_state())}


def build_again(loop: str, state: Any) -> dict:
    """The iterators built once more, after the first step (a loop that rebuilds them mid-run): how many base-seed
    draws that takes from torch's generator."""
    import torch

    before = torch.get_rng_state()
    if loop == "megatron-bridge":
        _bridge_iterators(state)
    else:
        _megatron_lm_iterators()
    return {"torch_draws_of_a_later_build": _draws_between(before, torch.get_rng_state())}


def enter_first_step(loop: str) -> str:
    """Call the release's real ``train_step`` as its loop does at the first step, with no model."""
    train_step = sys.modules[BRIDGE_TRAIN if loop == "megatron-bridge" else MEGATRON_LM_TRAINING].train_step
    arguments = [None] * len(inspect.signature(train_step).parameters)
    try:
        train_step(*arguments)
    except Exception as error:  # no model: the release's step stops here
        return type(error).__name__
    return "ran"


def _fire_data_init_callback(state: Any, device_generator: Any) -> None:
    """A user's ``on_data_init_start`` callback (JIT warm-up with mock data), fired through the release's real
    CallbackManager as ``setup()`` fires it: it draws from every source."""
    import numpy as np
    import torch
    from megatron.bridge.training.callbacks import CallbackContext, CallbackManager
    from megatron.core import tensor_parallel

    def warm_up(context: Any) -> None:
        random.random()
        np.random.random(4)
        torch.rand(4)
        torch.rand(4, generator=device_generator)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            torch.rand(4, generator=device_generator)

    manager = CallbackManager()
    manager.register("on_data_init_start", warm_up)
    manager.fire("on_data_init_start", CallbackContext(state=state, model=None, user_state=manager.user_state))


def _bridge_iterators(state: Any) -> None:
    """``setup_data_iterators`` through the set-up module's own name for it, bound as ``setup()`` binds it."""
    from megatron.core import parallel_state as mpu

    megatron_lm_loop.cpu_for_cuda_tensors(BRIDGE_LOADERS)
    available = {
        "cfg": state.cfg,
        "train_state": state.train_state,
        "model_length": 1,
        "train_valid_test_datasets_provider": _datasets,
        "dp_group": mpu.get_data_parallel_group(),
        "eval_dp_group": None,
    }
    setup_data_iterators = sys.modules[BRIDGE_SETUP].setup_data_iterators
    parameters = inspect.signature(setup_data_iterators).parameters
    setup_data_iterators(**{name: value for name, value in available.items() if name in parameters})


def _megatron_lm_iterators() -> None:
    from megatron.training.global_vars import get_args

    megatron_lm_loop.cpu_for_cuda_tensors(MEGATRON_LM_TRAINING)
    args = get_args()
    args.iteration = megatron_lm_loop.STEP
    sys.modules[MEGATRON_LM_TRAINING].build_train_valid_test_data_iterators(_datasets)


def _draws_between(before: Any, after: Any) -> int | None:
    """How many base-seed draws take the torch generator from ``before`` to ``after`` (None: not such draws)."""
    import torch

    generator = torch.Generator()
    generator.set_state(before)
    for draws in range(MOST_DRAWS_COUNTED + 1):
        if torch.equal(generator.get_state(), after):
            return draws
        torch.empty((), dtype=torch.int64).random_(generator=generator)
    return None
