"""Warnings raised by wsgi_scoped."""

from __future__ import annotations


class WsgiScopedWarning(UserWarning):
    """Non-fatal misuse that wsgi_scoped repaired, such as a session left
    registered by an earlier request or by code outside the middleware.

    Turn it into an error in tests with ``filterwarnings = ["error"]``.

    .. versionadded:: 0.1
    """
