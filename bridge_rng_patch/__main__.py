"""``python -m bridge_rng_patch``: import Megatron-Bridge's checkpointing module and say what was patched.

Exits 0 when every patch is applied or not needed, 1 when one was refused, 2 when Megatron-Bridge's
checkpointing module cannot be imported here (nothing was checked).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import bridge_rng_patch
from bridge_rng_patch.patcher import REFUSED, TARGET_MODULE

EXIT_OK, EXIT_REFUSED, EXIT_NOT_CHECKED = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge_rng_patch", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="print the table only, not the decision log lines")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if options.quiet else logging.INFO, format="%(name)s: %(message)s")
    try:
        importlib.import_module(TARGET_MODULE)
    except Exception as error:  # whatever an image lacks (Bridge, megatron-core, torch), say it in one line
        unimportable = f"{type(error).__name__}: {error}".splitlines()[0]
    else:
        unimportable = None
    statuses = bridge_rng_patch.status()
    versions = ", ".join(f"{name} {version}" for name, version in statuses[0].versions.items())
    print(f"bridge_rng_patch {bridge_rng_patch.__version__}; found {versions}")
    if unimportable is not None:
        print(f"{TARGET_MODULE} cannot be imported here ({unimportable}): nothing to patch")
        return EXIT_NOT_CHECKED
    for patch in statuses:
        print(f"{patch.name:<14} {patch.state:<11} {patch.summary}\n{'':<27}why: {patch.reason}")
    return EXIT_REFUSED if any(patch.state == REFUSED for patch in statuses) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
