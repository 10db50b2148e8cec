"""``python -m bridge_rng_patch``: import Megatron-Bridge's checkpointing module and say what was patched."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import bridge_rng_patch
from bridge_rng_patch.patcher import REFUSED, TARGET_MODULE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge_rng_patch", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="print the table only, not the decision log lines")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if options.quiet else logging.INFO, format="%(name)s: %(message)s")
    try:
        importlib.import_module(TARGET_MODULE)
    except ImportError as error:
        print(f"{TARGET_MODULE} cannot be imported here: {error}")
    statuses = bridge_rng_patch.status()
    versions = ", ".join(f"{name} {version or 'not installed'}" for name, version in statuses[0].versions.items())
    print(f"bridge_rng_patch {bridge_rng_patch.__version__}; found {versions}")
    for patch in statuses:
        print(f"{patch.name:<14} {patch.state:<11} {patch.summary}\n{'':<27}why: {patch.reason}")
    return 1 if any(patch.state == REFUSED for patch in statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
