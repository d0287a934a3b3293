"""Passkeys (WebAuthn Level 3) with py_webauthn: the ceremonies' options and their checks.

(Being written: see the passkeys helper's branch.)
"""

from __future__ import annotations

from .config import Settings
from .models import WebAuthnCredential


def assertion_options(
    settings: Settings, *, binding: str, credentials: list[WebAuthnCredential] | None
) -> str:
    """``PublicKeyCredentialRequestOptions`` as JSON for static/passkeys.js: a challenge bound
    to ``binding`` (the user id for a second step, the browser's CSRF cookie for a sign-in
    without a username), ``allowCredentials`` from ``credentials`` (``None``: discoverable
    credentials, any the authenticator holds for this RP id), user verification required."""
    raise NotImplementedError
