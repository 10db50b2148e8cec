"""``bridge-rng-patch run -- COMMAND``: a job patched without editing its training script.

The launcher runs as users run it (``python -m bridge_rng_patch run``; the installed console script in
test_install), around the real torchrun (``python -m torch.distributed.run``) and a real old release.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, assert_each_rank_resumes_its_own_state, coordinates, saved_by_coordinates

from tools.release_envs import RELEASES, ensure

OLD = RELEASES["bridge-0.2.0rc6"]
WORKER = REPO / "tests" / "jobs" / "torchrun_worker.py"
LAUNCH = ("-m", "bridge_rng_patch", "run", "--")


def _run(*command: object, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    environment = ensure(OLD).environment({**os.environ, "PYTHONWARNINGS": "ignore"})
    environment.update(env or {})
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO,
        timeout=600,
        **kwargs,
    )


def _torchrun(out_dir, action: str, checkpoint_dir, launcher: bool) -> list[dict]:
    """4 workers on the old release, EP 2, from a training script that never imports the package."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {"tp": 1, "pp": 1, "ep": 2, "action": action, "checkpoint_dir": str(checkpoint_dir), "out": str(out_dir)}
    torchrun = [OLD.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    command = [*torchrun, WORKER, json.dumps(spec)]
    process = _run(*([OLD.python, *LAUNCH] if launcher else []), *command)
    reports = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(4)]
    crashes = [report["crash"] for report in reports if "crash" in report]
    assert process.returncode == 0 and not crashes, f"{process.stderr[-3000:]}\n{crashes[:1]}"
    return reports


@pytest.fixture(scope="module")
def torchrun_jobs(tmp_path_factory) -> dict[bool, tuple[list[dict], list[dict]]]:
    """Save, then in a second launch resume, with and without the launcher."""
    work = tmp_path_factory.mktemp("torchrun")
    runs = {}
    for launcher in (True, False):
        name = "run" if launcher else "plain"
        saved = _torchrun(work / f"{name}-save", "save", work / name, launcher)
        runs[launcher] = saved, _torchrun(work / f"{name}-load", "load", work / name, launcher)
    return runs


def test_torchrun_under_run_resumes_every_rank_bit_exact_without_editing_the_script(torchrun_jobs):
    saved, loaded = torchrun_jobs[True]
    assert all(report["package_imported_at_start"] for report in saved + loaded)
    assert (saved[0]["stored_keys"], saved[0]["stored_states"]) == (["rng_state/shard_0.0_1.1"], [4])
    assert_each_rank_resumes_its_own_state(saved, loaded)


def test_the_same_torchrun_launches_without_run_lose_3_of_4_ranks_streams(torchrun_jobs):
    saved, loaded = torchrun_jobs[False]
    assert not any(report["package_imported_at_start"] for report in saved + loaded)
    assert saved[0]["stored_keys"] == ["rng_state/shard_0.0_1.1"]
    own = saved_by_coordinates(saved)
    assert [rank["loaded"] == own[coordinates(rank)] for rank in loaded] == [True, False, False, False]


def test_an_existing_pythonpath_and_sitecustomize_keep_working(tmp_path):
    # It marks the process it runs in (not the environment, which the launcher's own process would pass on).
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.image_sitecustomize_ran = 'yes'\n")
    (tmp_path / "image_module.py").write_text("WHERE = 'on the image PYTHONPATH'\n")
    code = (
        "import json, sys, image_module\n"
        "print(json.dumps(['bridge_rng_patch' in sys.modules, getattr(sys, 'image_sitecustomize_ran', None),"
        " image_module.WHERE]))"
    )
    image_path = os.pathsep.join([str(tmp_path), str(REPO)])
    without = _run(sys.executable, "-c", code, env={"PYTHONPATH": image_path})
    under_run = _run(OLD.python, *LAUNCH, sys.executable, "-c", code, env={"PYTHONPATH": image_path})
    assert json.loads(without.stdout) == [False, "yes", "on the image PYTHONPATH"]
    assert json.loads(under_run.stdout) == [True, "yes", "on the image PYTHONPATH"], under_run.stderr


def test_the_commands_exit_code_reaches_the_caller():
    assert _run(OLD.python, *LAUNCH, sys.executable, "-c", "import sys; sys.exit(7)").returncode == 7


def test_run_replaces_itself_with_the_command_so_signals_reach_the_job():
    """Same process id, and SIGTERM ends the job as it ends it without the launcher."""
    code = "import os, sys, time; print(os.getpid(), flush=True); time.sleep(60)"
    outcomes = []
    for launcher in ([str(OLD.python), *LAUNCH], []):
        process = subprocess.Popen(
            [*launcher, sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            env=ensure(OLD).environment(),
        )
        reported_pid = int(process.stdout.readline())
        process.send_signal(signal.SIGTERM)
        outcomes.append((reported_pid == process.pid, process.wait(timeout=30)))
        process.stdout.close()
    assert outcomes == [(True, -signal.SIGTERM), (True, -signal.SIGTERM)]


@pytest.mark.parametrize(
    ("arguments", "code", "message"),
    [
        ([], 2, "bridge-rng-patch run: no COMMAND given; usage: bridge-rng-patch run [--check] -- COMMAND [ARGS...]"),
        (["--", "no-such-command", "--flag"], 127, "bridge-rng-patch run: no-such-command: command not found"),
        (["--", "{plain_file}"], 126, "bridge-rng-patch run: {plain_file}: cannot be run (Permission denied)"),
    ],
    ids=["no command", "command not found", "not executable"],
)
def test_bad_input_gets_one_line_and_a_non_zero_exit(tmp_path, arguments, code, message):
    plain_file = tmp_path / "notes.txt"
    plain_file.write_text("not a program\n")
    arguments = [argument.format(plain_file=plain_file) for argument in arguments]
    process = _run(OLD.python, "-m", "bridge_rng_patch", "run", *arguments)
    assert (process.returncode, process.stdout) == (code, "")
    assert process.stderr.splitlines() == [message.format(plain_file=plain_file)]


def test_check_says_what_a_python_started_by_the_command_would_do_without_running_it(tmp_path):
    torchrun = str(OLD.python.parent / "torchrun")  # a console script: its #! line names the job's Python
    started = time.monotonic()
    process = _run(OLD.python, "-m", "bridge_rng_patch", "--quiet", "run", "--check", "--", torchrun, "never_run.py")
    assert process.returncode == 0, process.stderr[-2000:]
    lines = process.stdout.splitlines()
    assert lines[0] == (
        f"a Python started by COMMAND ({OLD.python}) imports bridge_rng_patch first, "
        f"from {REPO / 'bridge_rng_patch' / '__init__.py'}"
    )
    assert [line.split()[:2] for line in lines if line.startswith(("save_", "tracker_", "layout_", "resume_"))] == [
        ["save_sharding", "applied"],
        ["tracker_restore", "applied"],
        ["layout_load", "applied"],
        ["resume_audit", "applied"],
    ]
    assert time.monotonic() - started < 120


def test_disable_switch_still_switches_the_patches_off_under_run():
    code = "import json, bridge_rng_patch; print(json.dumps([s.state for s in bridge_rng_patch.status()]))"
    process = _run(OLD.python, *LAUNCH, OLD.python, "-c", code, env={"BRIDGE_RNG_PATCH_DISABLE": "1"})
    assert json.loads(process.stdout) == ["disabled"] * 24  # the four stacks' six patches
