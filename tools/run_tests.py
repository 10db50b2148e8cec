"""Build the release environments if needed, then run the test suite in the runner release (0.2.0rc6).

``python3 tools/run_tests.py [pytest arguments]``: the README's test command, and what CI runs. Without arguments,
two pytest workers share the suite a file at a time: most of a job's time is one process importing Megatron, so
two jobs at once keep two cores busy, and a file's tests share the jobs they read.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.release_envs import REPO, RUNNER, ensure_all


def main() -> int:
    ensure_all()
    command = [str(RUNNER.python), "-m", "pytest", *(sys.argv[1:] or ["-n", "2", "--dist", "loadfile", "tests"])]
    return subprocess.run(command, cwd=REPO, env=RUNNER.environment()).returncode


if __name__ == "__main__":
    sys.exit(main())
