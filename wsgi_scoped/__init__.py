"""Request-scoped SQLAlchemy sessions for any WSGI application."""

from .database import SQLITE_BUSY_TIMEOUT as SQLITE_BUSY_TIMEOUT
from .database import Database as Database
from .exceptions import WsgiScopedWarning as WsgiScopedWarning
from .middleware import ScopedSessionMiddleware as ScopedSessionMiddleware
from .middleware import is_active as is_active
from .scope import get_ident as get_ident

__all__ = [
    "Database",
    "SQLITE_BUSY_TIMEOUT",
    "ScopedSessionMiddleware",
    "WsgiScopedWarning",
    "get_ident",
    "is_active",
]
