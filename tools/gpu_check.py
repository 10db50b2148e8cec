"""The package's CUDA paths on a real GPU, checked in one run of a few minutes; without one, what of it runs on the CPU.

The tests run every line of the package that touches CUDA against CPU stand-ins (tests/jobs/fake_cuda.py). This
script checks those lines where they are meant to run, on one GPU:

1. ``tracker_restore``: a real CUDA RNG tracker, seeded by megatron-core's ``model_parallel_cuda_manual_seed``;
   states saved from a plain (ByteTensor) tracker restored into a graph-safe one (``use_cudagraphable_rng``)
   through the package's restore, and the reverse; the next draws inside ``tracker.fork(name)``, for every
   tracker name, equal those the saved tracker would have drawn, bit for bit; with megatron-core's helpers
   (0.16 and later) and with the package's own (for megatron-core 0.15 and earlier).
2. ``cuda_graph_replay``: a CUDA graph captured after the restore, dropout inside ``fork()`` of the graph-safe
   tracker: its replays continue the restored stream, equal to the same draws run eagerly from the same state.
3. ``bridge_checkpoint``: Megatron-Bridge 0.2.0rc6's real ``save_checkpoint`` / ``load_checkpoint`` (the tests'
   rank job) with the graph-safe tracker, NCCL, one rank, ``fully_parallel_load`` on and off; then 2 ranks over
   gloo on the one GPU with EP 2: every RNG source restored bit-exact.
4. ``restore_time``: the package's restore of a tracker's states, per call, on the GPU.
5. ``async_save``: the same 2-rank save, asynchronous with Bridge's persistent checkpoint worker (spawned; on the
   CPU it cannot run, see tests/test_async_save.py), then a resume from a fresh process.
6. ``fsdp_dtensor``: the same 2-rank save and resume in the fsdp_dtensor format (torch DCP): each rank's own RNG
   entry, with the jobs' small model of plain tensors. A model wrapped in Megatron-FSDP is not in this check yet:
   it needs CUDA to build at all, so it could not be prepared where the project develops.
7. ``trajectory``: the tests' tiny MoE model (tests/jobs/trajectory.py) on the GPU, 2 ranks over gloo at EP 2, with
   the real CUDA generator and a graph-safe tracker: 6 steps saved after step 3 through Bridge's real save, resumed
   in new processes through its real load and set-up; every rank's losses at steps 4 to 6 and its final weights
   must be the uninterrupted run's, bit for bit. On the CPU the tests train it (tests/test_trajectory.py).

Each checkpoint check (3, 5, 6) also reads the resume audit's line after the load: its collective runs over the
job's backend (NCCL in the 1-rank checks), its fingerprints read the real device generator and tracker.

``python tools/gpu_check.py [--cpu] [--json PATH]``, with megatron-core and Megatron-Bridge 0.2.0rc6 importable
(on the device: the wheels ``tools/gpu_wheels.py`` downloads; README, "A real GPU"). ``--cpu``, or no GPU: the
checks that can run on CPU stand-ins, the rest reported as skipped; the tests run it so, so it cannot rot between
GPUs. One line per check (PASS, FAIL or SKIP, and what it saw); exits 0 when none failed, 1 when one did, 2 when
what it needs cannot be imported (said in one line).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
JOB = REPO / "tests" / "jobs" / "rng_job.py"
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
SEED, OTHER_SEED = 1234, 999
DRAWS = 16
# What a tracker restore that fails here says to do (the loops' own messages name the stack's switch).
REMEDY = "no RNG state was restored"


def _import_what_it_needs() -> str | None:
    """None, or the one line that says what cannot be imported here, and why."""
    sys.path[:0] = [str(REPO), str(JOB.parent)]
    for module in ("torch", "megatron.core", "megatron.bridge.training.checkpointing", "bridge_rng_patch"):
        try:
            __import__(module)
        except Exception as error:
            return (
                f"cannot import {module} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            )
    return None


@contextlib.contextmanager
def _one_rank_of_model_parallel(backend: str) -> Iterator[None]:
    """A one-rank torch.distributed job with megatron-core's parallel state: what its seeding reads."""
    import torch
    from megatron.core import parallel_state

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    torch.distributed.init_process_group(backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    parallel_state.initialize_model_parallel()
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def _helpers(which: str) -> Iterator[None]:
    """The package's restore with megatron-core's conversion helpers, or with its own."""
    from megatron.core import tensor_parallel

    from bridge_rng_patch import compat

    kept = compat.convert_cuda_rng_state, compat.is_graph_safe_cuda_rng_tracker
    if which == "own":
        compat.convert_cuda_rng_state = compat._own_convert_cuda_rng_state
        compat.is_graph_safe_cuda_rng_tracker = compat._own_is_graph_safe_cuda_rng_tracker
    else:
        compat.convert_cuda_rng_state = tensor_parallel.convert_cuda_rng_state
        compat.is_graph_safe_cuda_rng_tracker = tensor_parallel.is_graph_safe_cuda_rng_tracker
    try:
        yield
    finally:
        compat.convert_cuda_rng_state, compat.is_graph_safe_cuda_rng_tracker = kept


def _seeded_tracker(graph_safe: bool, seed: int, on_gpu: bool) -> Any:
    """A fresh tracker seeded by megatron-core; on the CPU a graph-safe one is set up as the tests' job does."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    initialize_rng_tracker(use_cudagraphable_rng=graph_safe and on_gpu, force_reset=True)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    if graph_safe and not on_gpu:  # its constructor refuses graph-safe mode without CUDA graphs
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        tracker.use_cudagraphable_rng = True
        tracker.set_states({name: _cpu_generator(state) for name, state in tracker.get_states().items()})
    elif graph_safe:
        tensor_parallel.model_parallel_cuda_manual_seed(seed, use_cudagraphable_rng=True)
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return tracker


def _cpu_generator(state: Any) -> Any:
    import torch

    generator = torch.Generator()
    generator.set_state(state)
    return generator


def _saved(tracker: Any) -> dict[str, Any]:
    """A copy of the tracker's states, as a checkpoint keeps them: the live ones move on with every draw."""
    import torch

    return {
        name: state.clone_state() if isinstance(state, torch.Generator) else state.clone()
        for name, state in tracker.get_states().items()
    }


def _next_draws(tracker: Any, on_gpu: bool) -> dict[str, Any]:
    """The next draws inside ``fork(name)`` for every name (GPU); on the CPU, where ``fork`` needs a CUDA
    device, the bytes of each state, which decide those draws."""
    import torch

    if not on_gpu:
        states = tracker.get_states().items()
        return {name: (state.get_state() if isinstance(state, torch.Generator) else state) for name, state in states}
    draws = {}
    for name in sorted(tracker.get_states()):
        with tracker.fork(name):
            draws[name] = torch.rand(DRAWS, device="cuda")
    return draws


def _same(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    import torch

    return [name for name in expected if name not in got or not torch.equal(expected[name].cpu(), got[name].cpu())]


def check_tracker_restore(on_gpu: bool, helpers: str, saved_graph_safe: bool) -> tuple[str, str]:
    from megatron.core import tensor_parallel

    from bridge_rng_patch.tracker_restore import GraphSafeRestoringTracker

    if helpers == "megatron-core" and not hasattr(tensor_parallel, "convert_cuda_rng_state"):
        return SKIP, "this megatron-core has no convert_cuda_rng_state (added in 0.16)"
    if helpers == "megatron-core" and not saved_graph_safe and not on_gpu:
        return SKIP, "megatron-core's conversion to graph-safe sets the CUDA generator: needs CUDA"
    with _helpers(helpers):
        source = _seeded_tracker(saved_graph_safe, SEED, on_gpu)
        saved = _saved(source)
        expected = _next_draws(source, on_gpu)
        target = _seeded_tracker(not saved_graph_safe, OTHER_SEED, on_gpu)
        GraphSafeRestoringTracker(target, REMEDY).set_states(saved)
        kept_forms = sorted({type(state).__name__ for state in target.get_states().values()})
        different = _same(expected, _next_draws(target, on_gpu))
    what = "draws" if on_gpu else "states (CPU: fork needs CUDA)"
    seen = f"{len(expected)} tracker names, kept as {', '.join(kept_forms)}"
    kept_form = "Tensor" if saved_graph_safe else "Generator"  # the form the restored-into tracker keeps
    if kept_forms != [kept_form]:
        return FAIL, f"{seen}, expected {kept_form} only"
    if different:
        return FAIL, f"{seen}; next {what} differ for {', '.join(different)}"
    return PASS, f"{seen}; next {what} equal, bit for bit"


def check_cuda_graph_replay(on_gpu: bool) -> tuple[str, str]:
    if not on_gpu:
        return SKIP, "needs CUDA graphs"
    import torch

    from bridge_rng_patch.tracker_restore import GraphSafeRestoringTracker

    name, replays = "model-parallel-rng", 3
    saved = _saved(_seeded_tracker(False, SEED, on_gpu))
    tracker = _seeded_tracker(True, OTHER_SEED, on_gpu)
    ones = torch.ones(4096, device="cuda")

    def dropout_in_fork() -> Any:
        with tracker.fork(name):
            return torch.nn.functional.dropout(ones, p=0.5)

    GraphSafeRestoringTracker(tracker, REMEDY).set_states(saved)
    eager = [dropout_in_fork() for _ in range(replays)]
    GraphSafeRestoringTracker(tracker, REMEDY).set_states(saved)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = dropout_in_fork()
    replayed = []
    for _ in range(replays):
        graph.replay()
        replayed.append(captured.clone())
    torch.cuda.synchronize()
    equal = [torch.equal(a, b) for a, b in zip(eager, replayed, strict=True)]
    if all(equal):
        return PASS, f"{replays} replays equal the eager draws from the restored state"
    return FAIL, f"replays equal to eager draws: {equal}"


def check_bridge_checkpoint(
    on_gpu: bool, world: int, backend: str, fully_parallel_load: bool, saved_as: dict | None = None
) -> tuple[str, str]:
    """``saved_as``: how the save runs besides (asynchronously, in another format)."""
    if fully_parallel_load and not on_gpu:
        return SKIP, "fully_parallel_load needs CUDA"
    if backend == "nccl" and not on_gpu:
        return SKIP, "NCCL needs CUDA"
    if (saved_as or {}).get("persistent_worker") and not on_gpu:
        return SKIP, "the persistent checkpoint worker is spawned and needs CUDA"
    spec = {"world": world, "tp": 1, "pp": 1, "ep": world, "graph_safe_tracker": True, "backend": backend}
    spec.update(real_cuda=on_gpu, fully_parallel_load=fully_parallel_load, **(saved_as or {}))
    with tempfile.TemporaryDirectory() as work:
        spec["checkpoint_dir"] = f"{work}/checkpoint"
        saved, problem = _job({**spec, "action": "save", "out": f"{work}/save.json"})
        if problem is None:
            loaded, problem = _job({**spec, "action": "load", "out": f"{work}/load.json"})
    if problem is not None:
        return FAIL, problem
    mismatched = [rank["rank"] for rank in loaded if rank["error"] or rank["loaded"] != saved[rank["rank"]]["saved"]]
    errors = {rank["error"] for rank in loaded if rank["error"]}
    if mismatched:
        return FAIL, f"ranks {mismatched} did not get their own state back{': ' + '; '.join(errors) if errors else ''}"
    forms = sorted({form for rank in loaded for form, _ in rank["loaded"]["tracker"].values()})
    audit = [line for line in loaded[0]["logs"] if "RNG resume audit" in line]
    if len(audit) != 1 or not audit[0].startswith("INFO: ") or not audit[0].endswith("are apart"):
        return FAIL, f"every RNG source restored bit-exact, but the resume audit said: {audit or 'nothing'}"
    restored = f"every RNG source restored bit-exact; tracker states kept as {', '.join(forms)}"
    return PASS, f"{world} rank(s): {restored}; the resume audit over {backend} passed"


def check_trajectory(on_gpu: bool) -> tuple[str, str]:
    if not on_gpu:
        return SKIP, "on the CPU the tests train it (tests/test_trajectory.py)"
    spec = {"world": 2, "tp": 1, "pp": 1, "ep": 2, "action": "train", "steps": 6, "iteration": 3, "backend": "gloo"}
    spec.update(real_cuda=True, graph_safe_tracker=True, first_step=True)
    with tempfile.TemporaryDirectory() as work:
        spec["checkpoint_dir"] = f"{work}/checkpoint"
        uninterrupted, problem = _job({**spec, "out": f"{work}/run.json"})
        if problem is None:
            resumed, problem = _job({**spec, "resume": True, "out": f"{work}/resumed.json"})
    if problem is not None:
        return FAIL, problem
    parted = {
        rank["rank"]: [step for step, loss in rank["losses"].items() if loss != run["losses"][step]]
        for run, rank in zip(uninterrupted, resumed, strict=True)
        if rank["losses"] != {step: run["losses"][step] for step in rank["losses"]} or rank["weights"] != run["weights"]
    }
    if parted:
        return FAIL, f"resumed ranks parted from the uninterrupted run (rank: steps): {parted}"
    steps = ", ".join(sorted(resumed[0]["losses"], key=int))
    return PASS, f"2 ranks: losses at steps {steps} and final weights bit-identical to the uninterrupted run's"


def _job(spec: dict) -> tuple[list[dict], str | None]:
    """The tests' rank job (Bridge's real save or load) with this interpreter; its reports, or why it failed."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    process = subprocess.run(
        [sys.executable, str(JOB), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=environment,
    )
    if process.returncode != 0 or not Path(spec["out"]).exists():
        return [], f"{spec['action']} job failed (rc {process.returncode}): {process.stderr.strip()[-600:]}"
    reports = json.loads(Path(spec["out"]).read_text())
    crashed = [
        f"rank {report['rank']}: {report['crash'].strip().splitlines()[-1]}" for report in reports if "crash" in report
    ]
    return reports, "; ".join(crashed) or None


def check_restore_time(on_gpu: bool) -> tuple[str, str]:
    import torch

    calls, figures = 2000, []
    # On the CPU only the package's own conversion runs to graph-safe (megatron-core's sets the CUDA generator).
    with contextlib.nullcontext() if on_gpu else _helpers("own"):
        for graph_safe in (True, False):
            figures.append(_restore_time(graph_safe, calls, on_gpu))
    where = torch.cuda.get_device_name() if on_gpu else "the CPU, with stand-ins (not a GPU figure)"
    return PASS, f"tracker states restored per call, on {where}: {'; '.join(figures)}"


def _restore_time(graph_safe: bool, calls: int, on_gpu: bool) -> str:
    import torch

    from bridge_rng_patch.tracker_restore import GraphSafeRestoringTracker

    saved = _saved(_seeded_tracker(not graph_safe, SEED, on_gpu))
    restoring = GraphSafeRestoringTracker(_seeded_tracker(graph_safe, OTHER_SEED, on_gpu), REMEDY)
    restoring.set_states(saved)
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        restoring.set_states(saved)
    if on_gpu:
        torch.cuda.synchronize()
    per_call = (time.perf_counter() - start) / calls * 1e6
    return f"{len(saved)} states into a {'graph-safe' if graph_safe else 'plain'} tracker: {per_call:.1f} µs"


def checks(on_gpu: bool) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
    listed: list[tuple[str, Callable[[], tuple[str, str]]]] = [
        (f"tracker_restore[{helpers} helpers, {direction}]", _bound(check_tracker_restore, on_gpu, helpers, saved))
        for helpers in ("megatron-core", "own")
        for direction, saved in (("plain to graph-safe", False), ("graph-safe to plain", True))
    ]
    listed.append(("cuda_graph_replay", _bound(check_cuda_graph_replay, on_gpu)))
    listed.append(("restore_time", _bound(check_restore_time, on_gpu)))
    return listed


def job_checks(on_gpu: bool) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
    """The jobs run after the in-process checks, outside their torch.distributed job."""
    backend = "nccl" if on_gpu else "gloo"
    return (
        [
            (
                f"bridge_checkpoint[1 rank, {backend}, fully_parallel_load={fully}]",
                _bound(check_bridge_checkpoint, on_gpu, 1, backend, fully),
            )
            for fully in (False, True)
        ]
        + [
            (f"{name}[2 ranks, gloo, EP 2]", _bound(check_bridge_checkpoint, on_gpu, 2, "gloo", False, saved_as))
            for name, saved_as in (
                ("bridge_checkpoint", None),
                ("async_save", {"async_save": True, "persistent_worker": True}),
                ("fsdp_dtensor", {"ckpt_format": "fsdp_dtensor"}),
            )
        ]
        + [("trajectory[2 ranks, gloo, EP 2]", _bound(check_trajectory, on_gpu))]
    )


def _bound(check: Callable[..., tuple[str, str]], *args: Any) -> Callable[[], tuple[str, str]]:
    def run() -> tuple[str, str]:
        try:
            return check(*args)
        except Exception as error:
            return FAIL, f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="only what runs on CPU stand-ins, even with a GPU")
    parser.add_argument("--json", type=Path, help="also write the results here")
    options = parser.parse_args(argv)
    unimportable = _import_what_it_needs()
    if unimportable is not None:
        print(f"gpu_check: {unimportable}")
        return 2
    import torch

    on_gpu = torch.cuda.is_available() and not options.cpu
    if not on_gpu:
        import fake_cuda

        fake_cuda.install(seed=0)
    from bridge_rng_patch.probe import installed_versions

    versions = installed_versions()
    device = torch.cuda.get_device_name() if on_gpu else "no GPU: CPU stand-ins"
    print(f"gpu_check on {device}; " + ", ".join(f"{name} {version}" for name, version in versions.items()), flush=True)
    results = []
    with _one_rank_of_model_parallel("nccl" if on_gpu else "gloo"):
        results += [_run(name, check) for name, check in checks(on_gpu)]
    results += [_run(name, check) for name, check in job_checks(on_gpu)]
    if options.json:
        options.json.write_text(json.dumps({"device": device, "versions": versions, "checks": results}, indent=1))
    return 1 if any(result["outcome"] == FAIL for result in results) else 0


def _run(name: str, check: Callable[[], tuple[str, str]]) -> dict:
    start = time.perf_counter()
    outcome, detail = check()
    seconds = time.perf_counter() - start
    print(f"{outcome} {name}: {detail} ({seconds:.1f} s)", flush=True)
    return {"check": name, "outcome": outcome, "detail": detail, "seconds": round(seconds, 2)}


if __name__ == "__main__":
    sys.exit(main())
