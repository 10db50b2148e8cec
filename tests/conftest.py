"""Fixtures: the real Megatron-Bridge release environments, and running code or jobs inside them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools.jobs import JobParents, coordinates, crash_summary, lost_streams, saved_by_coordinates  # noqa: E402
from tools.release_envs import Release, ensure  # noqa: E402


def run_python(env: Release, code: str, *, extra_env: dict[str, str] | None = None, timeout: int = 300):
    """Run ``code`` in a fresh interpreter of ``env``; returns the completed process (stdout, stderr, rc)."""
    inherited = {key: value for key, value in os.environ.items() if key != "BRIDGE_RNG_PATCH_DISABLE"}
    environment = env.environment(inherited)
    environment.update(PYTHONWARNINGS="ignore", **(extra_env or {}))
    return subprocess.run(
        [str(ensure(env).python), "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
        cwd=REPO,
    )


EP2_DP4 = {"world": 4, "tp": 1, "pp": 1, "ep": 2}


class Jobs:
    """Runs each named job once per test session, so that several tests can read one checkpoint's results; jobs of
    one release and set-up fork their ranks from one parent that imported the release once (``tools.jobs``)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._results: dict[str, list[dict]] = {}
        self._parents = JobParents()

    def checkpoint_dir(self, name: str) -> str:
        return str(self.base / name)

    def run(self, env: Release, name: str, **spec) -> list[dict]:
        if name not in self._results:
            results = self._parents.run(ensure(env), spec, self.base, name)
            crashes = crash_summary(results)
            assert crashes is None, f"job {name} in {env.name} crashed:\n{crashes}"
            self._results[name] = results
        return self._results[name]

    def save(self, env: Release, name: str, layout: dict = EP2_DP4, **spec) -> list[dict]:
        """Save into the checkpoint directory named ``name``."""
        return self.run(env, name, action="save", checkpoint_dir=self.checkpoint_dir(name), **layout, **spec)

    def load(self, env: Release, checkpoint: str, name: str, layout: dict = EP2_DP4, **spec) -> list[dict]:
        """Load the checkpoint that the save named ``checkpoint`` wrote."""
        return self.run(env, name, action="load", checkpoint_dir=self.checkpoint_dir(checkpoint), **layout, **spec)


@pytest.fixture(scope="session")
def jobs(tmp_path_factory) -> Jobs:
    return Jobs(tmp_path_factory.mktemp("jobs"))


def assert_each_rank_resumes_its_own_state(saved: list[dict], loaded: list[dict], stored_dp_size: int | None = None):
    """Each rank has its own saved state back, bit-exact (and not its fresh one); with ``stored_dp_size``, a rank
    whose DP rank the checkpoint never held keeps its fresh state instead."""
    own = saved_by_coordinates(saved)
    for rank in loaded:
        assert rank["error"] is None, f"rank {rank['rank']}: {rank['error']}"
        if stored_dp_size is not None and rank["coords"]["dp"] >= stored_dp_size:
            assert rank["loaded"] == rank["fresh"], f"rank {rank['rank']} did not keep its fresh state"
            continue
        assert rank["fresh"] != own[coordinates(rank)]
        assert rank["loaded"] == own[coordinates(rank)], f"rank {rank['rank']} did not get its own state back"


def assert_every_rank_keeps_its_fresh_state(loaded: list[dict]) -> None:
    """No RNG source of any rank was restored: each holds the fresh state it was seeded with before the load."""
    for rank in loaded:
        assert rank["error"] is None, f"rank {rank['rank']}: {rank['error']}"
        changed = lost_streams(rank["fresh"], rank["loaded"])
        assert not changed, f"rank {rank['rank']} did not keep its fresh state: {', '.join(changed)} restored"


def rank_zero_logs(results: list[dict]) -> str:
    return "\n".join(results[0]["logs"])
