"""Graph-safe tracker restore: the RNG restore hands the CUDA RNG tracker its states in the form it keeps.

A restore without the fix passes the saved states to ``set_states`` as they are, so a graph-safe tracker (CUDA
graphs: ``use_cudagraphable_rng``, Transformer Engine's tracker) gets ByteTensors instead of graph-safe states;
upstream's fix converts each one with ``convert_cuda_rng_state(state, to_graphable=...)`` first. Here, while the
loop's restore function runs, its checkpointing module sees a ``tensor_parallel`` whose tracker converts the same
way in every restore branch; outside loads (every save) it sees megatron-core's own, and megatron-core is unchanged
for everyone else.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch
import wrapt

from bridge_rng_patch import compat, probe
from bridge_rng_patch.decision import Decision, Plan, Wrapping
from bridge_rng_patch.loops import TRACKER_RESTORE
from bridge_rng_patch.resume_context import ResumeContext
from bridge_rng_patch.rng_layout import RngCheckpointError, nothing_restored


class GraphSafeRestoringTracker(wrapt.ObjectProxy):
    """The CUDA RNG tracker in use, converting states it is given to the form it keeps; states it cannot take fail
    the load with the stack's own ``remedy``."""

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
        self._self_tracker: Any = None
        self._self_restoring_tracker: GraphSafeRestoringTracker | None = None

    def get_cuda_rng_tracker(self, *args: Any, **kwargs: Any) -> GraphSafeRestoringTracker:
        """The converting proxy of the tracker in use; made again only when megatron-core's tracker changes."""
        tracker = self.__wrapped__.get_cuda_rng_tracker(*args, **kwargs)
        if tracker is not self._self_tracker:
            self._self_tracker, self._self_restoring_tracker = (
                tracker,
                GraphSafeRestoringTracker(tracker, self._self_remedy),
            )
        return self._self_restoring_tracker


class ConvertingTrackerWhileLoading:
    """The restore function's wrapper: the loop's module sees the converting ``tensor_parallel`` while a load
    runs (its restore is there), and megatron-core's own otherwise, so that saves pay nothing for it.

    Loads that overlap (nested, or in threads) share one swap: the module gets back what it had when the last
    one ends.
    """

    def __init__(self, checkpointing: ModuleType, remedy: str) -> None:
        self._checkpointing = checkpointing
        self._converting = ConvertingTensorParallel(checkpointing.tensor_parallel, remedy)
        self._lock = threading.Lock()
        self._loads_running = 0
        self._seen_before: Any = None

    def __call__(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        with self._lock:
            if self._loads_running == 0:
                self._seen_before = self._checkpointing.tensor_parallel
                self._checkpointing.tensor_parallel = self._converting
            self._loads_running += 1
        try:
            return wrapped(*args, **kwargs)
        finally:
            with self._lock:
                self._loads_running -= 1
                if self._loads_running == 0:
                    self._checkpointing.tensor_parallel = self._seen_before


def plan(stack: probe.InstalledStack, context: ResumeContext) -> Plan:
    restore_function = stack.loop.restore_function
    lacks = stack.lacks(restore_function, "tensor_parallel")
    if lacks:
        return Plan.refuse(lacks)
    converts = stack.restore_converts_tracker_states
    if converts:
        return Plan.not_needed("upstream RNG restore already converts tracker states for the tracker in use")
    if converts is None:
        decision = probe.decide_by_release(stack.loop, TRACKER_RESTORE, f"the source of {restore_function}")
    elif not stack.restore_sets_tracker_states:
        unexpected = f"unexpected RNG restore in {restore_function}"
        return Plan.refuse(f"{unexpected}: it sets no tracker states from rng_tracker_states")
    else:
        helpers = (
            "megatron-core's"
            if not compat.USES_OWN_HELPERS
            else "bridge_rng_patch's (this megatron-core lacks convert_cuda_rng_state)"
        )
        decision = Decision.apply(f"the RNG restore sets tracker states unconverted; using {helpers} helpers")
    remedy = nothing_restored(stack.loop.skip_rng_load)
    return Plan(decision, (Wrapping(restore_function, ConvertingTrackerWhileLoading(stack.module, remedy)),))
