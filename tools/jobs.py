"""Run the multi-process RNG job (tests/jobs/rng_job.py, or the benchmarks' timing_job.py built on it) in a
release environment, on the training loop that release has, and read its reports."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import tempfile
from collections import OrderedDict
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


def job_setup(spec: dict) -> dict:
    """What a job's parent does before it forks its ranks (``rng_job.import_as_ordered``): jobs that agree on it can
    share one parent."""
    patched = spec.get("patched", True)
    return {
        "loop": spec["loop"],
        "environment": spec.get("environment", {}),
        "patched": patched,
        "package_first": spec.get("package_first", True),
        "audit_call": bool(spec.get("audit_call")) and not patched,
        "first_step": bool(spec.get("first_step")),
    }


class _JobParent:
    """One interpreter of a release environment that has imported what a set-up orders and runs job after job
    (``rng_job.serve``), each forking its ranks afresh; its output goes to a file, read back where a job fails."""

    def __init__(self, env: Release, setup: dict) -> None:
        answers, answers_end = os.pipe()
        self.output = tempfile.TemporaryFile()  # noqa: SIM115 (open as long as the parent lives; closed in close())
        self.process = subprocess.Popen(
            [str(env.python), str(JOB), "--serve", json.dumps(setup), str(answers_end)],
            stdin=subprocess.PIPE,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            env=env.environment({**os.environ, "PYTHONWARNINGS": "ignore"}),
            cwd=REPO,
            pass_fds=(answers_end,),
            start_new_session=True,
            text=True,
        )
        os.close(answers_end)
        self.answers = os.fdopen(answers)

    def run(self, spec: dict, timeout: float) -> str | None:
        """Run one job; None when its reports are written, else why not (the job's own output included)."""
        start = self.output.seek(0, os.SEEK_END)
        try:
            self.process.stdin.write(json.dumps(spec) + "\n")
            self.process.stdin.flush()
            ready, _, _ = select.select([self.answers], [], [], timeout)
            answer = self.answers.readline() if ready else ""
        except OSError as error:
            answer, ready = "", [error]
        if answer:
            error = json.loads(answer)["error"]
        else:
            self.close()
            error = f"the job's parent process {'died' if ready else f'did not answer within {timeout:.0f} s'}"
        if error is None:
            return None
        self.output.seek(start)
        return f"{error}\n{self.output.read().decode(errors='replace')[-6000:]}"

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.answers.close()
        self.output.close()


class JobParents:
    """The job parents of one test process, by release and set-up; the least recently used goes first when more than
    ``keep`` are alive, so that a test session does not hold every release's import in memory at once."""

    def __init__(self, keep: int = 3) -> None:
        self.keep = keep
        self._parents: OrderedDict[tuple, _JobParent] = OrderedDict()
        atexit.register(self.close)

    def run(self, env: Release, spec: dict, out_dir: Path, name: str) -> list[dict]:
        """``run_job``'s reports, from a parent that may have imported the release for an earlier job already."""
        spec = {"loop": env.loop, **spec}
        key = (str(env.python), env.environment({}).get("PYTHONPATH"), json.dumps(job_setup(spec), sort_keys=True))
        parent = self._parents.pop(key, None) or _JobParent(env, job_setup(spec))
        self._parents[key] = parent
        while len(self._parents) > self.keep:
            self._parents.popitem(last=False)[1].close()
        out = out_dir / f"{name}.json"
        error = parent.run({**spec, "out": str(out)}, timeout=600)
        if parent.process.poll() is not None:
            del self._parents[key]
        if error is not None or not out.exists():
            raise RuntimeError(f"job {name} in {env.name} failed:\n{error}")
        return json.loads(out.read_text())

    def close(self) -> None:
        while self._parents:
            self._parents.popitem()[1].close()


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
