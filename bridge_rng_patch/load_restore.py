"""Load side: Bridge's RNG restore reads the layout the checkpoint stores, restores all or nothing, and hands the
CUDA RNG tracker its states in the form it keeps (graph-safe or not), as Megatron-Bridge 0.3.0 does.

Three pieces, all scoped to Bridge's checkpointing module; megatron-core is unchanged for everyone else:
- the ``rng_state`` load request is aligned with the layout stored in the checkpoint's metadata, so a
  (pp, tp) checkpoint loads under EP > 1, a (pp, tp, dp) one loads under EP == 1, and a DP resize loads;
- the loaded states are handed to Bridge's restore as a list that checks the entry it picks before the first
  RNG source is set, and gives a rank without a stored state its own current (fresh) state;
- while ``_load_checkpoint_from_path`` runs, that module's ``tensor_parallel`` returns a tracker whose
  ``set_states`` converts every state for the tracker in use, as
  ``convert_cuda_rng_state(state, to_graphable=is_graph_safe_cuda_rng_tracker(tracker))`` does, in every restore
  branch; outside loads (every save) the module sees megatron-core's own.
"""

from __future__ import annotations

import functools
import inspect
import logging
import operator
import random
import threading
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np
import torch
import wrapt
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from bridge_rng_patch import compat, probe
from bridge_rng_patch.patcher import Decision, report
from bridge_rng_patch.rng_layout import (
    RNG_STATE_KEY,
    RankCoordinates,
    RngCheckpointError,
    StoredRngLayout,
    read_stored_layout,
)

LOAD_FUNCTION = "_load_checkpoint_from_path"
DIST_LOAD_FUNCTION = "_load_global_dist_base_checkpoint"
# What the dist-load wrapper binds by name; the config parameter is ``cfg`` in 0.1.0a0, ``ckpt_cfg`` later.
_DIST_LOAD_ARGUMENTS = ("load_dir", "rank0", "sharded_state_dict", "iteration", "release")
_WHAT_TO_DO = "no RNG state was restored; resume with load_rng=False to start from fresh RNG state"


class GraphSafeRestoringTracker(wrapt.ObjectProxy):
    """The CUDA RNG tracker in use, converting states it is given to the form it keeps."""

    def set_states(self, states: Mapping[str, Any]) -> None:
        try:
            named_states = states.items()
        except AttributeError:
            raise RngCheckpointError(
                f"rng_tracker_states is a {type(states).__name__}, expected a dict; {_WHAT_TO_DO}"
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


class BridgeTensorParallel(wrapt.ObjectProxy):
    """``megatron.core.tensor_parallel`` as Bridge's checkpointing module sees it while it loads a checkpoint."""

    def __init__(self, tensor_parallel: ModuleType) -> None:
        super().__init__(tensor_parallel)
        self._self_tracker: Any = None
        self._self_restoring_tracker: GraphSafeRestoringTracker | None = None

    def get_cuda_rng_tracker(self, *args: Any, **kwargs: Any) -> GraphSafeRestoringTracker:
        """The converting proxy of the tracker in use; made again only when megatron-core's tracker changes."""
        tracker = self.__wrapped__.get_cuda_rng_tracker(*args, **kwargs)
        if tracker is not self._self_tracker:
            self._self_tracker, self._self_restoring_tracker = tracker, GraphSafeRestoringTracker(tracker)
        return self._self_restoring_tracker


def _is_byte_tensor(value: Any, size: int | None = None) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.dtype is torch.uint8
        and value.dim() == 1
        and (value.numel() > 0 if size is None else value.numel() == size)
    )


@functools.cache
def _cpu_rng_state_size() -> int:
    return torch.get_rng_state().numel()


# What Bridge's restore sets, in its order, with what each must be.
_EXPECTED = {
    "random_rng_state": "a random.getstate() tuple",
    "np_rng_state": "a numpy.random.get_state() tuple",
    "torch_rng_state": "torch.get_rng_state()'s ByteTensor",
    "cuda_rng_state": "a CUDA RNG ByteTensor",
    "rng_tracker_states": "a non-empty dict of CUDA RNG states (ByteTensor or Generator)",
}
_entry_values = operator.itemgetter(*_EXPECTED)  # in that order; a KeyError names the first key missing


def rng_entry_problem(entry: Any) -> str | None:
    """What keeps ``entry`` from being restored whole, said after the entry's name; None when nothing does.

    Runs at every restore, so it is one function with no loop over keys, and a message is only built for an
    entry that fails.
    """
    if not isinstance(entry, Mapping):
        return f" is a {type(entry).__name__}, expected a dict of RNG states"
    try:
        python_state, numpy_state, cpu_state, cuda_state, tracker_states = _entry_values(entry)
    except KeyError as missing:
        return f" has no {missing}"
    valid = (
        isinstance(python_state, tuple) and len(python_state) == 3 and isinstance(python_state[1], tuple),
        isinstance(numpy_state, tuple) and len(numpy_state) == 5 and numpy_state[0] == "MT19937",
        _is_byte_tensor(cpu_state, _cpu_rng_state_size()),
        _is_byte_tensor(cuda_state),
        isinstance(tracker_states, Mapping)
        and len(tracker_states) > 0
        and all(_is_byte_tensor(state) or isinstance(state, torch.Generator) for state in tracker_states.values()),
    )
    if all(valid):
        return None
    key = next(key for key, key_valid in zip(_EXPECTED, valid, strict=True) if not key_valid)
    return f"['{key}'] is {_describe(entry[key])}, expected {_EXPECTED[key]}"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def current_rng_state() -> dict[str, Any]:
    """This rank's live RNG state, in the checkpoint's format: restoring it leaves every source as it is."""
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


class RestorableRngStates(list):
    """A rank's loaded RNG states, checked when Bridge's restore picks one.

    Bridge's restore indexes this list (``[dp_rank]`` or ``[0]``) and then sets python, numpy, torch, CUDA and
    tracker state one after another; checking the picked entry first makes that restore all or nothing. A rank
    the checkpoint holds no state for gets its own current state, so it keeps its fresh RNG.
    """

    def __init__(self, states: list, checkpoint_dir: str, rank: RankCoordinates) -> None:
        super().__init__(states)
        self.checkpoint_dir = checkpoint_dir
        self.rank = rank

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, int):
            return list.__getitem__(self, index)
        try:
            entry = list.__getitem__(self, index)
        except IndexError:
            return self._fresh_state()
        problem = rng_entry_problem(entry)
        if problem is not None:
            where = f"checkpoint {self.checkpoint_dir}: '{RNG_STATE_KEY}'[{index}]"
            raise RngCheckpointError(f"{where}{problem}; {_WHAT_TO_DO}")
        return entry

    def _fresh_state(self) -> dict[str, Any]:
        report(
            f"rank {_global_rank()} (pp {self.rank.pp_rank}, tp {self.rank.tp_rank}, dp {self.rank.dp_rank}): "
            f"checkpoint {self.checkpoint_dir} holds no RNG state for it; it keeps its fresh RNG state",
            logging.WARNING,
            every_rank=True,
        )
        return current_rng_state()


def _global_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _report_layout(stored: StoredRngLayout, requested: ShardedObject, dp_size: int) -> None:
    """One line on rank 0 whenever the stored layout differs from what the running job asked for."""
    running_per_dp_rank = len(requested.global_shape) == 3
    where = f"checkpoint {stored.checkpoint_dir}"
    if running_per_dp_rank and not stored.per_dp_rank:
        report(
            f"{where} stores RNG state {stored.describe()}: it was written without EP-aware sharding and carries "
            "one shared state per (pp, tp), the state of one DP rank (the old bug); every DP rank resumes from "
            "that state, and the next checkpoint stores each rank's own"
        )
    elif stored.per_dp_rank and not running_per_dp_rank:
        report(
            f"{where} stores RNG state {stored.describe()} while this job shards it by (pp, tp) (EP == 1): each "
            "rank restores the state saved at its own (pp, tp, dp) coordinates"
        )
    if stored.per_dp_rank and stored.global_shape[2] != dp_size:
        stored_dp = stored.global_shape[2]
        if dp_size > stored_dp:
            consequence = f"DP ranks {stored_dp}..{dp_size - 1} keep fresh RNG state"
        else:
            consequence = f"the states stored for DP ranks {dp_size}..{stored_dp - 1} go unused"
        report(f"{where} stores RNG state for DP size {stored_dp}, this job runs DP size {dp_size}: {consequence}")


def _stored_layout_read_once_per_job(checkpoint_dir: str) -> StoredRngLayout | None:
    """Rank 0 reads the stored layout and every rank receives it, or the same error.

    One read per checkpoint load, not one per rank of the same file on shared storage; every rank leaves the
    broadcast, whatever rank 0 met, so none is left waiting in a collective.
    """
    distributed = torch.distributed
    if not distributed.is_initialized() or distributed.get_world_size() == 1:
        return read_stored_layout(checkpoint_dir)
    outcome: list[Any] = [None]
    if distributed.get_rank() == 0:
        try:
            outcome[0] = read_stored_layout(checkpoint_dir)
        except RngCheckpointError as error:
            outcome[0] = error
        except Exception as error:
            outcome[0] = RngCheckpointError(f"checkpoint {checkpoint_dir}: its RNG layout cannot be read: {error!r}")
    distributed.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], RngCheckpointError):
        raise outcome[0]
    return outcome[0]


class LayoutAwareDistLoad:
    """The ``_load_global_dist_base_checkpoint`` wrapper: ask for the RNG shard the checkpoint stores."""

    def __init__(self, checkpointing: ModuleType) -> None:
        self._checkpointing = checkpointing
        self._signature = inspect.signature(getattr(checkpointing, DIST_LOAD_FUNCTION))

    def __call__(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        call = self._signature.bind(*args, **kwargs).arguments
        sharded_state_dict = call.get("sharded_state_dict")
        request = sharded_state_dict.get(RNG_STATE_KEY) if isinstance(sharded_state_dict, dict) else None
        if call.get("rank0") or not isinstance(request, ShardedObject):
            return wrapped(*args, **kwargs)
        checkpoint_dir = str(
            self._checkpointing.get_checkpoint_name(call["load_dir"], call["iteration"], call["release"])
        )
        stored = _stored_layout_read_once_per_job(checkpoint_dir)
        if stored is None:
            raise RngCheckpointError(f"checkpoint {checkpoint_dir} stores no '{RNG_STATE_KEY}'; {_WHAT_TO_DO}")
        dp_size = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        _report_layout(stored, request, dp_size)
        rank = RankCoordinates.of_request(request)
        requests = stored.requests_for(rank, dp_size, request.data)
        del sharded_state_dict[RNG_STATE_KEY]
        sharded_state_dict.update(requests)
        result = wrapped(*args, **kwargs)
        state_dict = result[0]
        own_states = state_dict.get(RNG_STATE_KEY, [])
        for key in requests:
            state_dict.pop(key, None)
        state_dict[RNG_STATE_KEY] = RestorableRngStates(own_states, checkpoint_dir, rank)
        return result


class ConvertingTrackerWhileLoading:
    """The ``_load_checkpoint_from_path`` wrapper: Bridge's module sees the converting ``tensor_parallel`` while
    a load runs (its restore is there), and megatron-core's own otherwise, so that saves pay nothing for it.

    Loads that overlap (nested, or in threads) share one swap: the module gets back what it had when the last
    one ends.
    """

    def __init__(self, checkpointing: ModuleType) -> None:
        self._checkpointing = checkpointing
        self._converting = BridgeTensorParallel(checkpointing.tensor_parallel)
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


class LoadRestorePatch:
    targets = (LOAD_FUNCTION, DIST_LOAD_FUNCTION)

    def decide(self, checkpointing: ModuleType) -> Decision:
        missing = [
            name
            for name in (LOAD_FUNCTION, DIST_LOAD_FUNCTION, "get_checkpoint_name", "tensor_parallel")
            if not hasattr(checkpointing, name)
        ]
        if missing:
            return Decision.refuse(f"{checkpointing.__name__} lacks {', '.join(missing)}")
        load_checkpoint_from_path = getattr(checkpointing, LOAD_FUNCTION)
        # Is the fix already there? Asked first: fixed releases change the dist-load signature too.
        converts = probe.restore_converts_tracker_states(load_checkpoint_from_path)
        if converts:
            return Decision.not_needed("upstream RNG restore already converts tracker states for the tracker in use")
        release_has_fix = probe.bridge_release_has_fix()
        if converts is None and release_has_fix:
            return Decision.by_version(f"the source of {LOAD_FUNCTION}", release_has_fix)
        dist_load = getattr(checkpointing, DIST_LOAD_FUNCTION)
        unbound = probe.missing_parameters(dist_load, _DIST_LOAD_ARGUMENTS)
        if unbound:
            shown = probe.describe_signature(dist_load)
            return Decision.refuse(f"unknown signature {DIST_LOAD_FUNCTION}{shown}: no {', '.join(unbound)}")
        if converts is None:
            return Decision.by_version(f"the source of {LOAD_FUNCTION}", release_has_fix)
        if not probe.restore_sets_tracker_states(load_checkpoint_from_path):
            return Decision.refuse(f"unexpected RNG restore in {LOAD_FUNCTION}: no 'rng_state' branch with set_states")
        helpers = (
            "megatron-core's"
            if not compat.USES_OWN_HELPERS
            else "bridge_rng_patch's (this megatron-core lacks convert_cuda_rng_state)"
        )
        return Decision.apply(f"restore sets tracker states unconverted and reads one layout; using {helpers} helpers")

    def instrument(self, checkpointing: ModuleType) -> None:
        wrapt.wrap_function_wrapper(checkpointing, LOAD_FUNCTION, ConvertingTrackerWhileLoading(checkpointing))
        wrapt.wrap_function_wrapper(checkpointing, DIST_LOAD_FUNCTION, LayoutAwareDistLoad(checkpointing))


PATCH = LoadRestorePatch()
