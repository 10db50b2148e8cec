"""Where a patch puts its wrapper (``targets.py``): a module's function, a method of one of its classes, or a function
of a shared module it calls through its own global, each wrapped and undone alike, and nothing changed for anyone
else. Written on small modules built here; the stacks' real ones are in test_stacks.py."""

from __future__ import annotations

import types

from bridge_rng_patch import targets


def _tagging(tag: str):
    def wrapper(wrapped, instance, args, kwargs):
        return (tag, wrapped(*args, **kwargs))

    return wrapper


def _modules() -> tuple[types.ModuleType, types.ModuleType]:
    shared = types.ModuleType("megatron.core.dist_checkpointing")
    shared.load = lambda request: ("loaded", request)
    stack = types.ModuleType("swift.megatron.utils.megatron_lm_utils")
    stack.dist_checkpointing = shared

    class Manager:
        def get_rng_state(self, use_dist_ckpt=True):
            return "state"

    stack.Manager = Manager
    return shared, stack


def test_a_function_called_through_a_shared_module_is_wrapped_for_the_stack_alone():
    shared, stack = _modules()
    original = shared.load
    saved = targets.save(stack, "dist_checkpointing.load")
    targets.wrap(stack, "dist_checkpointing.load", _tagging("patched"))
    assert stack.dist_checkpointing.load("rng") == ("patched", ("loaded", "rng"))
    assert shared.load is original  # megatron-core's own module, as everyone else calls it
    saved.put_back()
    assert stack.dist_checkpointing is shared


def test_two_patches_on_one_shared_function_come_off_in_reverse_order():
    shared, stack = _modules()
    first = targets.save(stack, "dist_checkpointing.load")
    targets.wrap(stack, "dist_checkpointing.load", _tagging("layout"))
    second = targets.save(stack, "dist_checkpointing.load")
    targets.wrap(stack, "dist_checkpointing.load", _tagging("audit"))
    assert stack.dist_checkpointing.load("rng") == ("audit", ("layout", ("loaded", "rng")))
    second.put_back()
    assert stack.dist_checkpointing.load("rng") == ("layout", ("loaded", "rng"))
    first.put_back()
    assert stack.dist_checkpointing is shared


def test_a_method_is_wrapped_on_its_class_and_undone_exactly():
    _, stack = _modules()
    original = vars(stack.Manager)["get_rng_state"]
    assert targets.is_method(stack, "Manager.get_rng_state")
    saved = targets.save(stack, "Manager.get_rng_state")
    targets.wrap(stack, "Manager.get_rng_state", _tagging("patched"))
    assert stack.Manager().get_rng_state() == ("patched", "state")
    saved.put_back()
    assert vars(stack.Manager)["get_rng_state"] is original


def test_an_inherited_method_is_wrapped_on_the_declared_class_and_removed_from_it_on_undo():
    _, stack = _modules()

    class Subclass(stack.Manager):
        pass

    stack.Subclass = Subclass
    saved = targets.save(stack, "Subclass.get_rng_state")
    targets.wrap(stack, "Subclass.get_rng_state", _tagging("patched"))
    assert stack.Subclass().get_rng_state() == ("patched", "state")
    assert stack.Manager().get_rng_state() == "state"
    saved.put_back()
    assert "get_rng_state" not in vars(Subclass)
