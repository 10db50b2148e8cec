"""The benchmarks' multi-process job: the rank job of the tests (tests/jobs/rng_job.py), with timed actions.

Run as ``python benchmarks/timing_job.py '<json spec>'`` with the python of a release environment, as
``tools.jobs.run_job(..., job=TIMING_JOB)`` does. Each rank is set up as in the tests (the real GlobalState,
ConfigContainer and seeding, only CUDA calls faked); then one of these actions runs:

- ``time_get_rng_state`` and ``time_restore``: rank 0 times the call per call (spec: ``calls``, ``repeats``),
  the package applied and undone between alternating blocks; for ``time_restore`` the other ranks wait, so that it
  has the CPU, and for ``time_get_rng_state`` they make the same calls, whose patched form gathers over DP;
- ``time_checkpoint``: the real ``save_checkpoint`` then ``load_checkpoint``, each timed across the job.
"""

from __future__ import annotations

import gc
import inspect
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "jobs"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rng_job

from benchmarks import sides


def _time_get_rng_state(spec: dict, state: Any) -> dict:
    """Seconds per call of the installed get_rng_state, called as save_checkpoint calls it."""
    return _per_call_timings(spec, rng_job.installed_get_rng_state(spec, state))


def _time_restore(spec: dict, state: Any) -> dict:
    """Seconds per RNG restore of a saved entry, in the sequence the installed release's restore runs.

    The restore sits inside ``_load_checkpoint_from_path`` and cannot be called alone, so its steps are
    repeated here as each release runs them: the old release picks the entry from the loaded list (with the
    package: the checked list its load hands over) and sets the tracker through its module's ``tensor_parallel``
    (with the package: inside its load wrapper, which puts the converting one there); 0.3.x converts every
    tracker state with megatron-core's helper first. Also counts conversions per restore.
    """
    import numpy as np
    import torch

    checkpointing = rng_job.loop_checkpointing()
    entry = _saved_entry(spec, state)
    conversions: list[int] = []

    def set_sources(rng_state: dict) -> None:
        random.setstate(rng_state["random_rng_state"])
        np.random.set_state(rng_state["np_rng_state"])
        torch.set_rng_state(rng_state["torch_rng_state"])
        torch.cuda.set_rng_state(rng_state["cuda_rng_state"])

    if _release_restore_converts():
        tensor_parallel = checkpointing.tensor_parallel

        def restore() -> None:
            tracker = tensor_parallel.get_cuda_rng_tracker()
            graph_safe = tensor_parallel.is_graph_safe_cuda_rng_tracker(tracker)
            rng_state = [entry][0]
            set_sources(rng_state)
            states = rng_state["rng_tracker_states"]
            tracker.set_states({name: convert(state, to_graphable=graph_safe) for name, state in states.items()})

        convert = _counting(tensor_parallel.convert_cuda_rng_state, conversions)
        restore()
        convert = tensor_parallel.convert_cuda_rng_state
        timings = _per_call_timings(spec, restore)
    else:
        from bridge_rng_patch import compat, loops
        from bridge_rng_patch.probe import InstalledStack
        from bridge_rng_patch.restorable import RestorableRngStates, StoredLayoutLoad
        from bridge_rng_patch.resume import ResumeWatch
        from bridge_rng_patch.rng_layout import OWN, Restore, ResumingRank

        stack = InstalledStack(loops.BRIDGE, checkpointing)
        load, rank = StoredLayoutLoad(stack, loops.BRIDGE.dist_load, ResumeWatch(stack)), ResumingRank(0, 0, 0, (1, 1))

        def restore_with_package() -> None:
            # Inside the package's _load_checkpoint_from_path wrapper, where the converting tensor_parallel is.
            checkpointing._load_checkpoint_from_path._self_wrapper(restore_from_checked_list, None, (), {})

        def restore_from_checked_list() -> None:
            rng_state = RestorableRngStates([entry], load, "benchmark", rank, Restore(OWN), by_design=False)[0]
            set_sources(rng_state)
            checkpointing.tensor_parallel.get_cuda_rng_tracker().set_states(rng_state["rng_tracker_states"])

        def restore_as_released() -> None:
            rng_state = [entry][0]
            set_sources(rng_state)
            checkpointing.tensor_parallel.get_cuda_rng_tracker().set_states(rng_state["rng_tracker_states"])

        convert = compat.convert_cuda_rng_state
        compat.convert_cuda_rng_state = _counting(convert, conversions)
        restore_with_package()
        compat.convert_cuda_rng_state = convert
        timings = _per_call_timings(spec, restore_with_package, restore_as_released)
    return {
        **timings,
        "tracker_states": len(entry["rng_tracker_states"]),
        "conversions_per_restore": len(conversions),
    }


def _saved_entry(spec: dict, state: Any) -> dict:
    """This rank's entry as the release's own ``get_rng_state`` builds it: rank 0 calls it alone, and the package's
    would gather it from every DP rank, so the package is undone around the call."""
    if not spec.get("patched", True):
        return rng_job.installed_get_rng_state(spec, state)().data[0]
    import bridge_rng_patch

    bridge_rng_patch.undo()
    try:
        return rng_job.installed_get_rng_state(spec, state)().data[0]
    finally:
        bridge_rng_patch.apply()


def _counting(convert: Any, conversions: list[int]) -> Any:
    def count_and_convert(state: Any, to_graphable: bool = False) -> Any:
        conversions.append(1)
        return convert(state, to_graphable=to_graphable)

    return count_and_convert


def _per_call_timings(spec: dict, call: Any, call_without_package: Any = None) -> dict:
    """Seconds per call, the median over ``repeats`` rounds of blocks of ``calls`` calls each.

    With the package, each round runs three blocks in this one process, in balanced orders (benchmarks/sides.py):
    unpatched, unpatched again (the A/A control), patched, the package undone and applied in between, so all
    share its memory layout, caches and machine load. The package's share is the median of the rounds'
    differences, patched less unpatched; the control's, unpatched again less unpatched, is what such a
    difference is with no package at all. A job without the package (``patched`` false) has one side, the
    release as released.
    """
    import statistics

    rounds = spec["repeats"]
    if not spec.get("patched", True):
        as_released = [_block_seconds_per_call(call, spec["calls"]) for _ in range(rounds)]
        return {"seconds_per_call": {"as released": statistics.median(as_released)}}
    import bridge_rng_patch

    calls = {
        "unpatched": call_without_package or call,
        "unpatched again": call_without_package or call,
        "patched": call,
    }
    samples: dict[str, list[float]] = {side: [] for side in calls}
    for order in sides.balanced_rounds(list(calls), rounds):
        for side in order:
            if side == "patched":
                bridge_rng_patch.apply()
            else:
                bridge_rng_patch.undo()
            samples[side].append(_block_seconds_per_call(calls[side], spec["calls"]))
    bridge_rng_patch.apply()

    def median_difference(side: str) -> float:
        return statistics.median(a - b for a, b in zip(samples[side], samples["unpatched"], strict=True))

    return {
        "seconds_per_call": {side: statistics.median(side_samples) for side, side_samples in samples.items()},
        "share_seconds_per_call": median_difference("patched"),
        "control_seconds_per_call": median_difference("unpatched again"),
    }


def _release_restore_converts() -> bool:
    """Whether the release's own restore converts tracker states (Bridge 0.3.0 and later, Megatron-LM's loop),
    read without the package."""
    return "convert_cuda_rng_state" in inspect.getsource(rng_job.loop_restore_function())


def _block_seconds_per_call(call: Any, calls: int) -> float:
    """Mean seconds per call over ``calls`` calls, the collector run before and held off during, as timeit does."""

    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - start) / calls
    finally:
        gc.enable()


def _time_checkpoint(state: Any, model: list, spec: dict) -> dict:
    """Seconds of the real save_checkpoint, then of the real load_checkpoint of what it wrote, each across the
    job (barrier to barrier); this rank's reads of the RNG layout and its time in the package's part of the load.

    One load per job, as a resume is. Each timed call starts with ``gc.collect()``: otherwise the collector's
    counters, left by whatever ran before, decide whether a full collection (0.3-0.4 s on this heap) falls
    inside the timed call, and that swung one side's load by 0.45 s in either direction. With ``settle`` in the
    spec it also starts with the writes before it on disk (the save's files that it does not sync itself,
    before the load), as a resume from a checkpoint written earlier does.
    """

    import os

    import torch

    layout_reads = rng_job.count_layout_reads(spec)
    package_in_load = _time_package_in_load(spec)
    audit_in_load = _time_resume_audit(spec)

    def across_the_job(call: Any) -> float:
        if spec.get("settle"):
            os.sync()
        gc.collect()  # each side starts with the collector's counters at zero, see the docstring
        torch.distributed.barrier()
        start = time.perf_counter()
        call()
        torch.distributed.barrier()
        return time.perf_counter() - start

    def save() -> None:  # an asynchronous save ends when every rank has finalized it
        rng_job.save_checkpoint(state, model, spec)
        if spec.get("async_save"):
            rng_job.finalize_async_save(state)

    timing = {
        "save_s": across_the_job(save),
        "saved_bytes": _bytes_under(rng_job.iteration_dir(spec)),
        "load_s": across_the_job(lambda: rng_job.load_checkpoint(state, model, spec)),
        "layout_reads": len(layout_reads),
        "package_in_load_s": package_in_load(),
        "audit_s": audit_in_load(),
    }
    if spec.get("patched", True) and torch.distributed.get_rank() == 0:
        timing.update(_time_layout_reads(str(rng_job.iteration_dir(spec))))
    return timing


def _bytes_under(directory: Path) -> int:
    """What a save wrote: the size of every file of its iteration directory."""
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())


def _time_layout_reads(iteration_dir: str) -> dict:
    """The package's read of the stored RNG layout, and megatron-core's full metadata read it replaced."""

    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from bridge_rng_patch.rng_layout import read_stored_layouts

    timings = {}
    dist_checkpointing = Path(iteration_dir, "metadata.json").exists()  # fsdp_dtensor has no sharded metadata
    reads = {"layout_read_s": read_stored_layouts, "load_sharded_metadata_s": load_sharded_metadata}
    for name, read in reads.items() if dist_checkpointing else list(reads.items())[:1]:
        start = time.perf_counter()
        read(iteration_dir)
        timings[name] = time.perf_counter() - start
    return timings


def _time_package_in_load(spec: dict) -> Any:
    """Times this rank's stay in the package's load wrappers, less the loads they wrap, from now on; returns the
    total so far. That is all the package adds to a load but its restore (overhead.py) and one swap of
    ``tensor_parallel``: the layout read (rank 0), its broadcast, and the requests and the checked list; for
    fsdp_dtensor, also the DCP load of the rank's own entry."""
    if not spec.get("patched", True):
        return lambda: 0.0

    from bridge_rng_patch.layout_load import LayoutAwareDistLoad, LayoutAwareFsdpLoad

    spent: list[float] = []
    for wrapper in (LayoutAwareDistLoad, LayoutAwareFsdpLoad):
        wrapper.__call__ = _less_what_it_wraps(wrapper.__call__, spent)
    return lambda: sum(spent)


def _time_resume_audit(spec: dict) -> Any:
    """Times this rank's resume audit (its fingerprints, the collective, the verdict) from now on; returns the total
    so far. It runs after the load's restore, inside the timed load."""
    if not spec.get("patched", True):
        return lambda: 0.0

    from bridge_rng_patch import resume_audit

    spent: list[float] = []
    audit = resume_audit._audit

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return audit(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    resume_audit._audit = timed
    return lambda: sum(spent)


def _less_what_it_wraps(call: Any, spent: list[float]) -> Any:
    def timed(self: Any, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        inside: list[float] = []

        def timed_load(*load_args: Any, **load_kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return wrapped(*load_args, **load_kwargs)
            finally:
                inside.append(time.perf_counter() - start)

        start = time.perf_counter()
        try:
            return call(self, timed_load, instance, args, kwargs)
        finally:
            spent.append(time.perf_counter() - start - sum(inside))

    return timed


def _timed_call(timing: Any, every_rank: bool = False) -> Any:
    """An action that seeds as a save does, then has rank 0 alone time ``timing(spec, state)`` (state: what the loop's
    save is called with, verl's checkpoint manager among them); ``every_rank`` runs it on every rank in step, for a
    call that makes a collective (the patched ``get_rng_state`` gathers over DP), and reports rank 0's."""

    def action(rank: int, state: Any, model: list, device_generator: Any, spec: dict) -> dict:
        import torch

        rng_job.seed_every_source(rng_job.SAVE_SEED, rank, device_generator, spec)
        torch.distributed.barrier()
        if rank != 0 and not every_rank:
            return {}
        timed = timing(spec, state)
        return {"timing": timed} if rank == 0 else {}

    return action


def _timed_checkpoint(rank: int, state: Any, model: list, device_generator: Any, spec: dict) -> dict:
    rng_job.seed_every_source(rng_job.SAVE_SEED, rank, device_generator, spec)
    return {"timing": _time_checkpoint(state, model, spec)}


rng_job.EXTRA_ACTIONS.update(
    time_get_rng_state=_timed_call(_time_get_rng_state, every_rank=True),
    time_restore=_timed_call(_time_restore),
    time_checkpoint=_timed_checkpoint,
)

if __name__ == "__main__":
    rng_job.main(json.loads(sys.argv[1]))
