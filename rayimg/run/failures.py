"""A job's failure as one line for ``rayimg <job>`` (rayimg/cli.py): the root cause behind Ray's
wrappers (task errors, actors that died in their constructor, Ray Train's worker and controller
failures), and Ray Data's console stack trace kept to its log file, so that a failure in a
worker ends the output with one ``error: ...`` line instead of pages of traces.
"""

from __future__ import annotations

import logging
import re
import sys


class _NoTraces(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "ray.data.exceptions"


def hide_ray_data_traces() -> None:
    """Ray Data prints a failed dataset's stack trace on the console before raising it; the CLI
    prints the root cause itself, so that trace goes only to Ray Data's log file."""
    import ray.data  # noqa: F401  (sets up Ray Data's log handlers)

    for handler in logging.getLogger("ray.data").handlers:
        console = not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__
        if console and not any(isinstance(f, _NoTraces) for f in handler.filters):
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


def disconnect() -> None:
    """Leave Ray (stopping a local cluster), so the workers' last log lines come out before the
    error line rather than after it."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # the error line matters more than a clean exit
            pass


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
