"""The prepared GPU check (tools/gpu_check.py) in its CPU mode, so that it cannot rot between the sessions that
have a GPU: everything that can run on CPU stand-ins passes, and what needs CUDA says so instead of failing.

It runs on Megatron-Bridge 0.2.0rc6 with megatron-core 0.16.1, the pairing that has both megatron-core's
conversion helpers and the package's own.
"""

from __future__ import annotations

import json
import subprocess

from conftest import REPO

from tools.release_envs import OLD_ON_NEWER_CORE, RELEASES, ensure

NEEDS_CUDA = {
    "tracker_restore[megatron-core helpers, plain to graph-safe]",
    "cuda_graph_replay",
    "bridge_checkpoint[1 rank, gloo, fully_parallel_load=True]",
    "async_save[2 ranks, gloo, EP 2]",
    "trajectory[2 ranks, gloo, EP 2]",
}


def _gpu_check(env, tmp_path, *arguments: str) -> tuple[subprocess.CompletedProcess, dict]:
    report = tmp_path / "gpu_check.json"
    process = subprocess.run(
        [str(ensure(env).python), "tools/gpu_check.py", *arguments, "--json", str(report)],
        capture_output=True,
        text=True,
        env=env.environment(),
        cwd=REPO,
        timeout=600,
    )
    return process, json.loads(report.read_text()) if report.exists() else {}


def test_cpu_mode_passes_every_check_that_can_run_without_cuda_and_skips_the_rest(tmp_path):
    process, report = _gpu_check(OLD_ON_NEWER_CORE, tmp_path, "--cpu")
    assert process.returncode == 0, process.stdout + process.stderr[-3000:]
    outcomes = {check["check"]: check["outcome"] for check in report["checks"]}
    assert {name for name, outcome in outcomes.items() if outcome == "SKIP"} == NEEDS_CUDA
    assert {outcome for name, outcome in outcomes.items() if name not in NEEDS_CUDA} == {"PASS"}
    assert len(outcomes) == 12
    assert report["versions"]["megatron-core"] == "0.16.1"


def test_what_it_cannot_import_is_said_in_one_line(tmp_path):
    """A release environment without Megatron-Bridge: one line, exit 2, no traceback."""
    process, _ = _gpu_check(RELEASES["megatron-lm-0.17.1"], tmp_path, "--cpu")
    assert process.returncode == 2
    assert "Traceback" not in process.stdout + process.stderr
    (line,) = process.stdout.splitlines()
    assert line.startswith("gpu_check: cannot import megatron.bridge.training.checkpointing (ModuleNotFoundError")
