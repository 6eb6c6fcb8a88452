"""`rayimg prepare|train|render|serve|demo --config FILE [section.field=value ...]`.

The job's config is loaded and validated, and its model, inputs and devices checked
(:mod:`rayimg.run.preflight`), before any Ray work starts; a bad value exits with code 2 and one
line ``error: <field>: <problem>`` on stderr. A job that fails inside Ray workers exits 1 with one
line naming the root cause. Jobs run on the cluster at RAY_ADDRESS (or ``cluster.address``),
else on a local Ray cluster started in-process.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

import yaml

from rayimg.config import JOBS, ConfigError, describe, load_job, to_dict

SUMMARIES = {
    "prepare": "stream a captioned dataset, clean it and cache VAE latents / text embeddings",
    "train": "train a LoRA, DreamBooth, textual-inversion or full fine-tune on Ray Train",
    "render": "bulk-render a prompt catalog with Ray Data (resumable)",
    "serve": "serve the model and its LoRA adapters over HTTP with Ray Serve",
    "demo": "run the whole flow on the project's tiny model, on a laptop CPU",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayimg",
        description="Distributed batch trainer and renderer for text-to-image diffusion models, built on Ray.",
        epilog="Override any config field on the command line: rayimg train --config jobs/configs/sdxl_lora.yaml train.learning_rate=5e-5",
    )
    sub = parser.add_subparsers(dest="job", metavar="{" + ",".join(JOBS) + "}", required=True)
    for job in JOBS:
        p = sub.add_parser(job, help=SUMMARIES[job], description=SUMMARIES[job])
        p.add_argument("--config", "-c", help="job config YAML (see jobs/configs/)")
        p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")
        p.add_argument("--help-config", action="store_true", help="list every config field with its type, default and meaning")
        p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
    return parser


def run_job(job: str, cfg):
    """Check, then run a validated job config (imports the job's Ray wiring only now:
    ``rayimg.run.<job>``, or the Ray Serve app in ``serving/`` for ``serve``)."""
    from rayimg.run import preflight

    preflight.check(job, cfg)
    name = "serving.app" if job == "serve" else f"rayimg.run.{job}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise SystemExit(f"error: `rayimg {job}` is not available in this version of rayimg yet") from None
    _hide_ray_data_traces()
    return module.run(cfg)


# --------------------------------------------------------------------------- failures in workers
class _NoTraces(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "ray.data.exceptions"


def _hide_ray_data_traces() -> None:
    """Ray Data prints a failed dataset's stack trace on the console before raising it; the CLI
    prints the root cause itself, so that trace goes only to Ray Data's log file."""
    import ray.data  # noqa: F401  (sets up Ray Data's log handlers)

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.addFilter(_NoTraces())


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FIELD_TEXT = re.compile(r"^[a-z_][a-z0-9_]*\.[a-z0-9_.\[\]]+(:|\s)")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (.*)$")


def _ray_failure_types() -> tuple[tuple[type, ...], dict[str, type]]:
    """(the exception types that wrap a failure in Ray workers, the unwrappable ones by role);
    empty when Ray was never imported (then no failure came from a worker)."""
    if "ray" not in sys.modules:
        return (), {}
    from ray.exceptions import RayActorError, RayError, RayTaskError

    roles: dict[str, type] = {"task": RayTaskError, "actor": RayActorError}
    wrappers: list[type] = [RayError]
    try:
        from ray.train.v2.api.exceptions import ControllerError, TrainingFailedError, WorkerGroupError

        roles.update(worker_group=WorkerGroupError, controller=ControllerError)
        wrappers.append(TrainingFailedError)
    except ImportError:
        pass
    try:
        from ray.train.base_trainer import TrainingFailedError as TrainingFailedErrorV1

        wrappers.append(TrainingFailedErrorV1)
    except ImportError:
        pass
    return tuple(wrappers), roles


def root_cause(exc: BaseException) -> BaseException | str | None:
    """What failed inside the Ray workers behind ``exc``: the original exception (unwrapping
    task errors' ``.cause``, Ray Train's worker and controller failures and ``__cause__``
    chains), or the last line of the traceback text of an actor that died in its constructor.
    None when ``exc`` is not a failure reported by Ray."""
    wrappers, roles = _ray_failure_types()
    if not wrappers or not isinstance(exc, wrappers):
        return None
    cause: BaseException = exc
    for _ in range(32):
        if "worker_group" in roles and isinstance(cause, roles["worker_group"]) and cause.worker_failures:
            nxt = cause.worker_failures[min(cause.worker_failures)]
        elif "controller" in roles and isinstance(cause, roles["controller"]):
            nxt = cause.controller_failure
        elif isinstance(cause, roles["task"]) and cause.cause is not None and cause.cause is not cause:
            nxt = cause.cause
        elif isinstance(cause, roles["actor"]) and cause.actor_init_failed:
            return _last_exception_line(cause.error_msg) or cause
        elif isinstance(cause, wrappers) and isinstance(cause.__cause__, BaseException) \
                and type(cause.__cause__).__name__ != "SystemException":
            nxt = cause.__cause__
        else:
            break
        cause = nxt
    return cause


def _last_exception_line(text: str) -> str | None:
    for line in reversed(_ANSI.sub("", text).splitlines()):
        if _EXCEPTION_LINE.match(line.strip()):
            return line.strip()
    return None


def failure(exc: Exception) -> tuple[str, int] | None:
    """(one line, exit code) for a job's exception: a model that failed the loader's checks on
    the driver is 2, like any config error; a failure inside Ray workers is 1, told by its root
    cause. None for anything else (a bug, shown with its traceback)."""
    loader = sys.modules.get("rayimg.models.loader")
    if loader is not None and isinstance(exc, loader.ModelLoadError):
        from rayimg.run.preflight import model_config_error

        return str(model_config_error(exc)), 2
    cause = root_cause(exc)
    return (describe_failure(cause), 1) if cause is not None else None


def describe_failure(cause: BaseException | str) -> str:
    """One line: ``<field>: <problem>`` when the cause names its field, else ``<Type>: <message>``."""
    from rayimg.models.loader import ModelLoadError
    from rayimg.run.preflight import model_config_error

    if isinstance(cause, str):
        m = _EXCEPTION_LINE.match(cause)
        type_name, text = (m.group(1).rsplit(".", 1)[-1], m.group(2)) if m else ("", cause)
    else:
        type_name, text = type(cause).__name__, str(cause)
        if "ray" in sys.modules:
            from ray.exceptions import RayTaskError

            if isinstance(cause, RayTaskError):  # its str is the worker's traceback
                text = _last_exception_line(str(cause)) or text
                m = _EXCEPTION_LINE.match(text)
                type_name, text = (m.group(1).rsplit(".", 1)[-1], m.group(2)) if m else (type_name, text)
    text = " ".join(_ANSI.sub("", text).split())
    if type_name == "ModelLoadError":
        return str(model_config_error(ModelLoadError(text)))
    if type_name == "ConfigError" or _FIELD_TEXT.match(text):
        return text
    return f"{type_name}: {text}" if type_name else text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.help_config:
        print("\n".join(describe(JOBS[args.job])))
        return 0
    try:
        cfg = load_job(args.job, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    try:
        run_job(args.job, cfg)
    except ConfigError as e:  # raised by checks that need the data or the model (e.g. a missing dataset)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        reported = failure(e)
        if reported is None:
            raise
        line, code = reported
        print(f"error: {line}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
