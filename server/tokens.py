"""Validating our own access tokens, as a resource server must (RFC 9068 §4, RFC 8725).

``decode_access_token`` checks the JWT alone (structure, header, signature, claims) and
returns its claims or ``None``; it never raises on hostile input. What only the database knows
(revoked by ``jti``, its client deleted, its family revoked) is one statement in
``server/oauth/store.py`` (``access_token_live``). Introspection and the bearer module
(``server/bearer.py``: /userinfo and the JSON APIs) use both.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError

from .keys import KeySet

#: Far above any token we sign (about 1 KB); anything longer is not ours.
MAX_TOKEN_LENGTH = 8192
#: RFC 9068 §4: the ``typ`` of an access token; compared case-insensitively (RFC 7515 §4.1.9).
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
ID_TOKEN_TYPES = frozenset({"jwt"})
#: Header members that would let the token choose its own key or demand unknown processing
#: (RFC 8725 §3.10, RFC 7515 §4.1.11). We publish our keys; a token never brings one.
FORBIDDEN_HEADERS = frozenset({"jku", "jwk", "x5u", "x5c", "crit"})
#: The only algorithm we sign with (``KeySet.alg``: RS256, or PS256 under ``AUTH_FAPI2``). An
#: exact match rejects "none", "None", "HS256" keyed with our public key, and every other
#: algorithm-confusion trick (RFC 8725 §2.1, §3.1).


def _b64_json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))


def unverified_header(token: str) -> dict[str, Any] | None:
    if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 2:
        return None
    try:
        header = _b64_json(token.split(".", 1)[0])
    except (ValueError, binascii.Error, UnicodeError):
        return None
    return header if isinstance(header, dict) else None


def _verified_claims(keyset: KeySet, token: str, *, types: frozenset[str]) -> dict[str, Any] | None:
    """Header rules, then the signature; the claims as a dict, or ``None``."""
    header = unverified_header(token)
    if header is None or header.get("alg") != keyset.alg:
        return None
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in types:
        return None
    if FORBIDDEN_HEADERS & header.keys():
        return None
    kid = header.get("kid")
    key = keyset.public.get(kid) if isinstance(kid, str) else None
    if key is None:
        return None  # unknown, retired-and-pruned or hostile kid: only an exact lookup
    try:
        signed = jws.deserialize_compact(token, key, algorithms=[keyset.alg])
        claims = json.loads(signed.payload)
    except (JoseError, ValueError, TypeError, UnicodeError):
        return None
    return claims if isinstance(claims, dict) else None


def decode_id_token_hint(keyset: KeySet, token: str, *, issuer: str) -> dict[str, Any] | None:
    """An ID token we issued, possibly expired (OIDC RP-Initiated Logout §2 allows that)."""
    claims = _verified_claims(keyset, token, types=ID_TOKEN_TYPES)
    if claims is None or claims.get("iss") != issuer:
        return None
    return claims


def decode_access_token(
    keyset: KeySet, token: str, *, issuer: str, audience: str | frozenset[str], now: int
) -> dict[str, Any] | None:
    """The claims of ``token`` if it is a live access token we signed, else ``None``.

    ``audience``: the one this caller serves, or (introspection, revocation) any of several;
    the token's ``aud`` must hold one of them (RFC 7519 §4.1.3).
    """
    # RFC 9068 §4: typ at+jwt; an ID token (typ JWT) is not an access token.
    claims = _verified_claims(keyset, token, types=ACCESS_TOKEN_TYPES)
    if claims is None or claims.get("iss") != issuer:
        return None
    accepted = frozenset([audience]) if isinstance(audience, str) else audience
    aud = claims.get("aud")
    auds = aud if isinstance(aud, list) else [aud]
    if not any(isinstance(a, str) and a in accepted for a in auds):
        return None
    exp, iat = claims.get("exp"), claims.get("iat")
    # ``type(...) is int``: bool is an int subclass, and ``true`` is not a time.
    if type(exp) is not int or type(iat) is not int or exp <= now:
        return None
    for name in ("sub", "jti", "client_id", "scope"):
        if not isinstance(claims.get(name), str):
            return None
    return claims
