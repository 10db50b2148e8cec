"""``python -m bridge_rng_patch inspect``: what checkpoints written by the real releases hold of each rank's RNG.

The checkpoints come from the same multi-process jobs as the resume tests (jobs/rng_job.py). The inspector
runs as a user runs it, in a fresh interpreter, and reads metadata only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from conftest import EP2_DP4, REPO

import bridge_rng_patch
from tools.release_envs import RELEASES

OLD = RELEASES["bridge-0.2.0rc6"]
FIXED = RELEASES["bridge-0.3.1"]
MEGATRON_LM = RELEASES["megatron-lm-0.19.2"]


def _checkpoint(jobs, env, name, **spec) -> str:
    layout = {**EP2_DP4, **{key: spec.pop(key) for key in list(spec) if key in EP2_DP4}}
    jobs.run(env, name, action="save", checkpoint_dir=jobs.checkpoint_dir(name), **layout, **spec)
    return jobs.checkpoint_dir(name)


def _inspect(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(OLD.python), "-m", "bridge_rng_patch", "inspect", *map(str, args)],
        capture_output=True,
        text=True,
        env=OLD.environment(),
        cwd=REPO,
        timeout=120,
    )


def _inspect_json(*args: object) -> tuple[int, list[dict]]:
    process = _inspect(*args, "--json")
    assert "Traceback" not in process.stderr, process.stderr
    return process.returncode, json.loads(process.stdout)


def test_unpatched_old_release_with_ep_2_is_incomplete_with_3_of_4_states_never_written(jobs):
    code, (report,) = _inspect_json(_checkpoint(jobs, OLD, "unpatched-ep2", patched=False))
    assert code == 1
    assert report["verdict"] == "incomplete"
    assert report["rng_layout"] == {"axes": "(pp, tp)", "global_shape": [1, 1], "shards": 1, "states_per_shard": 1}
    assert (report["run"]["ep"], report["run"]["dp"]) == (2, 4)
    assert "3 of 4 ranks' RNG states were never written" in report["summary"]
    assert "each whose EP rank differs from DP rank 0's loses its expert-parallel RNG stream" in report["summary"]


@pytest.mark.parametrize("core", ["0.17.1", "0.19.2"], ids=["common.pt", "common state inside the checkpoint"])
def test_unpatched_megatron_lm_checkpoint_is_incomplete_its_run_read_from_the_saved_args(jobs, core):
    """Megatron-LM keeps its args in its common state (common.pt up to 0.18, a checkpoint item from 0.19), which
    the inspector reads without running pickled code."""
    release = RELEASES[f"megatron-lm-{core}"]
    code, (report,) = _inspect_json(_checkpoint(jobs, release, f"mlm-{core}-unpatched", patched=False))
    assert (code, report["verdict"]) == (1, "incomplete")
    run = report["run"]
    assert (run["loop"], run["tp"], run["pp"], run["ep"], run["dp"]) == ("Megatron-LM", 1, 1, 2, 4)
    assert run["dp_source"] == "its saved args"
    assert "3 of 4 ranks' RNG states were never written" in report["summary"]


def test_patched_megatron_lm_checkpoint_is_complete_and_a_resume_plan_gives_each_rank_its_own(jobs):
    checkpoint = _checkpoint(jobs, MEGATRON_LM, "mlm-0.19.2-ep2")
    code, (report,) = _inspect_json(checkpoint, "--resume-with", "dp=2")
    assert (code, report["verdict"], report["run"]["loop"]) == (0, "complete", "Megatron-LM")
    # Megatron-LM's own (pp, tp) shard, its list holding every DP rank's state.
    assert report["rng_layout"] == {"axes": "(pp, tp)", "global_shape": [1, 1], "shards": 1, "states_per_shard": 4}
    assert report["summary"] == "each (pp, tp) shard holds every DP rank's RNG state (4, saved with bridge_rng_patch)"
    assert report["without_package"].startswith(
        "yes on every Megatron-LM release on the registry: every rank resumes the state of DP rank 0 of its (pp, tp)"
    )
    assert [rank["gets"] for rank in report["resume"]] == ["own state"] * 2


@pytest.mark.parametrize(
    ("env", "name", "spec"),
    [(OLD, "patched-ep2", {}), (FIXED, "fixed-ep2", {}), (OLD, "patched-ep1", {"ep": 1})],
    ids=["patched old release", "fixed 0.3.1", "EP 1"],
)
def test_checkpoint_with_every_ranks_state_is_complete(jobs, env, name, spec):
    """Every rank's state: in each (pp, tp) shard's list (the package on an old release), one shard per rank (Bridge
    0.3.1), or one state shared by the DP ranks (EP 1); whether a release without the package resumes it, and where."""
    code, (report,) = _inspect_json(_checkpoint(jobs, env, name, **spec))
    assert (code, report["verdict"]) == (0, "complete")
    fixed = env is FIXED
    assert report["rng_layout"]["axes"] == ("(pp, tp, dp)" if fixed else "(pp, tp)")
    assert report["rng_layout"]["states_per_shard"] == (None if fixed else 4 if name == "patched-ep2" else 1)
    assert report["run"]["dp"] == 4
    without = report["without_package"]
    if fixed:
        assert without.startswith("on Megatron-Bridge 0.3.0 and later at EP > 1 and this DP size; not on ")
        assert without.endswith("resume with checkpoint.load_rng=False, or with the package")
    else:
        assert without.startswith("yes on Megatron-Bridge before 0.3.0: every rank resumes the state of DP rank 0")
        assert ("not on Megatron-Bridge 0.3.0 and later at EP > 1" in without) == ("ep" not in spec)


def test_table_names_layout_run_and_verdict_and_the_function_agrees(jobs):
    checkpoint = _checkpoint(jobs, OLD, "unpatched-ep2", patched=False)
    process = _inspect(checkpoint)
    assert process.returncode == 1
    lines = process.stdout.splitlines()
    assert lines[0] == f"checkpoint   {checkpoint}/iter_0000010 (iteration 10)"
    assert lines[1].startswith("written by   Megatron-Bridge, TP 1, PP 1, EP 2, CP 1, DP 4 (DP: 4 ranks wrote shard")
    assert lines[2] == "RNG layout   by (pp, tp), global shape (1, 1), 1 shard stored"
    assert lines[3].startswith("verdict      incomplete: written with EP 2 and one RNG state per (pp, tp)")
    assert [report.verdict for report in bridge_rng_patch.inspect_checkpoint(checkpoint)] == ["incomplete"]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("dp=8,ep=2", ["own state"] * 4 + ["fresh state"] * 4),
        ("dp=2", ["own state"] * 2),
    ],
    ids=["DP grows to 8", "DP shrinks to 2"],
)
def test_resume_with_a_resized_dp_tells_what_each_rank_gets(jobs, target, expected):
    code, (report,) = _inspect_json(_checkpoint(jobs, OLD, "patched-ep2"), "--resume-with", target)
    assert code == 0
    assert [(rank["dp"], rank["gets"]) for rank in report["resume"]] == list(enumerate(expected))


@pytest.mark.parametrize(("target", "running"), [("tp=2,dp=2", (2, 1)), ("pp=2,dp=2", (1, 2))], ids=["TP", "PP"])
def test_resume_with_another_tp_or_pp_restores_no_rng_state_and_says_so(jobs, target, running):
    """Every loop ignores RNG state after a TP or PP change (torch_dist always; fsdp_dtensor with this package or
    Bridge #5100): no stored state belongs to a running rank."""
    checkpoint = _checkpoint(jobs, OLD, "patched-ep2")
    note = f"(TP, PP) {running} differs from the checkpoint's (1, 1): RNG state will not be restored"
    code, (report,) = _inspect_json(checkpoint, "--resume-with", target)
    assert code == 0
    assert report["resume_note"].startswith(note)
    assert [rank["gets"] for rank in report["resume"]] == ["fresh state"] * 4
    assert f"on a patched resume: {note}" in _inspect(checkpoint, "--resume-with", target).stdout


def test_resume_of_an_incomplete_checkpoint_gives_dp_rank_0_its_own_and_the_others_the_shared_state(jobs):
    code, (report,) = _inspect_json(_checkpoint(jobs, OLD, "unpatched-ep2", patched=False), "--resume-with", "dp=4")
    assert code == 1
    assert [rank["gets"] for rank in report["resume"]] == ["own state"] + ["shared state"] * 3


@pytest.fixture
def copy_of_patched_checkpoint(jobs, tmp_path) -> Path:
    iteration = Path(_checkpoint(jobs, OLD, "patched-ep2")) / "iter_0000010"
    return Path(shutil.copytree(iteration, tmp_path / "iter_0000010"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _scramble(path: Path) -> None:
    path.write_bytes(b"not a pickle at all" * 10)


def _fsdp_dtensor_checkpoint(iteration: Path) -> None:
    """A real PyTorch DCP checkpoint, as the fsdp_dtensor format writes it (no dist_checkpointing metadata.json),
    that no training loop wrote: no run configuration."""
    shutil.rmtree(iteration)
    code = "import sys, torch, torch.distributed.checkpoint as dcp\n"
    code += "dcp.save({'w': torch.zeros(2)}, checkpoint_id=sys.argv[1])"
    subprocess.run([str(OLD.python), "-c", code, str(iteration)], check=True, env=OLD.environment(), timeout=120)


def _legacy_torch_checkpoint(iteration: Path) -> None:
    """The legacy torch format: one pickle per model-parallel rank."""
    shutil.rmtree(iteration)
    (iteration / "mp_rank_00").mkdir(parents=True)
    code = "import sys, torch\ntorch.save({'iteration': 10, 'rng_state': []}, sys.argv[1])"
    target = iteration / "mp_rank_00" / "model_optim_rng.pt"
    subprocess.run([str(OLD.python), "-c", code, str(target)], check=True, env=OLD.environment(), timeout=120)


BAD_ITERATIONS = {
    "truncated metadata": (lambda iteration: _truncate(iteration / ".metadata"), ".metadata is truncated or corrupt"),
    "corrupt metadata": (lambda iteration: _scramble(iteration / ".metadata"), ".metadata is truncated or corrupt"),
    "missing run configuration": (
        lambda iteration: (iteration / "run_config.yaml").unlink(),
        "neither run_config.yaml (Megatron-Bridge), transformer_config.json (verl) nor Megatron-LM's or ms-swift's "
        "args in its common state, so the parallel layout of the run that wrote it is unknown",
    ),
    "corrupt run configuration": (
        lambda iteration: (iteration / "run_config.yaml").write_text("model: [unclosed"),
        "run_config.yaml: not a readable run configuration",
    ),
    "DCP checkpoint of no loop": (_fsdp_dtensor_checkpoint, "neither run_config.yaml (Megatron-Bridge),"),
    "legacy torch format": (_legacy_torch_checkpoint, "a legacy torch format checkpoint (mp_rank_*/model_optim_rng.pt"),
}


@pytest.mark.parametrize("damage", list(BAD_ITERATIONS))
def test_unreadable_iteration_gets_one_clear_line_and_exit_code_2(copy_of_patched_checkpoint, damage):
    spoil, message = BAD_ITERATIONS[damage]
    spoil(copy_of_patched_checkpoint)
    process = _inspect(copy_of_patched_checkpoint)
    assert process.returncode == 2
    assert "Traceback" not in process.stdout + process.stderr
    (line,) = process.stdout.splitlines()
    assert line.startswith(f"checkpoint {copy_of_patched_checkpoint} (iteration 10): unreadable: ")
    assert message in line


def test_a_common_state_that_inflates_to_hundreds_of_megabytes_is_refused_without_inflating_it(tmp_path):
    """A crafted common.pt of a few hundred kilobytes whose pickle inflates to 400 MiB: the inspector reads what its
    zip header states and refuses it, with exit code 2, in a process that never grows past 100 MB."""
    iteration = tmp_path / "iter_0000010"
    iteration.mkdir()
    (iteration / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    with (
        zipfile.ZipFile(iteration / "common.pt", "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("archive/data.pkl", "w") as member,
    ):
        for _ in range(400):
            member.write(bytes(2**20))
    assert (iteration / "common.pt").stat().st_size < 2**20
    inspect_and_measure = (
        "import resource, subprocess, sys\n"
        "process = subprocess.run([sys.executable, '-m', 'bridge_rng_patch', 'inspect', sys.argv[1]], "
        "capture_output=True, text=True)\n"
        "peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(process.returncode, peak_kb, process.stdout + process.stderr, sep='\\n')"
    )
    process = subprocess.run(
        [str(OLD.python), "-c", inspect_and_measure, str(iteration)],
        capture_output=True,
        text=True,
        env=OLD.environment(),
        cwd=REPO,
        timeout=120,
    )
    code, peak_kb, printed = process.stdout.split("\n", 2)
    assert int(peak_kb) < 100_000, f"the inspector grew to {int(peak_kb) // 1024} MB"
    assert int(code) == 2, printed
    assert "Traceback" not in printed
    assert "archive/data.pkl, inflated, holds 419,430,400 bytes, more than the 16 MiB this inspector reads" in printed


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["/no/such/checkpoint"], "error: /no/such/checkpoint: no such file or directory"),
        (["{empty}"], "not a Megatron-Bridge, Megatron-LM, verl or ms-swift checkpoint (no iter_* or global_step_*"),
        (["{patched}", "--iteration", "7"], "no iteration 7 (no iter_0000007 or global_step_7)"),
        (["{patched}", "--resume-with", "dp=eight"], "'dp=eight' is not AXIS=SIZE"),
    ],
    ids=["missing path", "not a checkpoint", "no such iteration", "bad target layout"],
)
def test_bad_input_gets_one_clear_line_and_exit_code_2(jobs, tmp_path, arguments, message):
    places = {"empty": tmp_path, "patched": _checkpoint(jobs, OLD, "patched-ep2")}
    process = _inspect(*(argument.format(**places) for argument in arguments))
    assert process.returncode == 2
    assert process.stdout == ""
    (line,) = process.stderr.splitlines()
    assert line.startswith("error: ") and message in line


def test_readme_example_is_what_the_inspector_prints(jobs):
    """The README shows a real run on a checkpoint like this one; only the path differs."""
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("$ python -m bridge_rng_patch inspect ") :]
    command, printed = block[: block.index("```")].rstrip("\n").split("\n", 1)
    shown_path, *arguments = command.removeprefix("$ python -m bridge_rng_patch inspect ").split()
    checkpoint = _checkpoint(jobs, OLD, "unpatched-ep2", patched=False)
    process = _inspect(checkpoint, *arguments)
    assert process.stdout.rstrip("\n") == printed.replace(shown_path, checkpoint)
