"""Graph-safe tracker restore: the RNG restore hands the CUDA RNG tracker its states in the form it keeps (graph-safe
generators for CUDA graphs), converted as upstream's ``convert_cuda_rng_state`` does, through a ``tensor_parallel`` the
loop's module sees while its restore runs; saves, and everyone else, see megatron-core's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch
import wrapt

from bridge_rng_patch import compat, probe
from bridge_rng_patch.decision import Decision, Plan, Wrapping
from bridge_rng_patch.loops import TRACKER_RESTORE
from bridge_rng_patch.resume import ResumeWatch
from bridge_rng_patch.rng_layout import RngCheckpointError, nothing_restored


class GraphSafeRestoringTracker(wrapt.ObjectProxy):
    """The tracker in use, converting the states it is given to the form it keeps."""

    def __init__(self, tracker: Any, remedy: str) -> None:
        super().__init__(tracker)
        self._self_remedy = remedy

    def set_states(self, states: Mapping[str, Any]) -> None:
        try:
            named_states = states.items()
        except AttributeError:
            raise RngCheckpointError(
                f"rng_tracker_states is a {type(states).__name__}, expected a dict; {self._self_remedy}"
            ) from None
        tracker = self.__wrapped__
        graph_safe = compat.is_graph_safe_cuda_rng_tracker(tracker)
        # A state already in the kept form is what convert_cuda_rng_state would return: it is passed as is.
        kept_form = torch.Generator if graph_safe else torch.Tensor
        convert = compat.convert_cuda_rng_state
        tracker.set_states(
            {
                name: state if isinstance(state, kept_form) else convert(state, to_graphable=graph_safe)
                for name, state in named_states
            }
        )


class ConvertingTensorParallel(wrapt.ObjectProxy):
    """``megatron.core.tensor_parallel`` as the loop's checkpointing module sees it while it loads a checkpoint."""

    def __init__(self, tensor_parallel: ModuleType, remedy: str) -> None:
        super().__init__(tensor_parallel)
        self._self_remedy = remedy

    def get_cuda_rng_tracker(self, *args: Any, **kwargs: Any) -> GraphSafeRestoringTracker:
        tracker = self.__wrapped__.get_cuda_rng_tracker(*args, **kwargs)
        return GraphSafeRestoringTracker(tracker, self._self_remedy)


class ConvertingTrackerWhileLoading:
    """The restore function's wrapper: its module sees the converting ``tensor_parallel`` while it runs."""

    def __init__(self, checkpointing: ModuleType, remedy: str) -> None:
        self._checkpointing = checkpointing
        self._converting = ConvertingTensorParallel(checkpointing.tensor_parallel, remedy)

    def __call__(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        seen_before = self._checkpointing.tensor_parallel
        self._checkpointing.tensor_parallel = self._converting
        try:
            return wrapped(*args, **kwargs)
        finally:
            self._checkpointing.tensor_parallel = seen_before


def plan(stack: probe.InstalledStack, watch: ResumeWatch) -> Plan:
    restore_function = stack.loop.restore_function
    lacks = stack.lacks(restore_function, "tensor_parallel")
    if lacks:
        return Plan.refuse(lacks)
    source = stack.restore_source
    converts = None if source is None else "convert_cuda_rng_state" in source
    if converts:
        return Plan.not_needed("upstream RNG restore already converts tracker states for the tracker in use")
    if converts is None:
        decision = stack.decide_by_release(TRACKER_RESTORE, f"the source of {restore_function}")
    elif ".set_states(" not in source or "rng_tracker_states" not in source:
        unexpected = f"unexpected RNG restore in {restore_function}"
        return Plan.refuse(f"{unexpected}: it sets no tracker states from rng_tracker_states")
    else:
        helpers = "megatron-core's"
        if compat.USES_OWN_HELPERS:
            helpers = "bridge_rng_patch's (this megatron-core lacks convert_cuda_rng_state)"
        decision = Decision.apply(f"the RNG restore sets tracker states unconverted; using {helpers} helpers")
    remedy = nothing_restored(stack.loop.skip_rng_load)
    return Plan(decision, (Wrapping(restore_function, ConvertingTrackerWhileLoading(stack.module, remedy)),))
