"""What the package costs a checkpoint save and resume end to end, on real checkpoints. Not a test.

``python3 benchmarks/checkpoint_cost.py`` (``--quick`` for a short smoke run; ``--release bridge-0.3.1`` for a
fixed release, where only the stored-layout load applies; ``--ckpt-format fsdp_dtensor``; ``--async-save``, timed
until every rank has finalized). Megatron-Bridge 0.2.0rc6 by default, 2 ranks, EP 2, a model of 300, 3,000 and
30,000 small parameters: each job seeds, runs the real ``save_checkpoint``, then the real ``load_checkpoint`` of
what it wrote, as a resume does, timing each across the job (barrier to barrier).

Three sides, one job each per round: A, unpatched; A', unpatched again (the A/A control); B, patched. The
rounds run the sides in balanced orders after one warm-up job, and each job starts on a settled machine (the
previous jobs' checkpoints deleted and on disk): see ``sides.py``. ``--no-settle`` and ``--fixed-order``
(A, A', B in every round) leave those out, to see what they buy. B/A is the end-to-end ratio; A'/A, how far
it strayed from 1 that day with no package at all; the no-difference band, how far it strays when the jobs are
dealt out among the sides at random (95%): a B/A inside it shows no cost.

The figure that noise cannot reach is the package's own time inside each patched load (its dist-load wrapper,
less the load it wraps; the least over ranks: a rank that arrives early waits there for rank 0's broadcast, as
it would wait in the load's next collective without the package). Also: the RNG layout read's own time (the
package's scan, and megatron-core's ``load_sharded_metadata`` that earlier versions used, for reference) and
how many reads of the layout one load makes across all ranks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import sides
from tools.jobs import TIMING_JOB, crash_summary, run_job
from tools.release_envs import RELEASES, Release, ensure

DEFAULT_RELEASE = "bridge-0.2.0rc6"
LAYOUT = {"world": 2, "tp": 1, "pp": 1, "ep": 2}
# Side -> whether its jobs run with the package.
SIDES = {sides.REFERENCE: False, sides.CONTROL: False, sides.TESTED: True}
NAMES = {sides.REFERENCE: "unpatched", sides.CONTROL: "unpatched again", sides.TESTED: "patched"}
# The checkpoint format, and whether saves are asynchronous (timed until every rank has finalized), from the options.
SAVE_OPTIONS: dict = {}


def _one_job(release: Release, work: Path, tensors: int, patched: bool, name: str, settle: bool) -> dict:
    spec = {
        "action": "time_checkpoint",
        "checkpoint_dir": str(work / name),
        "tensors": tensors,
        "patched": patched,
        "settle": settle,
        **LAYOUT,
        **SAVE_OPTIONS,
    }
    results = run_job(release, spec, work, name, TIMING_JOB)
    crashes = crash_summary(results)
    if crashes:
        raise RuntimeError(crashes)
    timing = results[0]["timing"]
    timing["layout_reads"] = sum(result["timing"]["layout_reads"] for result in results)
    if patched:  # the rank that reaches the package last waits for no other: its time is what the load gains
        timing["package_in_load_s"] = min(result["timing"]["package_in_load_s"] for result in results)
        timing["audit_s"] = min(result["timing"]["audit_s"] for result in results)
    return timing


def measure(release: Release, tensors: int, rounds: int, work: Path, settle: bool, balanced: bool) -> dict:
    """Every side's jobs, run in balanced orders (or in one order), and what they measured."""
    _one_job(release, work, tensors, False, f"warm-up-{tensors}", settle)  # the run's first job also reads the
    # environment's files from disk: it would weigh on whichever side came first
    timings: dict[str, list[dict]] = {side: [] for side in SIDES}
    orders = []
    orders_to_run = sides.balanced_rounds(list(SIDES), rounds) if balanced else [tuple(SIDES)] * rounds
    for number, order in enumerate(orders_to_run):
        orders.append(" ".join(order))
        for side in order:
            if settle:
                sides.settle(work)
            name = f"{NAMES[side].replace(' ', '-')}-{tensors}-{number}"
            timings[side].append(_one_job(release, work, tensors, SIDES[side], name, settle))
    figures: dict = {"tensors": tensors, "rounds": rounds, "settled": settle, "orders": orders}
    for what in ("save", "load"):
        figures[what] = sides.compare({side: [timing[f"{what}_s"] for timing in timings[side]] for side in SIDES})
    patched = timings[sides.TESTED]
    figures["layout_read_ms"] = statistics.median(timing["layout_read_s"] * 1e3 for timing in patched)
    torch_dist = all("load_sharded_metadata_s" in timing for timing in patched)
    figures["load_sharded_metadata_ms"] = (
        statistics.median(timing["load_sharded_metadata_s"] * 1e3 for timing in patched) if torch_dist else None
    )
    figures["layout_reads_per_load"] = sorted({timing["layout_reads"] for timing in patched})
    saved_bytes = {side: [timing["saved_bytes"] for timing in runs] for side, runs in timings.items()}
    figures["saved_bytes"] = {side: statistics.median(sizes) for side, sizes in saved_bytes.items()}
    figures["package_in_load_ms"] = statistics.median(timing["package_in_load_s"] for timing in patched) * 1e3
    figures["package_in_load_share"] = statistics.median(
        timing["package_in_load_s"] / timing["load_s"] for timing in patched
    )
    figures["audit_ms"] = statistics.median(timing["audit_s"] for timing in patched) * 1e3
    figures["audit_share"] = statistics.median(timing["audit_s"] / timing["load_s"] for timing in patched)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 tensors, 2 rounds: a smoke run, rough figures")
    parser.add_argument(
        "--rounds", type=int, default=6, help="jobs per side and size (default 6; balanced in multiples of 6)"
    )
    parser.add_argument("--tensors", type=int, nargs="+", default=[300, 3000, 30000], help="model sizes")
    parser.add_argument("--release", default=DEFAULT_RELEASE, choices=sorted(RELEASES), help="which release")
    parser.add_argument("--no-settle", action="store_true", help="start each job as soon as the last one ends")
    parser.add_argument("--fixed-order", action="store_true", help="run the sides as A, A', B in every round")
    parser.add_argument("--ckpt-format", default="torch_dist", choices=["torch_dist", "fsdp_dtensor"])
    parser.add_argument("--async-save", action="store_true", help="asynchronous saves (the temporary worker)")
    parser.add_argument("--ranks", type=int, default=LAYOUT["world"], help="ranks per job (EP 2; default 2)")
    options = parser.parse_args()
    LAYOUT["world"] = options.ranks
    SAVE_OPTIONS.update(ckpt_format=options.ckpt_format, async_save=options.async_save)
    sizes, rounds = ((300,), 2) if options.quick else (options.tensors, options.rounds)
    settle, balanced = not options.no_settle, not options.fixed_order
    release = ensure(RELEASES[options.release])
    report = []
    with tempfile.TemporaryDirectory() as work_dir:
        for tensors in sizes:
            print(f"{tensors} tensors, {rounds} rounds of {', '.join(SIDES)} ...", flush=True)
            report.append(measure(release, tensors, rounds, Path(work_dir), settle, balanced))
            print(json.dumps(report[-1], indent=1), flush=True)
    print(markdown_table(report))
    return 0


def markdown_table(report: list[dict]) -> str:
    """The README's table of these figures: each side's median, the range of its jobs in brackets."""

    def seconds(side: dict) -> str:
        low, high = side["range"]
        if high < 1:
            return f"{side['median'] * 1e3:.0f} ms ({low * 1e3:.0f}-{high * 1e3:.0f})"
        return f"{side['median']:.2f} s ({low:.2f}-{high:.2f})"

    rows = [
        "| tensors | | A: unpatched | A': unpatched again | B: patched | A/A: A'/A | A/B: B/A | no-difference band "
        "| package's own time | resume audit | layout read: scan / load_sharded_metadata "
        "| layout reads per load | bytes written: A / B |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for figures in report:
        for what in ("save", "load"):
            timed = figures[what]
            low, high = timed["no-difference band"]
            row = (
                f"| {figures['tensors']:,} | {what} | {seconds(timed[sides.REFERENCE])} "
                f"| {seconds(timed[sides.CONTROL])} | {seconds(timed[sides.TESTED])} | {timed['A/A']:.3f} "
                f"| {timed['A/B']:.3f} | {low:.3f} to {high:.3f} |"
            )
            if what == "load":
                reads = ", ".join(map(str, figures["layout_reads_per_load"]))
                row += (
                    f" {figures['package_in_load_ms']:.1f} ms ({figures['package_in_load_share']:.2%}) "
                    f"| {figures['audit_ms']:.1f} ms ({figures['audit_share']:.2%}) "
                    f"| {figures['layout_read_ms']:.1f} ms / {_milliseconds(figures['load_sharded_metadata_ms'])} "
                    f"| {reads} | |"
                )
            else:
                written = figures["saved_bytes"]
                row += f" | | | | {written[sides.REFERENCE]:,.0f} / {written[sides.TESTED]:,.0f} |"
            rows.append(row)
    return "\n".join(rows)


def _milliseconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


if __name__ == "__main__":
    sys.exit(main())
