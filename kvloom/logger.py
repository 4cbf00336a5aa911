"""One place that configures kvloom's logging (stderr, so stdout stays clean for generated text)."""

from __future__ import annotations

import logging
import os
import sys

_configured = False


class _TqdmAwareHandler(logging.StreamHandler):
    """Writes through tqdm, which lifts any progress bar above the line and redraws it below, so that log
    lines (the engine's stats every 10 s) do not cut a bar in two."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def init_logger(name: str) -> logging.Logger:
    global _configured
    if not _configured:
        root = logging.getLogger("kvloom")
        if not root.handlers:
            handler = _TqdmAwareHandler(sys.stderr)
            handler.setFormatter(
                logging.Formatter("%(levelname)s %(asctime)s %(name)s] %(message)s", "%H:%M:%S")
            )
            root.addHandler(handler)
        root.setLevel(os.environ.get("KVLOOM_LOG_LEVEL", "INFO").upper())
        root.propagate = False
        _configured = True
    return logging.getLogger(name)
