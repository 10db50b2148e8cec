"""The one place that applies and undoes the patches and keeps their status: each stack resolved once, with its resume
watch, handed to every patch, whose plan is carried out in ``PATCHES`` order; then the watch, outermost, where a plan
acts on it. Nothing heavy is imported here: the patches, with wrapt, torch and megatron, come with a stack's module."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple

from bridge_rng_patch.decision import (
    APPLIED,
    DISABLED,
    PENDING,
    REFUSED,
    UNDONE,
    Decision,
    Plan,
    Wrapping,
    disabled_patches,
    report,
)
from bridge_rng_patch.decision import DISABLE_ENV as _DISABLE
from bridge_rng_patch.loops import LOOPS, PATCHES, TrainingLoop

_WATCH = "resume watch"  # the key of a stack's watch among what undo puts back, undone before its patches
_LOOPS_BY_MODULE = {loop.module: loop for loop in LOOPS}
# Watched from the start: a stack's set-up module imports its checkpointing module before its own functions exist.
_OTHER_MODULES = frozenset(module for loop in LOOPS for module in loop.before_first_step.modules)


class PatchStatus(NamedTuple):
    name: str
    summary: str
    state: str
    reason: str
    versions: Mapping[str, str]
    loop: str


class _Placed(NamedTuple):
    """A wrapper put on (``proxy``), and what stood there before (``targets.Saved``)."""

    saved: Any
    proxy: Any


def _waiting_for(loop: TrainingLoop) -> Decision:
    return Decision(PENDING, f"waiting for {loop.module} to be imported")


_lock = threading.RLock()
_states: dict[tuple[str, str], Decision] = {(loop.name, name): _waiting_for(loop) for loop in LOOPS for name in PATCHES}
_placed: dict[tuple[str, str], list[_Placed]] = {}  # per (loop, patch or watch), in the order put on
# A patch whose wrappers await other modules: its decision once they are on; the wrappings each module awaits.
_awaiting: dict[tuple[str, str], Decision] = {}
_waiting: dict[str, list[tuple[tuple[str, str], Wrapping]]] = {}
_versions: dict[str, str] = {}
_switched_off = False


class _PostImportHook:
    """Patches a stack's module once it has executed, as wrapt's post-import hook (which imports asyncio) would."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in _LOOPS_BY_MODULE and fullname not in _OTHER_MODULES:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = None if finder is self or find_spec is None else find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader:
    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        create_module = getattr(self._loader, "create_module", None)
        return None if create_module is None else create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The module is the found loader's, as it would be without the hook.
        if getattr(module, "__loader__", None) in (None, self):
            module.__loader__ = self._loader
        if getattr(getattr(module, "__spec__", None), "loader", None) is self:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _on_module_imported(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


_hook = _PostImportHook()


def install() -> None:
    """Arrange for the patches to apply when a training loop's checkpointing module is imported."""
    global _switched_off
    with _lock:
        disabled = disabled_patches(tuple(PATCHES))
        if disabled >= PATCHES.keys():
            for key, decided in _states.items():
                if decided.state in (PENDING, UNDONE) and key not in _placed:
                    _record(key, Decision(DISABLED, f"{_DISABLE} is set"))
            return
        _switched_off = False
        for name in sorted(disabled - PATCHES.keys()):
            report(f"{_DISABLE} names {name!r}, which is no patch of bridge_rng_patch ({', '.join(PATCHES)})")
        for loop in LOOPS:
            checkpointing = sys.modules.get(loop.module)
            if checkpointing is not None:
                _apply_all(loop, checkpointing)
            else:  # switched on again before the import: its patches wait for it
                for name in PATCHES:
                    if _states[(loop.name, name)].state == UNDONE:
                        _states[(loop.name, name)] = _waiting_for(loop)
        if _hook not in sys.meta_path:
            sys.meta_path.insert(0, _hook)


def apply() -> tuple[PatchStatus, ...]:
    install()
    return status()


def undo() -> tuple[PatchStatus, ...]:
    """Put back the original functions and switch the package off until ``apply`` is called."""
    global _switched_off
    with _lock:
        _switched_off = True
        _waiting.clear()
        _awaiting.clear()
        for loop in LOOPS:
            for name in (_WATCH, *reversed(PATCHES)):
                key = (loop.name, name)
                placed = _placed.pop(key, None)
                for wrapper in reversed(placed or []):
                    wrapper.saved.put_back()
                if name != _WATCH and placed is not None:
                    _record(key, Decision(UNDONE, "original functions restored"))
                elif name != _WATCH and _states[key].state == PENDING:
                    _record(key, Decision(UNDONE, f"switched off before {loop.module} was imported"))
    return status()


def status(loop: str | None = None) -> tuple[PatchStatus, ...]:
    """Per loop (or ``loop``'s alone) and patch: its state, why, and the versions found."""
    with _lock:
        if not _versions:
            from bridge_rng_patch.probe import installed_versions

            _versions.update(installed_versions())
        return tuple(
            PatchStatus(name, summary, *_states[(each.name, name)], dict(_versions), each.name)
            for each in LOOPS
            if loop is None or each.name == loop
            for name, summary in PATCHES.items()
        )


def loop_installed(loop: TrainingLoop) -> bool:
    """Whether the loop's training package can be imported here at all, found without importing it."""
    try:
        return importlib.util.find_spec(loop.package) is not None
    except (ImportError, ValueError):
        return False


def _on_module_imported(module: ModuleType) -> None:
    with _lock:
        loop = _LOOPS_BY_MODULE.get(module.__name__)
        if loop is not None and not _switched_off:
            _apply_all(loop, module)
        _wrap_awaited(module)


def _apply_all(loop: TrainingLoop, checkpointing: ModuleType) -> None:
    """Every patch's plan from the stack resolved once and its watch, carried out; then the watch, where acted on."""
    names = [name for name in PATCHES if _states[(loop.name, name)].state in (PENDING, UNDONE)]
    if not (names := [name for name in names if (loop.name, name) not in _placed]):
        return
    from bridge_rng_patch.probe import InstalledStack
    from bridge_rng_patch.resume import ResumeWatch

    stack = InstalledStack(loop, checkpointing)
    watch = ResumeWatch(stack)
    disabled = disabled_patches(tuple(PATCHES))
    why_disabled = f"{_DISABLE} is set" if disabled >= PATCHES.keys() else f"{_DISABLE} names it"
    watched = []
    for name in names:
        key = (loop.name, name)
        if name in disabled:
            _record(key, Decision(DISABLED, why_disabled))
            continue
        try:
            plan: Plan = importlib.import_module(f"bridge_rng_patch.{name}").plan(stack, watch)
        except Exception as error:  # a probe that breaks must leave the loop as it is
            _record(key, Decision.refuse(f"probing the installed code failed: {error!r}"))
            continue
        if plan.decision.state != APPLIED:
            _record(key, plan.decision)
        elif plan.watched and watch.lacks():  # the patch acts on what the watch notes: no watch, no patch
            _record(key, Decision.refuse(watch.lacks()))
        else:
            watched += [key] if plan.watched else []
            _carry_out(key, checkpointing, plan)
    if any(_states[key].state != REFUSED for key in watched):
        try:
            _put_on((loop.name, _WATCH), checkpointing, watch.wrappings())
        except Exception as error:
            for key in watched:
                _refuse_carried(key, f"the resume watch it acts on could not go on: {error!r}")


def _put_on(key: tuple[str, str], module: ModuleType, wrappings: tuple[Wrapping, ...]) -> None:
    from bridge_rng_patch import targets

    placed = []
    try:
        for wrapping in wrappings:
            saved = targets.save(module, wrapping.path)
            targets.wrap(module, wrapping.path, wrapping.wrapper)
            placed.append(_Placed(saved, targets.lookup(module, wrapping.path)))
    except Exception:
        for wrapper in reversed(placed):
            wrapper.saved.put_back()
        raise
    _placed.setdefault(key, []).extend(placed)


def _carry_out(key: tuple[str, str], checkpointing: ModuleType, plan: Plan) -> None:
    """The plan's wrappers on the checkpointing module, all or none; on other modules once they are imported."""
    try:
        _put_on(key, checkpointing, tuple(wrapping for wrapping in plan.wrappings if wrapping.module is None))
    except Exception as error:
        _record(key, Decision.refuse(f"instrumenting failed, module left untouched: {error!r}"))
        return
    _awaiting[key] = plan.decision
    for wrapping in plan.wrappings:
        if wrapping.module is not None:
            _waiting.setdefault(wrapping.module, []).append((key, wrapping))
    for name in sorted({wrapping.module for wrapping in plan.wrappings if wrapping.module is not None}):
        module = _executed(name)
        if module is not None:
            _wrap_awaited(module, record=False)
    if key in _awaiting:
        _record(key, _awaited_state(key))


def _wrap_awaited(module: ModuleType, record: bool = True) -> None:
    """The wrappers awaiting ``module``; a patch whose function it lacks is refused, its wrappers taken off."""
    from bridge_rng_patch import targets

    touched = []
    for key, wrapping in _waiting.pop(module.__name__, []):
        if key not in _awaiting:  # refused meanwhile
            continue
        touched.append(key)
        try:
            targets.lookup(module, wrapping.path)
        except AttributeError:
            _refuse_carried(key, f"{module.__name__} has no {wrapping.path} in this release")
            continue
        try:
            _put_on(key, module, (wrapping,))
        except Exception as error:
            _refuse_carried(key, f"wrapping {module.__name__}.{wrapping.path} failed: {error!r}")
    for key in dict.fromkeys(touched):
        if record and key in _awaiting:
            decided = _awaited_state(key)
            _record(key, decided, quiet=decided.state == PENDING)


def _awaited_state(key: tuple[str, str]) -> Decision:
    """A carried-out plan's state: its decision once every wrapper is on, else the modules it waits for."""
    modules = sorted({wrapping.module for waiting in _waiting.values() for k, wrapping in waiting if k == key})
    if not modules:
        return _awaiting.pop(key)
    return Decision(PENDING, f"waiting for {', '.join(modules)} to be imported; then: {_awaiting[key].reason}")


def _executed(name: str) -> ModuleType | None:
    module = sys.modules.get(name)
    if module is None or getattr(getattr(module, "__spec__", None), "_initializing", False):
        return None
    return module


def _refuse_carried(key: tuple[str, str], reason: str) -> None:
    """Refuse a patch carried out: its wrappers come off; those put on since stay, and undo still puts back all."""
    from bridge_rng_patch import targets

    _awaiting.pop(key, None)
    for waiting in _waiting.values():
        waiting[:] = [(waiting_key, wrapping) for waiting_key, wrapping in waiting if waiting_key != key]
    for placed in reversed(_placed.pop(key, [])):
        above = targets.take_out(placed.saved, placed.proxy)
        if above is not None:
            for others in _placed.values():
                others[:] = [other._replace(saved=placed.saved) if other.proxy is above else other for other in others]
    _record(key, Decision.refuse(reason))


def _record(key: tuple[str, str], decided: Decision, quiet: bool = False) -> None:
    """The state of a patch, and its log line (none where ``quiet``: a patch still waiting, for fewer modules)."""
    if _states.get(key) == decided:
        return
    _states[key] = decided
    if quiet:
        return
    loop, name = key
    report(f"{loop} {name}: {decided.state}: {decided.reason}")
