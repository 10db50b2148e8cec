"""The graph-safe conversion: the package's own helpers for old megatron-core, and where they are used.

These run in the test runner's interpreter (Megatron-Bridge 0.2.0rc6, megatron-core 0.15.3, which lacks the
helpers). The conversion of a ByteTensor into a graph-safe state clones the CUDA device generator; on this
CPU-only torch a CPU Generator stands in for it (``cuda_device`` below), which is the only thing faked.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_python

import bridge_rng_patch
from bridge_rng_patch import compat
from tools.release_envs import RELEASES


@pytest.fixture
def cuda_device(monkeypatch) -> torch.Generator:
    device_generator = torch.Generator()
    device_generator.manual_seed(7)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "default_generators", (device_generator,))
    return device_generator


def _byte_state(seed: int) -> torch.Tensor:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator.get_state()


def test_old_megatron_core_gets_the_packages_own_helpers():
    assert compat.USES_OWN_HELPERS
    assert compat.convert_cuda_rng_state.__module__ == "bridge_rng_patch.compat"
    assert compat.is_graph_safe_cuda_rng_tracker.__module__ == "bridge_rng_patch.compat"


def test_megatron_core_with_the_helpers_keeps_its_own():
    process = run_python(
        RELEASES["bridge-0.3.1"],
        """
        import json
        from megatron.core import tensor_parallel
        from bridge_rng_patch import compat
        print(json.dumps([
            compat.convert_cuda_rng_state is tensor_parallel.convert_cuda_rng_state,
            compat.is_graph_safe_cuda_rng_tracker is tensor_parallel.is_graph_safe_cuda_rng_tracker,
            compat.USES_OWN_HELPERS,
        ]))
        """,
    )
    assert json.loads(process.stdout.splitlines()[-1]) == [True, True, False], process.stderr[-3000:]


def test_byte_tensor_becomes_a_graph_safe_generator_holding_the_same_state(cuda_device):
    state = _byte_state(11)
    converted = compat.convert_cuda_rng_state(state, to_graphable=True)
    assert isinstance(converted, torch.Generator)
    assert torch.equal(converted.get_state(), state)


def test_conversion_puts_the_device_generator_state_back(cuda_device):
    before = cuda_device.get_state()
    compat.convert_cuda_rng_state(_byte_state(11), to_graphable=True)
    assert torch.equal(cuda_device.get_state(), before)


def test_generator_becomes_a_byte_tensor_for_a_plain_tracker():
    generator = torch.Generator()
    generator.manual_seed(3)
    converted = compat.convert_cuda_rng_state(generator, to_graphable=False)
    assert isinstance(converted, torch.Tensor)
    assert torch.equal(converted, generator.get_state())


def test_states_already_in_the_trackers_form_pass_through_unchanged():
    state, generator = _byte_state(5), torch.Generator()
    assert compat.convert_cuda_rng_state(state, to_graphable=False) is state
    assert compat.convert_cuda_rng_state(generator, to_graphable=True) is generator


@pytest.mark.parametrize("to_graphable", [True, False])
def test_other_state_types_are_refused_with_a_clear_error(to_graphable):
    with pytest.raises(ValueError, match=r"Invalid CUDA RNG state type: list \(expected torch.Tensor or Generator\)"):
        compat.convert_cuda_rng_state([1, 2, 3], to_graphable=to_graphable)


def _graph_safe_tracker():
    """A tracker in graph-safe mode; its constructor refuses that mode without CUDA graphs, so set afterwards."""
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    tracker = CudaRNGStatesTracker()
    tracker.use_cudagraphable_rng = True
    return tracker


def test_graph_safe_tracker_is_recognised_by_use_cudagraphable_rng():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    assert compat.is_graph_safe_cuda_rng_tracker(_graph_safe_tracker())
    assert not compat.is_graph_safe_cuda_rng_tracker(CudaRNGStatesTracker())


@pytest.fixture
def bridge_checkpointing():
    import megatron.bridge.training.checkpointing as checkpointing
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    bridge_rng_patch.apply()
    yield checkpointing
    initialize_rng_tracker(force_reset=True)


def _while_loading(checkpointing, restore):
    """Runs ``restore`` where Bridge's restore runs: inside its ``_load_checkpoint_from_path``, as the graph-safe
    restore wraps it (under the resume audit's wrapper)."""
    from bridge_rng_patch.tracker_restore import ConvertingTrackerWhileLoading

    wrapped = checkpointing._load_checkpoint_from_path
    while not isinstance(wrapped._self_wrapper, ConvertingTrackerWhileLoading):
        wrapped = wrapped.__wrapped__
    return wrapped._self_wrapper(restore, None, (), {})


def test_bridge_restore_converts_states_for_a_graph_safe_tracker(bridge_checkpointing, cuda_device):
    """Every restore branch calls ``tensor_parallel.get_cuda_rng_tracker().set_states`` on this module."""
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().use_cudagraphable_rng = True  # see _graph_safe_tracker
    state = _byte_state(21)

    def restore():
        bridge_checkpointing.tensor_parallel.get_cuda_rng_tracker().set_states({"expert-parallel-rng": state})

    _while_loading(bridge_checkpointing, restore)
    restored = tensor_parallel.get_cuda_rng_tracker().get_states()["expert-parallel-rng"]
    assert isinstance(restored, torch.Generator)
    assert torch.equal(restored.get_state(), state)


def test_bridge_sees_megatron_cores_tensor_parallel_outside_loads(bridge_checkpointing):
    """Saves call ``get_rng_state`` outside loads: they reach megatron-core's own module, at no cost."""
    from megatron.core import tensor_parallel

    seen = []

    def nested_load():
        seen.append(type(bridge_checkpointing.tensor_parallel).__name__)

    def failing_load():
        seen.append(type(bridge_checkpointing.tensor_parallel).__name__)
        _while_loading(bridge_checkpointing, nested_load)
        seen.append(type(bridge_checkpointing.tensor_parallel).__name__)
        raise OSError("the load failed")

    assert bridge_checkpointing.tensor_parallel is tensor_parallel
    with pytest.raises(OSError, match="the load failed"):
        _while_loading(bridge_checkpointing, failing_load)
    assert seen == ["ConvertingTensorParallel"] * 3
    assert bridge_checkpointing.tensor_parallel is tensor_parallel


def test_megatron_core_tracker_is_unchanged_for_everyone_else(bridge_checkpointing):
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().use_cudagraphable_rng = True  # see _graph_safe_tracker
    state = _byte_state(21)
    tensor_parallel.get_cuda_rng_tracker().set_states({"expert-parallel-rng": state})
    assert tensor_parallel.get_cuda_rng_tracker().get_states()["expert-parallel-rng"] is state
