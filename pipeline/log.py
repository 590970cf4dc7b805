"""The project's one logging channel: `log(msg)` for progress, `warn(msg)` for things a user should
look at. Both go to the `distill` logger, printed to stderr as `[distill HH:MM:SS] msg`.

Machine-readable output (`distill ... --json`, the summaries the CLI prints) goes to stdout from
`pipeline.cli` only; nothing else in the project prints. Ray workers' messages reach the driver
through Ray's own log forwarding, so worker code calls the same `log`.
"""
from __future__ import annotations

import logging
import sys
from datetime import datetime

_LOGGER = logging.getLogger("distill")


class _StderrHandler(logging.Handler):
    """Writes to whatever `sys.stderr` is at emit time (pytest's capture, a redirected stream)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
            prefix = "[distill " + stamp + "] " + ("warning: " if record.levelno >= logging.WARNING else "")
            sys.stderr.write(prefix + record.getMessage() + "\n")
            sys.stderr.flush()
        except Exception:  # a closed stream must not take the run down
            self.handleError(record)


if not any(isinstance(h, _StderrHandler) for h in _LOGGER.handlers):
    _LOGGER.addHandler(_StderrHandler())
_LOGGER.setLevel(logging.INFO)
_LOGGER.propagate = False


def log(msg: str) -> None:
    _LOGGER.info(msg)


def warn(msg: str) -> None:
    _LOGGER.warning(msg)
