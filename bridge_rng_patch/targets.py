"""Where a patch puts its wrapper: an attribute path in a stack's module, resolved alike for every stack: a function, a
method of one of its classes, or a function of a module it calls through its own global (ms-swift's
``dist_checkpointing.load``), wrapped on a view of that shared module for this stack alone. Undo puts back exactly.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

_ABSENT = object()


class ModuleSeenByOneStack:
    """A shared module as one stack sees it: a setattr here stays here (wrapt's proxy would pass it on)."""

    def __init__(self, module: ModuleType) -> None:
        self.__dict__["_shared_module"] = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._shared_module, name)


class Saved(NamedTuple):
    """What stood at one attribute before a patch: on ``owner``, under ``name`` (``_ABSENT``: nothing of its own)."""

    owner: Any
    name: str
    value: Any

    def put_back(self) -> None:
        if self.value is _ABSENT:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self.value)


def lookup(module: ModuleType, path: str) -> Any:
    found: Any = module
    for part in path.split("."):
        found = getattr(found, part)
    return found


def is_method(module: ModuleType, path: str) -> bool:
    """Whether ``path`` names a function defined on a class: called bound, its first parameter is the instance."""
    head = path.rpartition(".")[0]
    return bool(head) and isinstance(lookup(module, head), type)


def save(module: ModuleType, path: str) -> Saved:
    first, _, rest = path.partition(".")
    through = vars(module).get(first)
    if rest and isinstance(through, ModuleType):
        return Saved(module, first, through)
    head, _, name = path.rpartition(".")
    owner = lookup(module, head) if head else module
    return Saved(owner, name, vars(owner).get(name, _ABSENT))


def wrap(module: ModuleType, path: str, wrapper: Any) -> None:
    """Put ``wrapper`` (wrapt's ``(wrapped, instance, args, kwargs)``) around the function at ``path``."""
    import wrapt  # imported where a patch applies: the status and the inspector need the look-ups only

    first, _, rest = path.partition(".")
    through = vars(module).get(first)
    if rest and isinstance(through, ModuleType):
        through = ModuleSeenByOneStack(through)
        setattr(module, first, through)
    if rest and isinstance(through, ModuleSeenByOneStack):
        wrapt.wrap_function_wrapper(through, rest, wrapper)
        return
    wrapt.wrap_function_wrapper(module, path, wrapper)


def take_out(saved: Saved, proxy: Any) -> Any:
    """Take ``proxy`` out from under the wrappers put on since; returns the one over it, or None if outermost."""
    current = vars(saved.owner).get(saved.name)
    if current is proxy:
        saved.put_back()
        return None
    above = current
    while above.__wrapped__ is not proxy:
        above = above.__wrapped__
    above.__wrapped__ = proxy.__wrapped__
    return above
