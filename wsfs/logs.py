"""Log set-up: quiet on the terminal by default, complete in the daemon's log file.

Two formats, chosen with `wsfs --log-format`: `text` (the default: a timestamp, the level, the
logger and the message, whose figures are written as key=value pairs) and `json` (one object a
line, for log shippers). The terminal shows warnings and errors unless `-v` asks for more; the
daemon's `wsfs.log` always records INFO, so a quiet mount still leaves a trail of what it did.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import time
from pathlib import Path

_state = {"format": "text"}
_CHATTY = ("botocore", "boto3", "urllib3", "s3transfer")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def formatter(fmt: str | None = None, *, stream: bool = False) -> logging.Formatter:
    """The formatter for the chosen format; terminal lines start with 'wsfs:' instead of a time."""
    fmt = fmt or _state["format"]
    if fmt == "json":
        return JsonFormatter()
    if stream:
        return logging.Formatter("wsfs: %(levelname)s %(name)s: %(message)s")
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


#: `extra=` of a record for the log file only: a traceback behind a sentence the terminal
#: already shows.
FILE_ONLY = {"file_only": True}


def configure(verbosity: int, fmt: str = "text") -> None:
    """Set up the terminal handler: WARNING by default, INFO with -v, DEBUG with -vv."""
    _state["format"] = fmt
    root = logging.getLogger()
    level = logging.WARNING - 10 * min(verbosity, 2)
    handler = logging.StreamHandler()
    handler.addFilter(lambda record: not getattr(record, "file_only", False))
    handler.setLevel(level)
    handler.setFormatter(formatter(fmt, stream=True))
    root.addHandler(handler)
    root.setLevel(level)


LOG_MAX = 16 << 20  # bytes of wsfs.log before it is rotated (LOG_KEEP older files kept)
LOG_KEEP = 3


def add_file_handler(path: Path) -> logging.Handler:
    """Log INFO and up (or more, with -vv) to `path` without making the terminal louder.

    Rotated: the log lives on the cache disk, whose space writers may be waiting for, and an
    outage or a full disk logs a warning every few seconds for as long as it lasts.
    """
    root = logging.getLogger()
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=LOG_MAX, backupCount=LOG_KEEP)
    # Readable by its owner only: it names the workspace's files. A log an older wsfs made
    # readable by all is closed too (new and rotated ones are 0600 by the daemon's umask).
    os.chmod(path, 0o600)
    handler.setFormatter(formatter())
    level = min(root.level or logging.WARNING, logging.INFO)
    handler.setLevel(level)
    for h in root.handlers:  # the terminal keeps the level it had
        if h.level == logging.NOTSET:
            h.setLevel(root.level or logging.WARNING)
    root.setLevel(level)
    root.addHandler(handler)
    if level > logging.DEBUG:  # their INFO lines say nothing about the workspace
        for name in _CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)
    return handler
