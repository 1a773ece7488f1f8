"""Structured logs: one JSON object per line, for machines; plain text for people."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime
from types import TracebackType

__all__ = [
    "JSONFormatter",
    "TextFormatter",
    "announce",
    "configure_logging",
    "logging_format",
    "reset_logging_format",
]

log = logging.getLogger("trustmesh")

#: The format the last :func:`configure_logging` chose; None before it was called.
_format: str | None = None

#: Loggers that libraries configure with handlers of their own (plain text) and that
#: must reach ours instead.
_LIBRARY_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "gunicorn")

# Attributes every LogRecord has; anything else was passed with extra={...}.
# uvicorn's color_message repeats msg with ANSI colour codes.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class JSONFormatter(logging.Formatter):
    """Format a record as JSON: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


#: Control characters (CR, LF, ESC...) that could forge or hide lines in a text log.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


class TextFormatter(logging.Formatter):
    """Readable lines; control characters in the message are written as ``\\xNN``, so a
    request path like ``/x%0d%0aFORGED`` cannot start a forged line (tracebacks, added
    after the message, keep their lines)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return _CONTROL.sub(_escape, super().formatMessage(record))


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Send logs to stderr as JSON lines (``json``) or readable text (``text``).

    Everything a server prints goes through this one handler, so that in ``json`` mode
    every line is JSON: uvicorn's and gunicorn's loggers lose their own handlers and
    propagate here (serve with ``log_config=None``, see :func:`trustmesh.serving.uvicorn_config`),
    warnings become ``py.warnings`` records, and uncaught exceptions (main thread and
    other threads) are logged instead of printed.
    """
    global _format
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for name in _LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers[:] = []
        library.propagate = True
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    _format = fmt


def logging_format() -> str | None:
    """The format :func:`configure_logging` set (``json``/``text``), or None."""
    return _format


def reset_logging_format() -> None:
    """Forget the format (the CLI calls this per invocation; the handler stays)."""
    global _format
    _format = None


def announce(message: str, *, event: str, level: int = logging.INFO, **fields: object) -> None:
    """Print one line for the operator whatever the log level: a JSON object (with
    ``event`` and ``fields``) in ``json`` mode, else ``message`` as it is.

    Used for a server's ready line and the CLI's closing error, which must also be JSON
    when the logs are.
    """
    if _format != "json":
        print(message, file=sys.stderr, flush=True)
        return
    record = logging.makeLogRecord(
        {
            "name": "trustmesh.cli",
            "levelno": level,
            "levelname": logging.getLevelName(level),
            "msg": message,
            "event": event,
            **fields,
        }
    )
    print(JSONFormatter().format(record), file=sys.stderr, flush=True)


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    log.critical("uncaught exception", exc_info=(kind, exc, tb), extra={"event": "crash"})


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    log.critical(
        "uncaught exception in thread %s",
        args.thread.name if args.thread is not None else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
        extra={"event": "crash"},
    )
