"""The one place that applies and undoes the patches and keeps their status.

Each training stack the package knows (``loops.LOOPS``: Megatron-Bridge, Megatron-LM, verl, ms-swift) gets every
patch, applied once when its checkpointing module is imported (or at once if it already is), each only after it
has probed that stack's installed code. A patch that cannot apply says why and leaves the module untouched. Undo
puts back the exact original objects. Nothing heavy is imported here: the patch modules, and with them wrapt, torch and
megatron, are imported only when a target module is.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple, Protocol

from bridge_rng_patch.decision import APPLIED, DISABLED, PENDING, UNDONE, Decision, report
from bridge_rng_patch.loops import LOOPS, TrainingLoop

DISABLE_ENV = "BRIDGE_RNG_PATCH_DISABLE"

# name -> what it does; each name is also the module that holds the patch: one per upstream fix, then the resume
# audit, which checks across ranks what they restored. Applied in this order and undone in the reverse one (the audit
# wraps the restore function that tracker_restore may have wrapped first).
PATCHES = {
    "save_sharding": "get_rng_state shards the saved RNG state by (pp, tp, dp) when EP > 1",
    "tracker_restore": "the RNG restore converts tracker states to the form the tracker in use keeps",
    "layout_load": "the RNG load asks for the layout the checkpoint stores; the entry restored is checked first",
    "resume_audit": "after a resume, rank 0 logs whether every rank holds the RNG state it should",
}
_LOOPS_BY_MODULE = {loop.module: loop for loop in LOOPS}


class PatchStatus(NamedTuple):
    name: str
    summary: str
    state: str
    reason: str
    versions: Mapping[str, str]
    loop: str


class Patch(Protocol):
    """One patch: the attribute paths it wraps in the stack's module (``targets.py``), a probe that decides, and the
    replacement."""

    def targets(self, loop: TrainingLoop, checkpointing: ModuleType) -> tuple[str, ...]: ...

    def decide(self, loop: TrainingLoop, checkpointing: ModuleType) -> Decision: ...

    def instrument(self, loop: TrainingLoop, checkpointing: ModuleType) -> None: ...


def _waiting_for(loop: TrainingLoop) -> Decision:
    return Decision(PENDING, f"waiting for {loop.module} to be imported")


_lock = threading.RLock()
_states: dict[tuple[str, str], Decision] = {(loop.name, name): _waiting_for(loop) for loop in LOOPS for name in PATCHES}
_originals: dict[tuple[str, str], list[Any]] = {}
_versions: dict[str, str] = {}
_switched_off = False


class _PostImportHook:
    """Patches a target module right after it has executed, like wrapt's ``register_post_import_hook``.

    wrapt's own hook would import wrapt at ``import bridge_rng_patch``, which costs 40-60 ms with wrapt 2
    (it imports asyncio); wrapt is imported only when patching, after Megatron's seconds-long import.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        loop = _LOOPS_BY_MODULE.get(fullname)
        if loop is None:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = None if finder is self or find_spec is None else find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                _patch_after_execution(loop, spec.loader)
                return spec
        return None


def _patch_after_execution(loop: TrainingLoop, loader: Any) -> None:
    execute = loader.exec_module

    def execute_then_patch(module: ModuleType) -> None:
        execute(module)
        _on_checkpointing_imported(loop, module)

    loader.exec_module = execute_then_patch


_hook = _PostImportHook()


def disabled_by_environment() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def install() -> None:
    """Arrange for the patches to apply when a training loop's checkpointing module is imported."""
    global _switched_off
    with _lock:
        if disabled_by_environment():
            for key, decision in _states.items():
                if decision.state in (PENDING, UNDONE):
                    _record(key, Decision(DISABLED, f"{DISABLE_ENV} is set"))
            return
        _switched_off = False
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


def _on_checkpointing_imported(loop: TrainingLoop, checkpointing: ModuleType) -> None:
    if not _switched_off and not disabled_by_environment():
        _apply_all(loop, checkpointing)


def _apply_all(loop: TrainingLoop, checkpointing: ModuleType) -> None:
    with _lock:
        for name in PATCHES:
            if _states[(loop.name, name)].state in (PENDING, UNDONE):
                _apply_one(loop, name, checkpointing)


def _apply_one(loop: TrainingLoop, name: str, checkpointing: ModuleType) -> None:
    key = (loop.name, name)
    try:
        patch: Patch = importlib.import_module(f"bridge_rng_patch.{name}").PATCH
        decision = patch.decide(loop, checkpointing)
    except Exception as error:  # a probe that breaks must leave the loop as it is
        _record(key, Decision.refuse(f"probing the installed code failed: {error!r}"))
        return
    if decision.state == APPLIED:
        from bridge_rng_patch import targets

        originals = [targets.save(checkpointing, path) for path in patch.targets(loop, checkpointing)]
        try:
            patch.instrument(loop, checkpointing)
        except Exception as error:
            for saved in reversed(originals):
                saved.put_back()
            decision = Decision.refuse(f"instrumenting failed, module left untouched: {error!r}")
        else:
            _originals[key] = originals
    _record(key, decision)


def _record(key: tuple[str, str], decision: Decision) -> None:
    _states[key] = decision
    loop, name = key
    report(f"{loop} {name}: {decision.state}: {decision.reason}")
