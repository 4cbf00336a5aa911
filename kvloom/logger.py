"""One place that configures kvloom's logging (stderr, so stdout stays clean for generated text)."""

from __future__ import annotations

import logging
import os
import sys

_configured = False


def init_logger(name: str) -> logging.Logger:
    global _configured
    if not _configured:
        root = logging.getLogger("kvloom")
        if not root.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(
                logging.Formatter("%(levelname)s %(asctime)s %(name)s] %(message)s", "%H:%M:%S")
            )
            root.addHandler(handler)
        root.setLevel(os.environ.get("KVLOOM_LOG_LEVEL", "INFO").upper())
        root.propagate = False
        _configured = True
    return logging.getLogger(name)
