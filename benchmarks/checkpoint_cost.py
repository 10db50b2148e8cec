"""What the package costs a checkpoint save and resume end to end, on real checkpoints. Not a test.

``python3 benchmarks/checkpoint_cost.py`` (``--quick`` for a short smoke run; ``--release bridge-0.3.1`` for a
fixed release, where only the stored-layout load applies). Megatron-Bridge 0.2.0rc6 by default, 2 ranks, EP 2,
a model of 300, 3,000 and 30,000 small parameters: each job seeds, runs the real ``save_checkpoint``, then the
real ``load_checkpoint`` of what it wrote, as a resume does, timing each across the job (barrier to barrier).
Unpatched and patched jobs alternate, so that drift in machine load hits both sides alike. Also reports the
package's own time inside each patched load (its dist-load wrapper, less the load it wraps; the least over
ranks: a rank that arrives early waits there for rank 0's broadcast, as it would wait in the load's next
collective without the package), the RNG layout read's own time (the package's scan, and megatron-core's
``load_sharded_metadata`` that earlier versions used, for reference) and how many reads of the layout one load
makes across all ranks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.jobs import TIMING_JOB, crash_summary, run_job
from tools.release_envs import RELEASES, Release, ensure

DEFAULT_RELEASE = "bridge-0.2.0rc6"
LAYOUT = {"world": 2, "tp": 1, "pp": 1, "ep": 2}


def _one_job(release: Release, work: Path, tensors: int, patched: bool, run: int) -> dict:
    name = f"{'patched' if patched else 'unpatched'}-{tensors}-{run}"
    spec = {
        "action": "time_checkpoint",
        "checkpoint_dir": str(work / name),
        "tensors": tensors,
        "patched": patched,
        **LAYOUT,
    }
    results = run_job(release, spec, work, name, TIMING_JOB)
    crashes = crash_summary(results)
    if crashes:
        raise RuntimeError(crashes)
    timing = results[0]["timing"]
    timing["layout_reads"] = sum(result["timing"]["layout_reads"] for result in results)
    if patched:  # the rank that reaches the package last waits for no other: its time is what the load gains
        timing["package_in_load_s"] = min(result["timing"]["package_in_load_s"] for result in results)
    return timing


def _summary(samples: list[float]) -> dict:
    return {"median_s": statistics.median(samples), "range_s": [min(samples), max(samples)]}


def measure(release: Release, tensors: int, runs: int, work: Path) -> dict:
    sides: dict[bool, list[dict]] = {False: [], True: []}
    for run in range(runs):
        for patched in (False, True):
            sides[patched].append(_one_job(release, work, tensors, patched, run))
    figures: dict = {"tensors": tensors, "runs": runs}
    for what in ("save_s", "load_s"):
        unpatched = _summary([timing[what] for timing in sides[False]])
        patched = _summary([timing[what] for timing in sides[True]])
        figures[what.removesuffix("_s")] = {
            "unpatched": unpatched,
            "patched": patched,
            "ratio": patched["median_s"] / unpatched["median_s"],
        }
    figures["layout_read_ms"] = statistics.median(timing["layout_read_s"] * 1e3 for timing in sides[True])
    figures["load_sharded_metadata_ms"] = statistics.median(
        timing["load_sharded_metadata_s"] * 1e3 for timing in sides[True]
    )
    figures["layout_reads_per_load"] = sorted({timing["layout_reads"] for timing in sides[True]})
    package_in_load = [timing["package_in_load_s"] for timing in sides[True]]
    figures["package_in_load_ms"] = statistics.median(package_in_load) * 1e3
    figures["package_in_load_share"] = statistics.median(
        timing["package_in_load_s"] / timing["load_s"] for timing in sides[True]
    )
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 tensors, 2 runs: a smoke run, rough figures")
    parser.add_argument("--runs", type=int, default=5, help="jobs per side and size (default 5)")
    parser.add_argument("--tensors", type=int, nargs="+", default=[300, 3000, 30000], help="model sizes")
    parser.add_argument("--release", default=DEFAULT_RELEASE, choices=sorted(RELEASES), help="which release")
    options = parser.parse_args()
    sizes, runs = ((300,), 2) if options.quick else (options.tensors, options.runs)
    release = ensure(RELEASES[options.release])
    report = []
    with tempfile.TemporaryDirectory() as work_dir:
        for tensors in sizes:
            print(f"{tensors} tensors, {runs} runs per side ...", flush=True)
            report.append(measure(release, tensors, runs, Path(work_dir)))
            print(json.dumps(report[-1], indent=1), flush=True)
    print(markdown_table(report))
    return 0


def markdown_table(report: list[dict]) -> str:
    """The README's table of these figures: medians, the spread of the jobs in brackets."""

    def seconds(side: dict) -> str:
        low, high = side["range_s"]
        return f"{side['median_s']:.2f} s ({low:.2f}-{high:.2f})"

    rows = [
        "| tensors | save, unpatched | save, patched | ratio | load, unpatched | load, patched | ratio "
        "| package's own time in the load | layout read: scan / load_sharded_metadata | layout reads per load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for figures in report:
        save, load = figures["save"], figures["load"]
        reads = ", ".join(map(str, figures["layout_reads_per_load"]))
        layout_read = f"{figures['layout_read_ms']:.1f} ms / {figures['load_sharded_metadata_ms']:.0f} ms"
        rows.append(
            f"| {figures['tensors']:,} | {seconds(save['unpatched'])} | {seconds(save['patched'])} "
            f"| {save['ratio']:.2f} | {seconds(load['unpatched'])} | {seconds(load['patched'])} "
            f"| {load['ratio']:.2f} | {figures['package_in_load_ms']:.1f} ms ({figures['package_in_load_share']:.2%}) "
            f"| {layout_read} | {reads} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
