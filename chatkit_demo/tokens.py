"""Signed tokens a browser keeps between page loads: :class:`TokenSigner`.

The demo stores two tokens in the browser's ``localStorage`` (a ``gr.BrowserState``): the visitor's
conversation (``"session"``) and the visitor's identity for the shared knowledge base (``"visitor"``). A
token is ``<value>.<HMAC-SHA256 of kind, login name and value>``: the server gives it out and takes back
only what it signed itself, for the same login name. The key is random per start (so a restart forgets
every token) unless the operator gives one (``CHATKIT_DEMO_SECRET``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

_VALUE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")  # secrets.token_urlsafe ids: no "." in them
MIN_KEY_BYTES = 16


class TokenSigner:
    """Sign values for the browser to keep, and check what it sends back.

    Example:
        >>> signer = TokenSigner(b"0123456789abcdef0123456789abcdef")
        >>> token = signer.sign("session", "Abcdefghijklmnop0123", user=None)
        >>> signer.verify("session", token, user=None)
        'Abcdefghijklmnop0123'
        >>> signer.verify("session", token, user="mallory")  # another login name
        Traceback (most recent call last):
        ...
        PermissionError: this session token was not issued to this visitor by this server
        >>> TokenSigner(b"short")
        Traceback (most recent call last):
        ...
        ValueError: the token key must have at least 16 bytes, got 5

    Raises:
        ValueError: a key shorter than 16 bytes.
    """

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            key = secrets.token_bytes(32)
        if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
            got = len(key) if isinstance(key, bytes) else type(key).__name__
            raise ValueError(f"the token key must have at least {MIN_KEY_BYTES} bytes, got {got}")
        self._key = key

    def __repr__(self) -> str:
        return "<TokenSigner key=<hidden>>"

    def _mac(self, kind: str, value: str, user: str | None) -> str:
        message = f"chatkit-demo\x00{kind}\x00{user or ''}\x00{value}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def sign(self, kind: str, value: str, *, user: str | None) -> str:
        """The token for ``value`` (a url-safe id) of ``kind``, valid only for the login name ``user``.

        Raises:
            ValueError: ``value`` is not a url-safe id of 16 to 64 characters.
        """
        if not isinstance(value, str) or not _VALUE.match(value):
            raise ValueError(f"only url-safe ids of 16 to 64 characters can be signed, got {str(value)[:80]!r}")
        return f"{value}.{self._mac(kind, value, user)}"

    def verify(self, kind: str, token: object, *, user: str | None) -> str:
        """The value inside ``token`` if this signer signed it for ``kind`` and ``user``.

        Raises:
            PermissionError: anything else (forged, altered, of another kind, for another login name,
                from another server or an earlier start, or not a token at all).
        """
        if isinstance(token, str) and len(token) <= 200:
            value, _, mac = token.rpartition(".")
            if _VALUE.match(value) and hmac.compare_digest(mac, self._mac(kind, value, user)):
                return value
        raise PermissionError(f"this {kind} token was not issued to this visitor by this server")

    def fingerprint(self, value: str, *, length: int = 16) -> str:
        """A short keyed hash of ``value`` (for metadata others may see: it does not reveal ``value``)."""
        digest = hmac.new(self._key, f"chatkit-demo-fingerprint\x00{value}".encode(), hashlib.sha256).hexdigest()
        return digest[:length]
