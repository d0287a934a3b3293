"""Secrets the server must read back (a ``client_secret_jwt`` client's secret keys the HMAC
of its assertions), sealed at rest with AES-256-GCM (``cryptography``).

The key is derived from ``AUTH_SECRET_KEY`` (HMAC-SHA256 with a purpose label), so a copy of
the database alone yields no secret. Changing ``AUTH_SECRET_KEY`` makes sealed secrets
unreadable: such clients then fail to authenticate until their secret is rotated.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = "v1"
NONCE_BYTES = 12  # NIST SP 800-38D: 96-bit nonces, random per message


class UnsealError(ValueError):
    """The sealed value was altered, or sealed under another ``AUTH_SECRET_KEY``."""


def _key(secret_key: str) -> AESGCM:
    return AESGCM(hmac.new(secret_key.encode(), b"client-secret-seal-v1", hashlib.sha256).digest())


def seal(secret_key: str, plaintext: str, *, context: str) -> str:
    """``context`` (the client id) is authenticated with it: a sealed value copied to another
    row does not open there."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = _key(secret_key).encrypt(nonce, plaintext.encode(), context.encode())
    return VERSION + "." + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")


def unseal(secret_key: str, value: str, *, context: str) -> str:
    version, _, body = value.partition(".")
    try:
        if version != VERSION:
            raise ValueError(version)
        raw = base64.urlsafe_b64decode(body.encode("ascii"))
        plain = _key(secret_key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode())
        return plain.decode()
    except (InvalidTag, ValueError, UnicodeError) as exc:
        raise UnsealError("sealed secret cannot be opened") from exc
