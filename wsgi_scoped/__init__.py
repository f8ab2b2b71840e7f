"""Request-scoped SQLAlchemy sessions for any WSGI application."""

from .database import SQLITE_BUSY_TIMEOUT as SQLITE_BUSY_TIMEOUT
from .database import Database as Database
from .exceptions import AbortedTransactionError as AbortedTransactionError
from .exceptions import DeadlineExceededError as DeadlineExceededError
from .exceptions import PrimaryUnavailableError as PrimaryUnavailableError
from .exceptions import ReplicaWriteError as ReplicaWriteError
from .exceptions import WsgiScopedError as WsgiScopedError
from .exceptions import WsgiScopedWarning as WsgiScopedWarning
from .health import HealthCheck as HealthCheck
from .middleware import ScopedSessionMiddleware as ScopedSessionMiddleware
from .middleware import is_active as is_active
from .observe import RequestStats as RequestStats
from .scope import get_ident as get_ident
from .transaction import CommitVeto as CommitVeto
from .transaction import after_commit as after_commit
from .transaction import default_commit_veto as default_commit_veto
from .transaction import is_transient as is_transient

__all__ = [
    "AbortedTransactionError",
    "CommitVeto",
    "Database",
    "DeadlineExceededError",
    "HealthCheck",
    "PrimaryUnavailableError",
    "ReplicaWriteError",
    "RequestStats",
    "SQLITE_BUSY_TIMEOUT",
    "ScopedSessionMiddleware",
    "WsgiScopedError",
    "WsgiScopedWarning",
    "after_commit",
    "default_commit_veto",
    "get_ident",
    "is_active",
    "is_transient",
]
