"""What a stack's resumes do, noted once for every patch that acts on it, whoever restored the RNG state (the
package's stored-layout load or the release's own). The patcher puts the watch's wrappers on the resume function and
the loads after every patch's, so that they see each call first: the request as the loop built it.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from bridge_rng_patch.decision import Wrapping
from bridge_rng_patch.loops import LoadFunction
from bridge_rng_patch.rng_layout import RNG_STATE_KEY

if TYPE_CHECKING:
    from bridge_rng_patch.probe import InstalledStack

_signature = functools.cache(inspect.signature)


class Handed(NamedTuple):
    """What the stored-layout load handed a rank's restore: whose state, the entry, whether the run gathers."""

    kind: str
    entry: Mapping[str, Any]
    data_parallel_random_init: bool


class LoadCall:
    """One call of a stack's checkpoint load, bound by name once: its arguments, its request, the RNG request in it."""

    def __init__(self, stack: InstalledStack, load: LoadFunction, arguments: dict[str, Any]) -> None:
        self.stack, self.load, self.arguments = stack, load, arguments
        self.request: dict = arguments[load.request]
        self.rng_request = self.request.get(RNG_STATE_KEY)  # None for none (Bridge keeps the key, set to None)

    @classmethod
    def bind(cls, stack: InstalledStack, load: LoadFunction, args: tuple, kwargs: dict) -> LoadCall | None:
        """The call, or None for one that loads no ranks' state dict (Bridge's ``rank0`` read of the args)."""
        arguments = _signature(stack.function(load.path)).bind(*args, **kwargs).arguments
        if arguments.get("rank0") or not isinstance(arguments.get(load.request), dict):
            return None
        return cls(stack, load, arguments)

    def checkpoint_dir(self, result: Any = None) -> str | None:
        """Where the release loads from: the argument naming it, an override, ``get_checkpoint_name``, or the result."""
        arguments, load = self.arguments, self.load
        if load.checkpoint is not None:
            return str(arguments[load.checkpoint])
        if arguments.get("checkpoint_path_override") is not None:
            return str(arguments["checkpoint_path_override"])
        if "iteration" in load.named_by:
            base_dir = {"return_base_dir": True} if self.stack.names_base_dir else {}
            load_dir, iteration, release = (arguments["load_dir"], arguments["iteration"], arguments["release"])
            return str(self.stack.module.get_checkpoint_name(load_dir, iteration, release, **base_dir))
        return str(result[1]) if isinstance(result, tuple) and len(result) > 1 and result[1] else None

    def state_dict(self, result: Any) -> Any:
        return result[0] if self.load.returns_tuple else result


class ResumeWatch:
    """One stack's resumes: how many run, the latest's loads, and whether one restored RNG state before training."""

    def __init__(self, stack: InstalledStack) -> None:
        self._stack = stack
        self._lock = threading.Lock()
        self.resumes_running = 0
        self.before_first_step = False
        self._begin()

    def _begin(self) -> None:
        self.loads, self.rng_requested, self.checkpoint_dir, self.handed = (0, False, None, None)

    def lacks(self) -> str | None:
        loop, stack = self._stack.loop, self._stack
        lacks = stack.lacks(loop.resume_function, loop.dist_load.path)
        return lacks or next(filter(None, (stack.unbound(load, (load.request,)) for load in stack.loads)), None)

    def wrappings(self) -> tuple[Wrapping, ...]:
        notes = (Wrapping(load.path, functools.partial(self._noting_load, load)) for load in self._stack.loads)
        return (*notes, Wrapping(self._stack.loop.resume_function, self.noting_resume))

    def noting_resume(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        """A resume that asked for RNG state restored it; a later one that asks for none leaves that noted."""
        with self._lock:
            outermost = self.resumes_running == 0
            if outermost:
                self._begin()
            self.resumes_running += 1
        try:
            result = wrapped(*args, **kwargs)
        finally:
            with self._lock:
                self.resumes_running -= 1
        if outermost and self.rng_requested:
            self.before_first_step = True
        return result

    def _noting_load(self, load: LoadFunction, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        """Whether a load asks for RNG state, from the request the loop built (the same on every rank), and where."""
        call = LoadCall.bind(self._stack, load, args, kwargs)
        if call is None:
            return wrapped(*args, **kwargs)
        result = wrapped(*args, **kwargs)
        self.loads += 1
        self.rng_requested = self.rng_requested or call.rng_request is not None
        self.checkpoint_dir = call.checkpoint_dir(result) or self.checkpoint_dir
        return result

    def note_handed(self, handed: Handed) -> None:
        self.handed = handed

    def note_first_step(self) -> None:
        self.before_first_step = False
