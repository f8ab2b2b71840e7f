"""Warnings raised by wsgi_scoped, and the log of failures that cannot be
raised."""

from __future__ import annotations

import logging
import typing as t

if t.TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

#: The one logger of request failures and warnings (README: Observability).
logger = logging.getLogger("wsgi_scoped.middleware")


class WsgiScopedWarning(UserWarning):
    """Non-fatal misuse that wsgi_scoped repaired, such as a session left
    registered by an earlier request or by code outside the middleware.

    Turn it into an error in tests with ``filterwarnings = ["error"]``.

    .. versionadded:: 0.1
    """


class WsgiScopedError(Exception):
    """The base class of the errors wsgi_scoped raises.

    .. versionadded:: 0.1
    """


class AbortedTransactionError(WsgiScopedError):
    """A commit was refused because an earlier error aborted the
    transaction: PostgreSQL would have answered ``COMMIT`` with a silent
    rollback, and the work would have been reported as saved.

    Run a statement that may fail inside a savepoint
    (``with session.begin_nested(): ...``) so that only the savepoint is
    rolled back.

    .. versionadded:: 0.1
    """


def _log_failure(what: str, environ: WSGIEnvironment) -> None:
    """Log the exception being handled as ``<what> failed for METHOD PATH``:
    for failures that must not replace the one propagating, or that come
    after the status line went out."""
    logger.error(
        "%s failed for %s %s",
        what,
        environ.get("REQUEST_METHOD"),
        environ.get("PATH_INFO"),
        exc_info=True,
    )
