"""Checkpoints on object storage: the real Multi-Storage Client (``msc://``), with a profile of type ``file``
standing in for an object store (no network), and the real releases reading and writing through it.

With ``multistorageclient`` importable, megatron-core enables its ``MultiStorageClientFeature`` by itself and
Bridge and megatron-core read ``msc://`` paths through it; the package must read the stored RNG layout there
too, and leave alone what it cannot judge.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import EP2_DP4, REPO, assert_each_rank_resumes_its_own_state, run_python

from tools.release_envs import FIXED_WITH_MSC, OLD_WITH_MSC, ensure

EP2_DP2 = {**EP2_DP4, "world": 2}
PROFILE = "checkpoints"


@pytest.fixture(scope="session")
def msc_root(tmp_path_factory):
    """The folder a ``file`` profile named ``checkpoints`` serves, with ``MSC_CONFIG`` naming its configuration
    for every job of the session."""
    root = tmp_path_factory.mktemp("object-store")
    config = root.parent / "msc_config.json"
    config.write_text(
        json.dumps({"profiles": {PROFILE: {"storage_provider": {"type": "file", "options": {"base_path": str(root)}}}}})
    )
    before = os.environ.get("MSC_CONFIG")
    os.environ["MSC_CONFIG"] = str(config)
    yield root
    if before is None:
        del os.environ["MSC_CONFIG"]
    else:
        os.environ["MSC_CONFIG"] = before


def _msc(name: str) -> str:
    return f"msc://{PROFILE}/{name}"


def _save(jobs, env, name, layout=EP2_DP4, **spec):
    return jobs.run(env, name, action="save", checkpoint_dir=_msc(name), **layout, **spec)


def _load(jobs, env, checkpoint, name, layout=EP2_DP4, **spec):
    return jobs.run(env, name, action="load", checkpoint_dir=_msc(checkpoint), **layout, **spec)


def test_save_and_resume_through_msc_give_every_rank_its_own_state(jobs, msc_root):
    saved = _save(jobs, OLD_WITH_MSC, "msc-ep2")
    assert saved[0]["stored_keys"] == ["rng_state/shard_0.0_1.1"]
    assert (msc_root / "msc-ep2" / "iter_0000010" / ".metadata").is_file()  # written through the profile
    loaded = _load(jobs, OLD_WITH_MSC, "msc-ep2", "msc-ep2-load")
    assert_each_rank_resumes_its_own_state(saved, loaded)
    assert [rank["layout_reads"] for rank in loaded] == [1, 0, 0, 0]


def test_dp_shrink_through_msc_gives_each_remaining_rank_its_own_state(jobs, msc_root):
    saved = _save(jobs, OLD_WITH_MSC, "msc-ep2")
    assert_each_rank_resumes_its_own_state(saved, _load(jobs, OLD_WITH_MSC, "msc-ep2", "msc-ep2-dp2", EP2_DP2))


def test_fixed_release_resumes_through_msc_after_a_dp_shrink(jobs, msc_root):
    saved = _save(jobs, FIXED_WITH_MSC, "msc-fixed-ep2")
    loaded = _load(jobs, FIXED_WITH_MSC, "msc-fixed-ep2", "msc-fixed-ep2-dp2", EP2_DP2)
    assert_each_rank_resumes_its_own_state(saved, loaded)


def _inspect(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(OLD_WITH_MSC.python), "-m", "bridge_rng_patch", "inspect", *map(str, args)],
        capture_output=True,
        text=True,
        env=ensure(OLD_WITH_MSC).environment(),
        cwd=REPO,
        timeout=120,
    )


def test_inspect_reads_an_msc_checkpoint_as_it_reads_its_directory(jobs, msc_root):
    _save(jobs, OLD_WITH_MSC, "msc-ep2")
    through_msc = _inspect(_msc("msc-ep2"), "--resume-with", "dp=8", "--json")
    on_disk = _inspect(msc_root / "msc-ep2", "--resume-with", "dp=8", "--json")
    assert (through_msc.returncode, through_msc.stderr) == (0, "")
    assert json.loads(through_msc.stdout.replace(_msc("msc-ep2"), str(msc_root / "msc-ep2"))) == json.loads(
        on_disk.stdout
    )


def test_inspect_of_a_profile_that_is_not_configured_says_so_in_one_line(msc_root):
    process = _inspect("msc://no-such-profile/checkpoints")
    assert (process.returncode, process.stdout) == (2, "")
    (line,) = process.stderr.splitlines()
    assert line.startswith("error: msc://no-such-profile/checkpoints: the Multi-Storage Client cannot resolve it")
    assert 'Profile "no-such-profile" not found' in line


# The dist-load wrapper on a path the package cannot judge; only the load it wraps is a stand-in (it records).
LOAD_WITH_UNJUDGED_STORAGE = """
import json, logging
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
import megatron.bridge.training.checkpointing as checkpointing
import bridge_rng_patch
from bridge_rng_patch.loops import BRIDGE
from bridge_rng_patch.probe import InstalledStack
from bridge_rng_patch.resume import ResumeWatch
from bridge_rng_patch.layout_load import LayoutAwareDistLoad
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.msc_utils import MultiStorageClientFeature
if {disable_msc}:
    MultiStorageClientFeature.disable()
request = ShardedObject("rng_state", [{{}}], (1, 1), (0, 0), replica_id=0)
loaded = []
def load(**call):
    loaded.append(call["sharded_state_dict"]["rng_state"] is request)
    return ({{"rng_state": ["as the release loaded it"]}}, "", False, None)
stack = InstalledStack(BRIDGE, checkpointing)
wrapper = LayoutAwareDistLoad(stack, ResumeWatch(stack))
result = wrapper(load, None, (), dict(
    load_dir={load_dir!r}, ckpt_cfg=None, rank0=False, sharded_state_dict={{"rng_state": request}},
    iteration=10, release=False,
))
print(json.dumps({{"request_untouched": loaded, "state_dict": result[0]}}))
"""


@pytest.mark.parametrize(
    ("load_dir", "disable_msc", "why"),
    [
        ("s3://bucket/checkpoints", False, "its s3:// scheme is not one bridge_rng_patch reads"),
        ("msc://checkpoints/run", True, "an msc:// path, and megatron-core's MultiStorageClientFeature is not enabled"),
    ],
    ids=["unknown scheme", "msc without the feature"],
)
def test_storage_the_package_cannot_judge_leaves_the_releases_request_alone(load_dir, disable_msc, why):
    process = run_python(OLD_WITH_MSC, LOAD_WITH_UNJUDGED_STORAGE.format(load_dir=load_dir, disable_msc=disable_msc))
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads(process.stdout.splitlines()[-1])
    assert result == {"request_untouched": [True], "state_dict": {"rng_state": ["as the release loaded it"]}}
    (line,) = [line for line in process.stderr.splitlines() if "left as the release made it" in line]
    assert line == (
        f"bridge_rng_patch: checkpoint {load_dir}/iter_0000010: {why}"
        + (" here" if disable_msc else " (file system paths and msc://)")
        + "; its RNG request is left as the release made it"
    )
