"""`rayimg serve`: the Ray Serve app of serving/app.py, served until Ctrl-C."""

from __future__ import annotations

from rayimg.config import ServeJob


def run(job: ServeJob) -> None:
    from serving.app import run as serve_forever

    serve_forever(job)
