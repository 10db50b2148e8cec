"""``bridge-rng-patch run -- COMMAND``: patch a job without editing its training script. COMMAND runs, exec'd in place
(its process id, signals and exit code), with the package's ``sitecustomize`` first on ``PYTHONPATH``, which imports
the package and then the ``sitecustomize`` that was there: every Python process it starts, torchrun's workers too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

BOOTSTRAP = Path(__file__).resolve().parent / "bootstrap"
USAGE = "bridge-rng-patch run [--check] -- COMMAND [ARGS...]"
EXIT_USAGE, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND = (2, 126, 127)  # the shell's codes for the last two

# Run by the Python that COMMAND would start, under the same environment: did the bootstrap import the package
# before any code of the process ran, and what does it decide there.
_CHECK = """
import sys
if "bridge_rng_patch" not in sys.modules:
    print(f"a Python started by COMMAND ({sys.executable}) does not import bridge_rng_patch at start-up")
    sys.exit(1)
import bridge_rng_patch
from bridge_rng_patch.__main__ import main
where = bridge_rng_patch.__file__
print(f"a Python started by COMMAND ({sys.executable}) imports bridge_rng_patch first, from {where}")
sys.exit(main(sys.argv[1:]))
"""


def environment() -> dict[str, str]:
    environment = dict(os.environ)
    existing = environment.get("PYTHONPATH")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, (str(BOOTSTRAP), existing)))
    return environment


def run(command: list[str], check: bool = False, quiet: bool = False) -> int:
    """Exec COMMAND under the bootstrap environment; with ``check``, say what its Python would do instead."""
    if command[:1] == ["--"]:
        command = command[1:]
    env = environment()
    if check:
        return _check(command, env, quiet)
    if not command:
        return _fail(EXIT_USAGE, f"no COMMAND given; usage: {USAGE}")
    executable = _executable(command[0], env)
    if executable is None:
        return _fail(EXIT_NOT_FOUND, f"{command[0]}: command not found")
    try:
        os.execve(executable, command, env)
    except OSError as error:
        return _fail(EXIT_NOT_EXECUTABLE, f"{command[0]}: cannot be run ({error.strerror or error})")


def _check(command: list[str], env: dict[str, str], quiet: bool) -> int:
    """Runs the Python COMMAND would start, under the bootstrap environment, to say what it does."""
    python = _python_of(command, env) if command else sys.executable
    if python is None:
        return _fail(EXIT_NOT_FOUND, f"{command[0]}: command not found")
    arguments = ["--quiet"] if quiet else []
    try:
        return subprocess.run([python, "-c", _CHECK, *arguments], env=env).returncode
    except OSError as error:
        return _fail(EXIT_NOT_EXECUTABLE, f"{python}: cannot be run ({error.strerror or error})")


def _python_of(command: list[str], env: dict[str, str]) -> str | None:
    """The interpreter COMMAND runs: itself, the one its ``#!`` line names (torchrun), else this launcher's."""
    executable = _executable(command[0], env)
    if executable is None:
        return None
    if Path(executable).name.startswith("python"):
        return executable
    try:
        with open(executable, "rb") as script:
            first_line = script.readline(512)
    except OSError:
        return sys.executable
    if first_line.startswith(b"#!"):
        interpreter = first_line[2:].decode(errors="replace").split()
        if interpreter and Path(interpreter[0]).name.startswith("python"):
            return interpreter[0]
        if interpreter[:1] == ["/usr/bin/env"] and len(interpreter) > 1 and interpreter[1].startswith("python"):
            return shutil.which(interpreter[1], path=env.get("PATH")) or sys.executable
    return sys.executable


def _executable(name: str, env: dict[str, str]) -> str | None:
    found = shutil.which(name, path=env.get("PATH"))
    if found is None and os.sep in name and os.path.isfile(name):
        return name  # exists but is not executable: exec says why
    return found


def _fail(code: int, message: str) -> int:
    print(f"bridge-rng-patch run: {message}", file=sys.stderr)
    return code
