"""Signing keys' private halves encrypted at rest (``AUTH_KEY_STORE=database``).

``AUTH_KEY_ENCRYPTION_KEY`` is 32 random bytes in base64url (padding optional). Each private
key (PEM) is sealed with AES-256-GCM (NIST SP 800-38D: a random 96-bit nonce per seal) and
its associated data binds the ciphertext to its row: the key's ``kid`` and the encryption
key's id, so a sealed key copied to another row, or presented as sealed under another key,
does not open. The id of an encryption key (``EncryptionKey.id``) is an HMAC of a label under
the key itself: stored beside each sealed key, it names which key opens it (``keys rewrap``
moves every row to a new one) and says nothing of the key.

Stored form: ``b"v1" || nonce (12 bytes) || ciphertext and tag``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = b"v1"
NONCE_BYTES = 12
KEY_BYTES = 32
#: 32 random bytes hold about 30 distinct values (never fewer than 20 in practice); fewer
#: than this is not a random key (a repeated character or a short word repeated).
MIN_DISTINCT_BYTES = 16
#: base64url (RFC 4648 §5) only: ``base64.b64decode`` with ``altchars`` would also take ``+``
#: and ``/``, so two spellings would name one key.
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_ID_LABEL = b"token-server/key-encryption-key-id/v1"
_AAD_LABEL = b"token-server/signing-key/v1"
HOW_TO_MAKE = (
    'make one with `python -c "import secrets; print(secrets.token_urlsafe(32))"` and keep it '
    "in your secret store"
)


class KeyEncryptionError(ValueError):
    """``AUTH_KEY_ENCRYPTION_KEY`` is missing, malformed or weak; the message says the fix."""


class KeyDecryptError(ValueError):
    """A sealed private key does not open: another encryption key, or altered."""


@dataclass(frozen=True)
class EncryptionKey:
    raw: bytes = field(repr=False)

    @property
    def id(self) -> str:
        digest = hmac.new(self.raw, _ID_LABEL, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:12]).decode("ascii")

    def seal(self, plaintext: bytes, *, kid: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return VERSION + nonce + AESGCM(self.raw).encrypt(nonce, plaintext, self._aad(kid))

    def open(self, sealed: bytes, *, kid: str) -> bytes:
        if not sealed.startswith(VERSION) or len(sealed) < len(VERSION) + NONCE_BYTES + 16:
            raise KeyDecryptError(f"the sealed private key of {kid} is not in a known form")
        body = sealed[len(VERSION) :]
        try:
            return AESGCM(self.raw).decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], self._aad(kid))
        except InvalidTag:
            raise KeyDecryptError(
                f"the private key of {kid} does not open with the encryption key {self.id}: "
                "it was altered, or sealed under another key"
            ) from None

    def _aad(self, kid: str) -> bytes:
        return b"\x00".join((_AAD_LABEL, kid.encode("ascii"), self.id.encode("ascii")))


def parse_encryption_key(
    value: str | None, *, setting: str = "AUTH_KEY_ENCRYPTION_KEY"
) -> EncryptionKey:
    """The key an operator gave, or ``KeyEncryptionError`` naming the setting and the fix."""
    if value is None or not value.strip():
        raise KeyEncryptionError(f"{setting} is not set: {HOW_TO_MAKE}")
    text = value.strip()
    if not _BASE64URL.fullmatch(text):
        raise KeyEncryptionError(f"{setting} is not base64url: {HOW_TO_MAKE}")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise KeyEncryptionError(f"{setting} is not base64url: {HOW_TO_MAKE}") from None
    if len(raw) != KEY_BYTES:
        raise KeyEncryptionError(
            f"{setting} decodes to {len(raw)} bytes, not {KEY_BYTES}: {HOW_TO_MAKE}"
        )
    if len(set(raw)) < MIN_DISTINCT_BYTES:
        raise KeyEncryptionError(f"{setting} is not random enough (weak): {HOW_TO_MAKE}")
    return EncryptionKey(raw)
