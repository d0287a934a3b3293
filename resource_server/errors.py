"""Why a request was refused: one exception, carrying what the answer needs."""

from __future__ import annotations

from dataclasses import dataclass

BEARER = "Bearer"
DPOP = "DPoP"


@dataclass
class TokenError(Exception):
    """A refusal (RFC 6750 §3.1, RFC 9449 §7.1), rendered by ``challenges.py``.

    ``error``: ``None`` when no credentials came (RFC 6750 §3.1: no error code then),
    ``invalid_request``, ``invalid_token``, ``insufficient_scope``, ``invalid_dpop_proof`` or
    ``use_dpop_nonce``. ``scheme``: the scheme to challenge in (the one the token needs, or the
    one it came with); ``None``: both. ``scope``: the scope needed, for ``insufficient_scope``.
    ``description``: ASCII, safe to show the client (never a token or a key).
    """

    error: str | None
    description: str = ""
    status: int = 401
    scheme: str | None = None
    scope: str = ""

    def __str__(self) -> str:
        return f"{self.error or 'no credentials'}: {self.description}"


def missing() -> TokenError:
    return TokenError(None, "An access token is required.", 401, None)


def invalid_request(description: str) -> TokenError:
    return TokenError("invalid_request", description, 400, None)


def invalid_token(
    description: str = "The access token is invalid or expired.", scheme: str | None = BEARER
) -> TokenError:
    return TokenError("invalid_token", description, 401, scheme)


def insufficient_scope(scope: str, scheme: str | None = BEARER) -> TokenError:
    return TokenError("insufficient_scope", f"This needs the scope: {scope}.", 403, scheme, scope)


def invalid_dpop_proof(description: str) -> TokenError:
    return TokenError("invalid_dpop_proof", description, 401, DPOP)
