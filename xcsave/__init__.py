"""xcsave: save, restore and live-migrate Xen domains through a native helper.

Each operation runs in a small native helper process (``xcsave-helper``, or
Xen 4.17's stock ``libxl-save-helper``) that moves the pages; this process
only exchanges control frames with it, so one event loop can drive many
domains at once.  Async API here; blocking twins in :mod:`xcsave.sync`.
"""

from __future__ import annotations

# Nothing is imported here at run time (not even typing or logging): the
# names below load on first use, and ``xcsave verify`` starts lean.  The
# library's logging.NullHandler is added by xcsave._log, which every
# module that logs goes through.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .api import restore, save
    from .errors import (
        BackendUnavailable,
        CallbackError,
        DomainBusy,
        HelperDied,
        HelperError,
        HelperFailed,
        HelperTimeout,
        ProtocolError,
        StreamError,
        TlsError,
        XcsaveError,
    )
    from .formats import SUPERVISOR_GUESTS
    from .policy import Decision, PrecopyStats
    from .supervisor import Callbacks, RestoreStats, RunResult, Stats, Supervisor, helper_path

# Names are imported on first use (PEP 562), so that ``import xcsave`` stays
# cheap and ``python -m xcsave.proto`` runs without the package importing it
# first.
_LAZY = {
    "restore": "api",
    "save": "api",
    "Decision": "policy",
    "MigrationControl": "wire",
    "PrecopyStats": "policy",
    "Callbacks": "supervisor",
    "RestoreStats": "supervisor",
    "RunResult": "supervisor",
    "Stats": "supervisor",
    "Supervisor": "supervisor",
    "helper_path": "supervisor",
    "SUPERVISOR_GUESTS": "formats",
    **dict.fromkeys(
        (
            "BackendUnavailable",
            "CallbackError",
            "DomainBusy",
            "HelperDied",
            "HelperError",
            "HelperFailed",
            "HelperTimeout",
            "ProtocolError",
            "StreamError",
            "TlsError",
            "XcsaveError",
        ),
        "errors",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xcsave' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "SUPERVISOR_GUESTS",
    "BackendUnavailable",
    "CallbackError",
    "Callbacks",
    "Decision",
    "DomainBusy",
    "HelperDied",
    "HelperError",
    "HelperFailed",
    "HelperTimeout",
    "MigrationControl",
    "PrecopyStats",
    "ProtocolError",
    "RestoreStats",
    "RunResult",
    "Stats",
    "StreamError",
    "Supervisor",
    "TlsError",
    "XcsaveError",
    "__version__",
    "backends",
    "helper_path",
    "restore",
    "save",
]


def backends() -> tuple[str, ...]:
    """The helper backends this build has, e.g. ``("sim", "xen")``."""
    from . import _ext

    return tuple(str(_ext.BACKENDS).split(","))
