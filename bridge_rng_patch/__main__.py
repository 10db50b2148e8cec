"""What bridge_rng_patch does with the training stacks installed here, and what a
checkpoint on disk holds of its ranks' RNG state.

  python -m bridge_rng_patch
      Says which patches apply to each stack installed here (Megatron-Bridge,
      Megatron-LM, verl, ms-swift), its modules imported as a training process
      imports them. Exit 0: none refused; 1: one refused; 2: no stack's
      checkpointing module can be imported.

  python -m bridge_rng_patch inspect CHECKPOINT
      Per saved iteration (Megatron's iter_*, verl's global_step_*): the RNG
      layout stored, the parallel layout of the run that wrote it, and a
      verdict. Exit 0: every iteration complete; 1: one incomplete or without
      RNG state; 2: one unreadable, or CHECKPOINT is not a checkpoint.

  python -m bridge_rng_patch run [--check] -- COMMAND
      Runs COMMAND with every Python process it starts patched; the exit code
      is COMMAND's (2 without one, 127 if not found). --check says what such
      a process would do, and runs nothing.
  bridge-rng-patch is the same command.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge_rng_patch.loops import TrainingLoop

EXIT_OK, EXIT_REFUSED, EXIT_NOT_CHECKED = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bridge_rng_patch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quiet", action="store_true", help="print the table only, not the decision log lines")
    commands = parser.add_subparsers(dest="command", metavar="{inspect,run}")
    inspecting = commands.add_parser("inspect", help="what a checkpoint holds of its ranks' RNG state")
    inspecting.add_argument("checkpoint", help="a save directory (every iter_*) or one iteration's directory")
    inspecting.add_argument("--iteration", type=int, help="only this iteration of a save directory")
    inspecting.add_argument(
        "--resume-with", metavar="LAYOUT", help="a target layout, e.g. dp=8,ep=2: what each rank gets"
    )
    inspecting.add_argument("--json", action="store_true", help="print JSON instead of a table")
    running = commands.add_parser("run", help="run COMMAND with every Python process it starts patched")
    running.add_argument("--check", action="store_true", help="say what a Python started by COMMAND would do")
    running.add_argument("job", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    options = parser.parse_args(argv)
    if options.command == "inspect":
        return inspect_command(options)
    if options.command == "run":
        from bridge_rng_patch.launcher import run

        return run(options.job, options.check, options.quiet)
    return status_command(options.quiet)


def status_command(quiet: bool) -> int:
    import bridge_rng_patch
    from bridge_rng_patch.decision import REFUSED
    from bridge_rng_patch.loops import LOOPS

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(name)s: %(message)s")
    unimportable = {loop.name: _why_not_importable(loop) for loop in LOOPS}  # importing applies the patches
    statuses = bridge_rng_patch.status()
    versions = ", ".join(f"{name} {version}" for name, version in statuses[0].versions.items())
    print(f"bridge_rng_patch {bridge_rng_patch.__version__}; found {versions}")
    checked = []
    width = max(len(patch.name) for patch in statuses)
    for loop in LOOPS:
        if unimportable[loop.name] is not None:
            print(f"{loop.name}: {unimportable[loop.name]}: nothing to patch")
            continue
        print(f"{loop.name} ({loop.module}):")
        for patch in (patch for patch in statuses if patch.loop == loop.name):
            print(f"{patch.name:<{width}} {patch.state:<11} {patch.summary}\n{'':<{width + 13}}why: {patch.reason}")
            checked.append(patch)
    if not checked:
        return EXIT_NOT_CHECKED
    return EXIT_REFUSED if any(patch.state == REFUSED for patch in checked) else EXIT_OK


def _why_not_importable(loop: TrainingLoop) -> str | None:
    """Why the loop's checkpointing module cannot be imported here, in one line; None when it imports. Its set-up
    modules, where other patches' wrappers go, are imported too, as a training process does, where they can be."""
    from bridge_rng_patch.patcher import loop_installed

    if not loop_installed(loop):
        return f"{loop.package} is not installed here"
    try:
        importlib.import_module(loop.module)
    except Exception as error:  # whatever an image lacks (Bridge, megatron-core, torch), say it in one line
        detail = f"{type(error).__name__}: {error}".splitlines()[0]
        return f"{loop.module} cannot be imported here ({detail})"
    for module in loop.before_first_step.modules:
        with contextlib.suppress(Exception):  # a patch waiting for it says so
            importlib.import_module(module)
    return None


def inspect_command(options: argparse.Namespace) -> int:
    from bridge_rng_patch.inspection import EXIT_CODES, UNREADABLE, CheckpointInputError, inspect_checkpoint

    try:
        reports = inspect_checkpoint(options.checkpoint, options.iteration, options.resume_with)
    except CheckpointInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CODES[UNREADABLE]
    if options.json:
        print(json.dumps([dataclasses.asdict(report) for report in reports], indent=1))
    else:
        print("\n\n".join(report.as_table() for report in reports))
    return max(EXIT_CODES[report.verdict] for report in reports)


if __name__ == "__main__":
    sys.exit(main())
