"""What every `ray job submit` entry point in jobs/ does: run `rayimg <job>` from the working dir.

The entrypoint's `python` is whatever comes first on the PATH the Ray cluster was started with;
a python without rayimg's dependencies gets one line saying so instead of an ImportError page.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the working dir: holds the rayimg package


def run(job: str) -> int:
    sys.path.insert(0, str(REPO))
    try:
        import diffusers  # noqa: F401  (what the jobs need, imported up front to tell a wrong python at once)
        import ray  # noqa: F401
        import torch  # noqa: F401

        from rayimg.cli import main
    except ModuleNotFoundError as e:
        print(f"error: {sys.executable} cannot import {e.name!r}: `ray job submit` runs the entrypoint with the `python` "
              "first on the PATH the Ray cluster was started with; start the cluster from the project's environment "
              "(source .venv/bin/activate; ray start --head ...) or name that python in the entrypoint", file=sys.stderr)
        return 2
    return main([job, *sys.argv[1:]])
