"""Log record formats: the default text line, and one JSON object per line (``log_format=json``).

:func:`logging_config` is a :func:`logging.config.dictConfig` dictionary (the way uvicorn
configures its logging); the JSON formatter is one entry of it. Log calls that concern one
execution pass ``extra=log_fields(...)`` so a JSON line carries ``execution_id``, ``thing`` and
``action`` as fields a log pipeline can filter on; the text format ignores them.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Record attributes copied into a JSON line when a log call set them (through ``extra=``).
CONTEXT_FIELDS = ("execution_id", "thing", "action")
# Libraries that are quiet unless DEBUG is asked for.
NOISY_LOGGERS = ("amqtt", "transitions", "websockets", "aiohttp")


def log_fields(execution_id: str | None = None, thing: str | None = None, action: str | None = None) -> dict[str, str]:
    """The ``extra=`` of a log call about one execution (fields left None are omitted)."""
    fields = {"execution_id": execution_id, "thing": thing, "action": action}
    return {k: v for k, v in fields.items() if v is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp (UTC, ISO 8601), level, logger, message, context fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON (a traceback, if any, in ``exception``)."""
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: a non-JSON argument in extra= must not lose the line.
        return json.dumps(line, ensure_ascii=False, default=str)


def logging_config(level: str, fmt: str) -> dict[str, Any]:
    """The :func:`logging.config.dictConfig` of the service: stderr, ``fmt`` ``text`` or ``json``."""
    level = level.upper()
    noisy_level = "DEBUG" if level == "DEBUG" else "WARNING"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "text": {"format": TEXT_FORMAT},
            "json": {"()": JsonFormatter},
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": fmt},
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {name: {"level": noisy_level} for name in NOISY_LOGGERS},
    }
