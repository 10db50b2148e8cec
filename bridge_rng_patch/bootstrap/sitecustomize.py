"""Put first on ``PYTHONPATH`` by ``bridge-rng-patch run``: each Python process of the job imports bridge_rng_patch
before its own code runs, then the ``sitecustomize`` that was there before (Python imports only the first on its
path), as ddtrace-run and opentelemetry-instrument chain theirs."""

import importlib.machinery
import importlib.util
import os
import sys


def _import_the_package() -> None:
    try:
        import bridge_rng_patch  # noqa: F401
    except Exception as error:  # never stop the job's own start-up; say once, in one line, that it runs unpatched
        print(
            f"bridge_rng_patch: cannot be imported by {sys.executable} ({error!r}); this process runs unpatched",
            file=sys.stderr,
        )


def _run_the_next_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_import_the_package()
_run_the_next_sitecustomize()
