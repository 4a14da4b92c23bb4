"""The process's log: level and format from ``log.*`` (``--log-level``, ``--log-format``).

``json`` writes one object per line (time, level, logger, message, run_id, stage, and the
exception when there is one) for a log pipeline (Cloud Logging, Loki) to index without parsing
text. The run and its current stage come from the pipeline's Report (``set_context``); they are
process-wide, not per thread, because Ray Data logs from its own executor threads.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_context: dict[str, str | None] = {"run_id": None, "stage": None}
_current = {"level": "INFO", "format": "text"}
ENV_LEVEL, ENV_FORMAT = "LOOKALIKE_LOG_LEVEL", "LOOKALIKE_LOG_FORMAT"


def set_context(**values: str | None) -> None:
    """``run_id=...``, ``stage=...``: stamped on every later record."""
    _context.update(values)


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = _context["run_id"]
        record.stage = _context["stage"]
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage(),
               "run_id": getattr(record, "run_id", None), "stage": getattr(record, "stage", None)}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str = "INFO", fmt: str = "text", stream=None) -> None:
    """Replace the root handlers with one on stderr; idempotent (the CLI calls it before and after
    the config is read)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    _current.update(level=level, format=fmt)


def current_format() -> str:
    return _current["format"]


def worker_runtime_env() -> dict:
    """For ``ray.init``: Ray workers set up their log as this process did (worker_process_setup_hook)."""
    return {"worker_process_setup_hook": "engine.logs.worker_setup",
            "env_vars": {ENV_LEVEL: _current["level"], ENV_FORMAT: _current["format"]}}


def worker_setup() -> None:
    """In each Ray worker: INFO from engine code reaches the driver's log (Ray's default drops it)."""
    setup(os.environ.get(ENV_LEVEL, "INFO"), os.environ.get(ENV_FORMAT, "text"))
