"""The wheels tools/gpu_check.py needs on the device, downloaded here into ``.whl/`` for the device's Python 3.12.

The device reaches no registry: its image has Python 3.12 with a CUDA torch and much else (the device tool's
KINDS.md lists it), but not megatron-core, Megatron-Bridge, or the versions of a few pure-Python packages that
Bridge 0.2.0rc6's checkpointing module imports (it needs transformers < 5, which needs huggingface-hub < 1.0 and
tokenizers < 0.23; the image has newer ones). These travel as wheels, about 22 MB, under the tool's 64 MiB.

``python3 tools/gpu_wheels.py``, then in one device call, carrying ``.whl``:
``python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
&& PYTHONPATH=/tmp/site:. python3 tools/gpu_check.py --json $OUT/gpu_check.json``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

WHEELS = Path(__file__).resolve().parent.parent / ".whl"
# megatron-core 0.16.1 has both its own graph-safe helpers and (by swapping them) the package's; 0.2.0rc6 imports
# with it once nvidia-modelopt is there. The rest: what that import needs beyond the device image, at the versions
# the tests' environments run (datasets 3.6 caps fsspec, dill and multiprocess).
REQUIREMENTS = (
    "megatron-core==0.16.1",
    "megatron-bridge==0.2.0rc6",
    "nvidia-modelopt==0.47.0",
    "transformers==4.57.6",
    "huggingface-hub==0.36.2",
    "tokenizers==0.22.2",
    "omegaconf==2.4.0",
    "datasets==3.6.0",
    "fsspec==2025.3.0",
    "dill==0.3.8",
    "multiprocess==0.70.16",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LIMIT_BYTES = 64 * 1024 * 1024


def main() -> int:
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS), *REQUIREMENTS]
    subprocess.run(command, check=True)
    wheels = sorted(WHEELS.glob("*.whl"))
    size = sum(wheel.stat().st_size for wheel in wheels)
    print(f"{len(wheels)} wheels, {size / 1e6:.1f} MB in {WHEELS} (the device tool carries at most 64 MiB)")
    return 0 if size < LIMIT_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
