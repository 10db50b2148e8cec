"""The one place that applies and undoes the patches and keeps their status.

When a stack's checkpointing module is imported (or at once if it already is), its declaration (``loops.LOOPS``) is
resolved once (``probe.InstalledStack``) and handed, with one resume context for the stack, to every patch, which
returns its plan: a decision and the wrappers that carry it out. The plans are carried out here, in a declared and
checked order; a patch that cannot apply says why and leaves the module untouched, and undo puts back the exact
original objects. A wrapper on another module of the stack (its set-up, its training step) goes on when that module
has finished executing, which may be after the checkpointing module it imports. ``BRIDGE_RNG_PATCH_DISABLE``
switches every patch off (1) or those it names (NAME[,NAME]). Nothing heavy is imported here: the patch modules, and
with them wrapt, torch and megatron, are imported only when a target module is.
"""

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
    DISABLE_ENV,
    DISABLED,
    PENDING,
    UNDONE,
    Decision,
    Plan,
    Wrapping,
    disabled_patches,
    report,
)
from bridge_rng_patch.loops import DATA_INIT_CALLBACKS, LAYOUT_LOAD, LOOPS, SAVE_SHARDING, TRACKER_RESTORE, TrainingLoop

KEEP_RESTORED, RESUME_AUDIT = "keep_restored", "resume_audit"
# name -> what it does; each name is also the module that holds the patch (its ``plan(stack, context)``): one per
# upstream fix, then the resume audit, which checks across ranks what they restored. Applied in this order, each
# wrapping what those before it left, and undone in the reverse one; a wrapper that must see a call before another
# patch's says so (``Wrapping.outside``), and applying checks it against this order.
PATCHES = {
    SAVE_SHARDING: "get_rng_state saves every DP rank's RNG state, in the release's own layout, when EP > 1",
    TRACKER_RESTORE: "the RNG restore converts tracker states to the form the tracker in use keeps",
    LAYOUT_LOAD: "the RNG load asks for the layout the checkpoint stores; the entry restored is checked first",
    DATA_INIT_CALLBACKS: "data-init callbacks fired after the load leave every RNG source as they found it",
    KEEP_RESTORED: "after a resume, building the data iterators (and re-seeds around them) leaves the restored state",
    RESUME_AUDIT: "after a resume, and again at its first training step, rank 0 logs whether every rank holds the RNG "
    "state it should",
}
_ORDER = {name: position for position, name in enumerate(PATCHES)}
_LOOPS_BY_MODULE = {loop.module: loop for loop in LOOPS}
# Every module a wrapper may go on besides the checkpointing modules: watched from the start, because a stack's set-up
# module imports its checkpointing module while it executes, before its own functions exist.
_OTHER_MODULES = frozenset(
    target.module
    for loop in LOOPS
    for target in (
        *loop.before_first_step.keeps_restored,
        loop.before_first_step.first_step,
        loop.before_first_step.data_init_callbacks,
    )
    if target is not None
)


class PatchStatus(NamedTuple):
    name: str
    summary: str
    state: str
    reason: str
    versions: Mapping[str, str]
    loop: str


def _waiting_for(loop: TrainingLoop) -> Decision:
    return Decision(PENDING, f"waiting for {loop.module} to be imported")


_lock = threading.RLock()
_states: dict[tuple[str, str], Decision] = {(loop.name, name): _waiting_for(loop) for loop in LOOPS for name in PATCHES}
_originals: dict[tuple[str, str], list[Any]] = {}
# module name -> (loop, patch) and the wrapping that goes on when the module has finished executing.
_waiting: dict[str, list[tuple[tuple[str, str], Wrapping]]] = {}
_versions: dict[str, str] = {}
_switched_off = False


class _PostImportHook:
    """Patches a stack's checkpointing module right after it has executed, like wrapt's
    ``register_post_import_hook``: the spec found for it gets a loader that wraps the one found.

    wrapt's own hook would import wrapt at ``import bridge_rng_patch``, which costs 40-60 ms with wrapt 2
    (it imports asyncio); wrapt is imported only when patching, after Megatron's seconds-long import.
    """

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
    """The loader found for one stack's module, wrapped: it executes the module, then patches it. The found loader
    is never edited: one loader may serve many modules (a zipimporter serves every module of its archive)."""

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
        if disabled_patches(tuple(PATCHES)) >= PATCHES.keys():
            for key, decision in _states.items():
                if decision.state in (PENDING, UNDONE):
                    _record(key, Decision(DISABLED, f"{DISABLE_ENV} is set"))
            return
        _switched_off = False
        for name in sorted(disabled_patches(tuple(PATCHES)) - PATCHES.keys()):
            report(f"{DISABLE_ENV} names {name!r}, which is no patch of bridge_rng_patch ({', '.join(PATCHES)})")
        for loop in LOOPS:
            checkpointing = sys.modules.get(loop.module)
            if checkpointing is not None:
                _on_checkpointing_imported(loop, checkpointing)
            else:  # switched on again before the import: its patches wait for it
                for name in PATCHES:
                    if _states[(loop.name, name)].state == UNDONE:
                        _states[(loop.name, name)] = _waiting_for(loop)
        if _hook not in sys.meta_path:
            sys.meta_path.insert(0, _hook)


def apply() -> tuple[PatchStatus, ...]:
    """Apply every patch the installed code needs (again, after ``undo``); returns the status."""
    install()
    return status()


def undo() -> tuple[PatchStatus, ...]:
    """Put back the original functions and switch the package off until ``apply`` is called."""
    global _switched_off
    with _lock:
        _switched_off = True
        for loop in LOOPS:
            for name in reversed(PATCHES):
                key = (loop.name, name)
                for waiting in _waiting.values():
                    waiting[:] = [(waiting_key, wrapping) for waiting_key, wrapping in waiting if waiting_key != key]
                originals = _originals.pop(key, None)
                if originals is not None:
                    for saved in reversed(originals):
                        saved.put_back()
                    _record(key, Decision(UNDONE, "original functions restored"))
                elif _states[key].state == PENDING:
                    _record(key, Decision(UNDONE, f"switched off before {loop.module} was imported"))
    return status()


def status(loop: str | None = None) -> tuple[PatchStatus, ...]:
    """Per loop and patch: applied / not needed / disabled / refused / pending / undone, why, and the versions
    found; only ``loop``'s ("Megatron-Bridge", "Megatron-LM", "verl", "ms-swift") where it is given."""
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
    loop = _LOOPS_BY_MODULE.get(module.__name__)
    if loop is not None:
        _on_checkpointing_imported(loop, module)
    with _lock:
        for key, wrapping in _waiting.pop(module.__name__, []):
            _wrap_elsewhere(key, module, wrapping)


def _on_checkpointing_imported(loop: TrainingLoop, checkpointing: ModuleType) -> None:
    if not _switched_off:
        _apply_all(loop, checkpointing)


def _executed(name: str) -> ModuleType | None:
    """The module ``name`` once it has finished executing; None before (or while) it does."""
    module = sys.modules.get(name)
    if module is None or getattr(getattr(module, "__spec__", None), "_initializing", False):
        return None
    return module


def _wrap_elsewhere(key: tuple[str, str], module: ModuleType, wrapping: Wrapping) -> None:
    """Put a wrapper on another module of the stack; a function this release does not have there is left, said once."""
    from bridge_rng_patch import targets

    try:
        targets.lookup(module, wrapping.path)
    except AttributeError:
        report(f"{key[0]} {key[1]}: {module.__name__} has no {wrapping.path} in this release; nothing to wrap there")
        return
    saved = targets.save(module, wrapping.path)
    try:
        targets.wrap(module, wrapping.path, wrapping.wrapper)
    except Exception as error:  # the module stays as it was; the patch's other wrappers stay on
        saved.put_back()
        report(f"{key[0]} {key[1]}: wrapping {module.__name__}.{wrapping.path} failed, left untouched: {error!r}")
        return
    _originals.setdefault(key, []).append(saved)


def _apply_all(loop: TrainingLoop, checkpointing: ModuleType) -> None:
    """Resolve the stack once, hand it and one resume context to every patch's plan, and carry out each plan."""
    with _lock:
        waiting = [name for name in PATCHES if _states[(loop.name, name)].state in (PENDING, UNDONE)]
        if not waiting:
            return
        from bridge_rng_patch.probe import InstalledStack
        from bridge_rng_patch.resume_context import ResumeContext

        stack, context = InstalledStack(loop, checkpointing), ResumeContext()
        disabled = disabled_patches(tuple(PATCHES))
        why_disabled = f"{DISABLE_ENV} is set" if disabled >= PATCHES.keys() else f"{DISABLE_ENV} names it"
        for name in waiting:
            key = (loop.name, name)
            if name in disabled:
                _record(key, Decision(DISABLED, why_disabled))
                continue
            try:
                plan: Plan = importlib.import_module(f"bridge_rng_patch.{name}").plan(stack, context)
            except Exception as error:  # a probe that breaks must leave the loop as it is
                _record(key, Decision.refuse(f"probing the installed code failed: {error!r}"))
                continue
            _record(key, _carry_out(key, checkpointing, plan) if plan.decision.state == APPLIED else plan.decision)


def _carry_out(key: tuple[str, str], checkpointing: ModuleType, plan: Plan) -> Decision:
    """Put the plan's wrappers on, or none of them; what each replaces is kept for undo."""
    from bridge_rng_patch import targets

    name = key[1]
    applied_after = sorted(
        {other for wrapping in plan.wrappings for other in wrapping.outside if _ORDER[other] > _ORDER[name]}
    )
    if applied_after:
        return Decision.refuse(f"its wrappers must wrap those of {', '.join(applied_after)}, applied after it")
    originals = []
    try:
        for wrapping in plan.wrappings:
            if wrapping.module is None:
                originals.append(targets.save(checkpointing, wrapping.path))
                targets.wrap(checkpointing, wrapping.path, wrapping.wrapper)
    except Exception as error:
        for saved in reversed(originals):
            saved.put_back()
        return Decision.refuse(f"instrumenting failed, module left untouched: {error!r}")
    _originals[key] = originals
    for wrapping in plan.wrappings:
        if wrapping.module is not None:
            elsewhere = _executed(wrapping.module)
            if elsewhere is None:
                _waiting.setdefault(wrapping.module, []).append((key, wrapping))
            else:
                _wrap_elsewhere(key, elsewhere, wrapping)
    return plan.decision


def _record(key: tuple[str, str], decision: Decision) -> None:
    _states[key] = decision
    loop, name = key
    report(f"{loop} {name}: {decision.state}: {decision.reason}")
