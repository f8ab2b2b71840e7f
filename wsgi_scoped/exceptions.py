"""Warnings raised by wsgi_scoped, and the log of failures that cannot be
raised."""

from __future__ import annotations

import contextlib
import logging
import sys
import typing as t

from sqlalchemy.exc import StatementError

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


class ReplicaWriteError(WsgiScopedError):
    """A statement tried to write on a read replica (PostgreSQL SQLSTATE
    ``25006``): the request has a safe method (GET, HEAD, OPTIONS), so
    :class:`Database` sent it to a replica. The driver's error is the
    ``__cause__``.

    Call ``db.use_primary()`` in the handler before its first query, or send
    writes with another method.

    .. versionadded:: 0.1
    """


class DeadlineExceededError(WsgiScopedError):
    """A request's deadline (``deadline=``) passed before its session began
    a transaction, so the transaction was not begun. Under the middleware
    the request is answered ``503 Service Unavailable``, as it is when a
    statement is cancelled by the deadline's ``statement_timeout``.

    .. versionadded:: 0.1
    """


class PrimaryUnavailableError(WsgiScopedError):
    """A request of a :class:`Database` with ``replicas`` needed the primary
    (a write, or a read when no replica can serve it) and could not connect
    to it. The middleware answers ``503 Service Unavailable`` with
    ``Retry-After``; the driver's error is the ``__cause__``.

    .. versionadded:: 0.1
    """


def _loggable(value: object) -> str:
    """``value``, from the request, as text that cannot start a log line or
    control a terminal: UTF-8 bytes are decoded, and line breaks, control
    characters and backslashes are escaped as in a Python string literal."""
    text = str(value)
    with contextlib.suppress(UnicodeError):
        # PEP 3333 hands the request's bytes over as latin-1 characters.
        text = text.encode("latin-1").decode("utf-8")
    if text.isprintable() and "\\" not in text:
        return text
    # A printable character's repr is the character itself (quotes too,
    # since repr quotes each alone with the other quote).
    return "".join(repr(char)[1:-1] for char in text)


def _log_extra(environ: WSGIEnvironment) -> dict[str, t.Any]:
    """The raw request values of a log line, as ``LogRecord`` attributes for
    structured logging; the message carries them escaped."""
    return {
        "wsgi_scoped_method": environ.get("REQUEST_METHOD"),
        "wsgi_scoped_path": environ.get("PATH_INFO"),
    }


def _log_request(
    level: int, message: str, environ: WSGIEnvironment, *args: object
) -> None:
    """Log ``message``, whose first two ``%s`` are the request's method and
    path, escaped (:func:`_loggable`); the raw values go in ``extra``."""
    logger.log(
        level,
        message,
        _loggable(environ.get("REQUEST_METHOD")),
        _loggable(environ.get("PATH_INFO")),
        *args,
        extra=_log_extra(environ),
        exc_info=level >= logging.ERROR,
    )


def _log_failure(what: str, environ: WSGIEnvironment) -> None:
    """Log the exception being handled as ``<what> failed for METHOD PATH``:
    for failures that must not replace the one propagating, or that come
    after the status line went out. Bound parameters are not shown."""
    with _parameters_hidden(sys.exc_info()[1]):
        _log_request(logging.ERROR, f"{what} failed for %s %s", environ)


@contextlib.contextmanager
def _parameters_hidden(error: BaseException | None) -> t.Iterator[None]:
    """Hide the bound parameters of every SQLAlchemy error in ``error``'s
    chain while the block logs it: handlers format the record before the
    block ends, and the exception propagates unchanged afterwards."""
    shown: list[StatementError] = []
    seen: set[int] = set()
    while error is not None and id(error) not in seen:  # as traceback walks it
        seen.add(id(error))
        if isinstance(error, StatementError) and not error.hide_parameters:
            error.hide_parameters = True
            shown.append(error)
        error = error.__cause__ or error.__context__
    try:
        yield
    finally:
        for statement_error in shown:
            statement_error.hide_parameters = False
