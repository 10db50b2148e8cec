"""What the package costs a training job, measured side by side in one run. Not a test: nothing here fails.

``python3 benchmarks/overhead.py`` (``--quick`` for a short smoke run). Builds the release environments if
needed, then reports medians over repeated runs, as ratios where there is something to compare against:

1. ``import bridge_rng_patch`` in a fresh interpreter: time, and whether torch or megatron got imported.
2. importing ``megatron.bridge.training.checkpointing`` with the package active vs without (0.2.0rc6), each
   in a fresh interpreter: A without, A' without again (the A/A control), B active, in balanced orders
   (``sides.py``).
3. one call of ``get_rng_state``, 4 ranks, EP 2: patched 0.2.0rc6 vs the same release unpatched, in one
   process with the package applied and undone between blocks in balanced orders, beside an A/A control
   (the package's own share: one gather over DP per save, see ``SAVE_GATHER``), and the fixed upstream one on
   0.3.1, for information; the jobs on the two releases run in ABBA order.
4. the RNG restore, tracker with 3 states, the same way (the package's share, target <= 5 us), and
   upstream's fixed restore (0.3.1), with the number of conversions per restore.
5. one call of ``get_rng_state`` in Megatron-LM's own loop (megatron-core 0.19.2), 4 ranks, EP 2: the package's
   share the same way, in its own jobs; and likewise verl's (0.9.1: its checkpoint manager's method) and ms-swift's
   (4.6.0: ``_get_rng_state``).
6. a training step after the first one after a resume: the package's wrapper of ``train_step`` around a step that
   does nothing, against that step bare (what every later step pays); and keeping every RNG source over a function
   run between the restore and the first step (once per resume per builder).

End-to-end save and load of real checkpoints: ``benchmarks/checkpoint_cost.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import sides
from tools.jobs import TIMING_JOB, crash_summary, run_job
from tools.release_envs import RELEASES, Release, ensure

OLD = RELEASES["bridge-0.2.0rc6"]
FIXED = RELEASES["bridge-0.3.1"]
MEGATRON_LM = RELEASES["megatron-lm-0.19.2"]
# Each loop whose get_rng_state the package's share is timed in jobs of its own, with the report's key.
OTHER_LOOPS = {
    "megatron_lm_get_rng_state": MEGATRON_LM,
    "verl_get_rng_state": RELEASES["verl-0.9.1"],
    "ms_swift_get_rng_state": RELEASES["ms-swift-4.6.0"],
}
EP2 = {"world": 4, "tp": 1, "pp": 1, "ep": 2}
# No per-call target for get_rng_state: under EP > 1 each save gathers every DP rank's state (the release's own
# layout, readable without the package), milliseconds per save; the end-to-end save is what answers for it.
SAVE_GATHER = "one gather per save; see checkpoint_cost.py"

TIME_PACKAGE_IMPORT = """
import json, sys, time
start = time.perf_counter()
import bridge_rng_patch
elapsed = time.perf_counter() - start
heavy = sorted({name.split('.')[0] for name in sys.modules} & {'torch', 'megatron', 'numpy'})
print(json.dumps({'seconds': elapsed, 'heavy': heavy}))
"""

TIME_BRIDGE_IMPORT = """
import json, sys, time
if sys.argv[1] == 'active':
    import bridge_rng_patch
start = time.perf_counter()
import megatron.bridge.training.checkpointing
elapsed = time.perf_counter() - start
states = [s.state for s in bridge_rng_patch.status('Megatron-Bridge')] if sys.argv[1] == 'active' else []
print(json.dumps({'seconds': elapsed, 'states': states}))
"""


TIME_LATER_STEPS = """
import json, random, timeit
import wrapt
from bridge_rng_patch import rng_sources
from bridge_rng_patch.loops import MEGATRON_SEEDING
from bridge_rng_patch.resume_audit import ResumeAuditing

def step(*args):
    return None

# Nothing pending: a step after the first.
checked = wrapt.FunctionWrapper(step, ResumeAuditing(MEGATRON_SEEDING, "", None).at_first_step)
calls = int(__import__('sys').argv[1])
bare = [timing / calls for timing in timeit.repeat(lambda: step(1, 2, 3), number=calls, repeat=7)]
wrapped = [timing / calls for timing in timeit.repeat(lambda: checked(1, 2, 3), number=calls, repeat=7)]
def kept():
    with rng_sources.every_source_kept():
        random.random()
keeping = [timing / 200 for timing in timeit.repeat(kept, number=200, repeat=7)]
print(json.dumps({'bare': bare, 'wrapped': wrapped, 'keeping': keeping}))
"""


def later_steps(calls: int) -> dict:
    """Microseconds per call: a step bare, through the first-step wrapper with nothing to check, and a keep."""
    sample = _fresh_interpreter(OLD, TIME_LATER_STEPS, str(calls))
    return {side: _microseconds(sample[side]) for side in ("bare", "wrapped", "keeping")}


def _fresh_interpreter(env: Release, code: str, *args: str) -> dict:
    process = subprocess.run(
        [str(env.python), "-c", code, *args],
        capture_output=True,
        text=True,
        check=True,
        env=env.environment({**os.environ, "PYTHONWARNINGS": "ignore"}),
    )
    return json.loads(process.stdout.strip().splitlines()[-1])


def package_import(runs: int) -> dict:
    samples = [_fresh_interpreter(OLD, TIME_PACKAGE_IMPORT) for _ in range(runs)]
    return {
        "median_ms": 1000 * statistics.median(sample["seconds"] for sample in samples),
        "imported_heavy_modules": sorted({name for sample in samples for name in sample["heavy"]}),
    }


def bridge_import(runs: int) -> dict:
    modes = {sides.REFERENCE: "without", sides.CONTROL: "without", sides.TESTED: "active"}
    timings: dict[str, list[float]] = {side: [] for side in modes}
    states = []
    for order in sides.balanced_rounds(list(modes), runs):
        for side in order:
            sample = _fresh_interpreter(OLD, TIME_BRIDGE_IMPORT, modes[side])
            timings[side].append(sample["seconds"])
            states = sample["states"] or states
    return {**sides.compare(timings), "patch_states": states}


def timed_jobs(action: str, work: Path, runs: int, calls: int) -> dict[str, list[dict]]:
    """Rank 0's timings from ``runs`` jobs on the old release and as many on the fixed one, in ABBA order.

    In each job on the old release the package is applied and undone between blocks of calls in balanced
    orders, beside an A/A control (``_per_call_timings`` in benchmarks/timing_job.py), so its share comes from
    one process, not from the difference of two jobs' medians, which differ by more than the share from job to
    job.
    """
    timings: dict[str, list[dict]] = {OLD.name: [], FIXED.name: []}
    for run, order in enumerate(sides.balanced_rounds([OLD, FIXED], runs)):
        for env in order:
            # The fixed release as released: upstream's own cost.
            timings[env.name].append(_rank_zero_timing(env, action, work, f"{run}", calls, patched=env is OLD))
    return timings


def _rank_zero_timing(env: Release, action: str, work: Path, run: str, calls: int, patched: bool) -> dict:
    spec = {"action": action, "checkpoint_dir": str(work), "calls": calls, "repeats": 12, "patched": patched, **EP2}
    results = run_job(env, spec, work, f"{action}-{env.name}-{run}", TIMING_JOB)
    crashes = crash_summary(results)
    if crashes:
        raise RuntimeError(crashes)
    return results[0]["timing"]


def _package_share(patched_jobs: list[dict]) -> dict:
    """Per call, from jobs with the package applied and undone between blocks: each side and the share."""
    return {
        "patched": _microseconds([timing["seconds_per_call"]["patched"] for timing in patched_jobs]),
        "unpatched": _microseconds([timing["seconds_per_call"]["unpatched"] for timing in patched_jobs]),
        "package share": _microseconds([timing["share_seconds_per_call"] for timing in patched_jobs]),
        "A/A control": _microseconds([timing["control_seconds_per_call"] for timing in patched_jobs]),
    }


def _microseconds(seconds: list[float]) -> dict:
    per_call = [1e6 * second for second in seconds]
    return {"median_us": statistics.median(per_call), "range_us": [min(per_call), max(per_call)]}


def per_call_cost(action: str, work: Path, runs: int, calls: int) -> dict:
    timings = timed_jobs(action, work, runs, calls)
    old, fixed = timings[OLD.name], timings[FIXED.name]
    share = _package_share(old)
    figures = {
        "patched old": share["patched"],
        "unpatched old": share["unpatched"],
        "package share": share["package share"],
        "A/A control": share["A/A control"],
        "fixed upstream": _microseconds([timing["seconds_per_call"]["as released"] for timing in fixed]),
    }
    figures["ratio_vs_fixed_upstream"] = figures["patched old"]["median_us"] / figures["fixed upstream"]["median_us"]
    if "conversions_per_restore" in old[0]:
        figures["tracker_states"] = old[0]["tracker_states"]
        figures["conversions_per_restore"] = {
            "patched old": old[0]["conversions_per_restore"],
            "fixed upstream": fixed[0]["conversions_per_restore"],
        }
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run: few repeats, rough figures")
    options = parser.parse_args()
    runs, calls = (2, 200) if options.quick else (8, 5000)
    ensure(OLD)
    ensure(FIXED)
    for release in OTHER_LOOPS.values():
        ensure(release)
    report = {"runs": runs}
    print("1. import bridge_rng_patch ...", flush=True)
    report["package_import"] = package_import(runs * 3)
    print("2. import megatron.bridge.training.checkpointing, active vs without ...", flush=True)
    report["bridge_import"] = bridge_import(runs)
    with tempfile.TemporaryDirectory() as work_dir:
        print("3. get_rng_state per call, 4 ranks, EP 2 ...", flush=True)
        report["get_rng_state"] = per_call_cost("time_get_rng_state", Path(work_dir), runs, calls)
        print("4. RNG restore per call, tracker with 3 states ...", flush=True)
        report["restore"] = per_call_cost("time_restore", Path(work_dir), runs, calls)
        for key, release in OTHER_LOOPS.items():
            print(f"5. get_rng_state per call on {release.name}, 4 ranks, EP 2 ...", flush=True)
            jobs = [
                _rank_zero_timing(release, "time_get_rng_state", Path(work_dir), f"{run}", calls, patched=True)
                for run in range(max(2, runs // 2))
            ]
            report[key] = _package_share(jobs)
    print("6. a training step after the first, and keeping the restored state over a builder ...", flush=True)
    report["later_steps"] = later_steps(calls * 100)
    print(json.dumps(report, indent=2))
    print(markdown_table(report))
    return 0


def markdown_table(report: dict) -> str:
    """The README's table of these figures: medians, the spread of the per-run medians in brackets."""

    def micro(figure: dict) -> str:
        low, high = figure["range_us"]
        return f"{figure['median_us']:.1f} µs ({low:.1f} to {high:.1f})"

    heavy = ", ".join(report["package_import"]["imported_heavy_modules"]) or "nothing heavy"
    bridge, rng, restore = report["bridge_import"], report["get_rng_state"], report["restore"]
    later = report["later_steps"]
    low, high = bridge["no-difference band"]
    conversions = restore["conversions_per_restore"]
    return "\n".join(
        [
            "| what | patched 0.2.0rc6 | unpatched 0.2.0rc6 | package's share | target | fixed 0.3.1, for reference |",
            "|---|---|---|---|---|---|",
            f"| `import bridge_rng_patch`, fresh interpreter | {report['package_import']['median_ms']:.1f} ms, "
            f"imports {heavy} | | | < 20 ms | |",
            f"| importing Bridge's checkpointing module | {bridge[sides.TESTED]['median']:.2f} s "
            f"| {bridge[sides.REFERENCE]['median']:.2f} s; again: {bridge[sides.CONTROL]['median']:.2f} s "
            f"| ratio {bridge['A/B']:.3f}; A/A control: {bridge['A/A']:.3f}; no-difference band: {low:.3f} to "
            f"{high:.3f} | | |",
            f"| `get_rng_state`, 4 ranks, EP 2, per call | {micro(rng['patched old'])} | {micro(rng['unpatched old'])} "
            f"| {micro(rng['package share'])}; A/A control: {micro(rng['A/A control'])} | {SAVE_GATHER} "
            f"| {micro(rng['fixed upstream'])} |",
            f"| RNG restore, tracker with {restore['tracker_states']} states | {micro(restore['patched old'])}, "
            f"{conversions['patched old']} conversions | {micro(restore['unpatched old'])} "
            f"| {micro(restore['package share'])}; A/A control: {micro(restore['A/A control'])} | <= 5 µs "
            f"| {micro(restore['fixed upstream'])}, {conversions['fixed upstream']} conversions |",
            *(
                f"| {what}: `get_rng_state`, 4 ranks, EP 2, per call | {micro(report[key]['patched'])} "
                f"| {micro(report[key]['unpatched'])} | {micro(report[key]['package share'])}; A/A control: "
                f"{micro(report[key]['A/A control'])} | {SAVE_GATHER} | |"
                for key, what in (
                    ("megatron_lm_get_rng_state", "Megatron-LM's loop (megatron-core 0.19.2)"),
                    ("verl_get_rng_state", "verl 0.9.1's checkpoint manager"),
                    ("ms_swift_get_rng_state", "ms-swift 4.6.0"),
                )
            ),
            f"| a training step after the first (an empty step), per call | {micro(later['wrapped'])} "
            f"| {micro(later['bare'])} | {later['wrapped']['median_us'] - later['bare']['median_us']:.2f} µs | | |",
            f"| every RNG source kept over a builder, once per resume | {micro(later['keeping'])} | | | | |",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
