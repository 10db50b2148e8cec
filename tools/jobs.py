"""Run the multi-process RNG job (tests/jobs/rng_job.py, or the benchmarks' timing_job.py built on it) in a
release environment, on the training loop that release has, and read its reports."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from tools.release_envs import REPO, Release

JOB = REPO / "tests" / "jobs" / "rng_job.py"
# The same job with the benchmarks' timed actions.
TIMING_JOB = REPO / "benchmarks" / "timing_job.py"


def run_job(env: Release, spec: dict, out_dir: Path, name: str, job: Path = JOB) -> list[dict]:
    """One report per rank; raises with the job's stderr when it fails. ``env`` must be built already."""
    out = out_dir / f"{name}.json"
    process = subprocess.run(
        [str(env.python), str(job), json.dumps({"loop": env.loop, **spec, "out": str(out)})],
        capture_output=True,
        text=True,
        env=env.environment({**os.environ, "PYTHONWARNINGS": "ignore"}),
        timeout=600,
        cwd=REPO,
    )
    if process.returncode != 0 or not out.exists():
        raise RuntimeError(f"job {name} in {env.name} failed (rc {process.returncode}):\n{process.stderr[-6000:]}")
    return json.loads(out.read_text())


# What a rank raises when another rank died or failed while it waited in a collective with it.
_WAITED_FOR_ANOTHER_RANK = re.compile(r"timed out|timeout|connection closed by peer|connection reset", re.IGNORECASE)


def waited_for_another_rank(crash: str) -> bool:
    """Whether a rank's crash is only another rank's death or failure, met in a collective (gloo says so in more
    than one way, depending on where the rank was waiting when its peer went)."""
    return _WAITED_FOR_ANOTHER_RANK.search(crash) is not None


def crash_summary(results: list[dict]) -> str | None:
    """Which ranks crashed, a line each, then the whole traceback of the first that did not merely wait for
    another rank in a collective; None when no rank crashed."""
    crashed = [result for result in results if "crash" in result]
    if not crashed:
        return None
    lines = [
        f"rank {result['rank']}: {result['crash'].strip().splitlines()[-1]}"
        + (f" (after its load failed: {result['error']})" if result.get("error") else "")
        for result in crashed
    ]
    cause = next((result for result in crashed if not waited_for_another_rank(result["crash"])), crashed[0])
    return "\n".join([*lines, "", f"rank {cause['rank']}:", cause["crash"]])


def coordinates(result: dict) -> tuple[int, int, int]:
    """A rank's (pp, tp, dp) coordinates, from its report."""
    return result["coords"]["pp"], result["coords"]["tp"], result["coords"]["dp"]


def saved_by_coordinates(save_results: list[dict]) -> dict[tuple[int, int, int], dict]:
    """What each rank of a save job saved, by its (pp, tp, dp) coordinates."""
    return {coordinates(result): result["saved"] for result in save_results}


def rng_streams(fingerprint: dict) -> dict[str, str]:
    """Each RNG source a rank's fingerprint holds, by the name a user knows it by, with its state's digest."""
    sources = {"python": "random", "numpy": "numpy", "torch": "torch", "cuda": "cuda"}
    named = {name: fingerprint[key] for name, key in sources.items()}
    return named | {name: digest for name, (_, digest) in fingerprint["tracker"].items()}


def lost_streams(saved: dict, resumed: dict) -> list[str]:
    """The streams of a rank's saved fingerprint that its resumed fingerprint does not hold as saved."""
    before, after = rng_streams(saved), rng_streams(resumed)
    return [name for name in before if after.get(name) != before[name]]
