"""The package's loggers, for modules that import :mod:`logging` lazily.

``import xcsave`` does not import logging (it is not cheap, and ``xcsave
verify`` never logs).  Whichever module logs first gets its logger here, and
the library's ``NullHandler`` goes onto the ``xcsave`` logger at that point,
before any record can reach Python's last-resort stderr handler: output is
the same as with the handler added at import time.
"""

from __future__ import annotations

import logging

logging.getLogger("xcsave").addHandler(logging.NullHandler())


def logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
