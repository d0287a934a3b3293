"""RFC 9068 §4: the checks an API makes of a JWT access token, in the order they cost.

1. the form: a compact JWS of bounded length whose header is a JSON object;
2. the header: ``typ`` ``at+jwt`` (or ``application/at+jwt``, case-insensitive, RFC 7515
   §4.1.9), ``alg`` on the configured allow-list (never ``none`` or an HMAC: RFC 8725 §3.1),
   a ``kid``, and none of ``jku``/``x5u``/``x5c``/``jwk``/``crit`` (the key comes from the
   issuer's JWK Set, nothing else is believed);
3. the signature, with the issuer's published key of that ``kid``;
4. the claims: ``iss`` exactly the issuer, ``aud`` naming this API (a string or an array),
   ``exp`` in the future and ``nbf`` in the past (with ``leeway`` seconds), ``iat`` not in the
   future, and ``sub``, ``client_id``, ``jti`` present (RFC 9068 §2.2), plus the configured
   extra ones; ``scope`` a space-separated string when present.

Every refusal is ``invalid_token`` with a description that names the check (never the token).
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from typing import Any, TypeGuard

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jws import JWSRegistry

from . import errors
from .config import ResourceServerConfig
from .keys import KeyCache

ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
#: An access token of ours is about 1 KB; anything past this is not one.
MAX_TOKEN_LENGTH = 16_384
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "x5c", "jwk", "crit", "b64"})
#: RFC 9068 §2.2: the claims every access token carries.
REQUIRED_CLAIMS = ("iss", "exp", "aud", "sub", "client_id", "iat", "jti")
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_REGISTRIES: dict[str, JWSRegistry] = {}


def _registry(alg: str) -> JWSRegistry:
    """One registry per algorithm, made once (the header checks above are ours; joserfc's
    strict check would refuse the ``typ`` values it does not list)."""
    registry = _REGISTRIES.get(alg)
    if registry is None:
        registry = _REGISTRIES[alg] = JWSRegistry(algorithms=[alg], strict_check_header=False)
    return registry


def unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header of a compact JWS, not verified; ``invalid_token`` if it has none."""
    if len(token) > MAX_TOKEN_LENGTH or not _COMPACT.fullmatch(token):
        raise errors.invalid_token("The access token is not a signed JWT.")
    segment = token.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):
        raise errors.invalid_token("The access token header is not JSON.") from None
    if not isinstance(header, dict):
        raise errors.invalid_token("The access token header is not a JSON object.")
    return header


async def verify_access_token(
    token: str, config: ResourceServerConfig, keys: KeyCache, *, now: float | None = None
) -> dict[str, Any]:
    """The claims of ``token`` if it is an access token the issuer signed for this API;
    otherwise ``TokenError`` (``invalid_token``); ``KeysUnavailable`` without keys."""
    header = unverified_header(token)
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
        raise errors.invalid_token("The token is not an access token (typ at+jwt, RFC 9068).")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in config.algorithms:
        raise errors.invalid_token("The access token is signed with an algorithm not allowed.")
    if FORBIDDEN_HEADERS & set(header):
        raise errors.invalid_token("The access token header names keys or extensions.")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise errors.invalid_token("The access token header names no key (kid).")
    key = await keys.key(kid)
    if key is None:
        raise errors.invalid_token(
            "The access token is signed with a key the issuer does not publish."
        )
    key_alg = key.get("alg")
    if key_alg is not None and key_alg != alg:
        raise errors.invalid_token("The access token's alg is not its key's.")
    try:
        signed = jws.deserialize_compact(token, key, registry=_registry(alg))
        claims = json.loads(signed.payload)
    except (JoseError, ValueError, TypeError, KeyError, RecursionError):
        raise errors.invalid_token("The access token signature does not verify.") from None
    if not isinstance(claims, dict):
        raise errors.invalid_token("The access token claims are not a JSON object.")
    check_claims(claims, config, time.time() if now is None else now)
    return claims


def check_claims(claims: dict[str, Any], config: ResourceServerConfig, now: float) -> None:
    missing = [name for name in (*REQUIRED_CLAIMS, *config.extra_claims_required)
               if claims.get(name) is None]  # fmt: skip
    if missing:
        raise errors.invalid_token(f"The access token lacks claims: {', '.join(missing)}.")
    if claims["iss"] != config.issuer:
        raise errors.invalid_token("The access token was issued by another server.")
    audience = claims["aud"]
    audiences = [audience] if isinstance(audience, str) else audience
    if not isinstance(audiences, list) or config.resource not in audiences:
        raise errors.invalid_token("The access token is meant for another audience.")
    leeway = config.leeway
    if not is_numeric_date(claims["exp"]) or claims["exp"] + leeway <= now:
        raise errors.invalid_token("The access token has expired.")
    nbf = claims.get("nbf")
    if nbf is not None and (not is_numeric_date(nbf) or nbf - leeway > now):
        raise errors.invalid_token("The access token is not valid yet (nbf).")
    if not is_numeric_date(claims["iat"]) or claims["iat"] - leeway > now:
        raise errors.invalid_token("The access token was issued in the future (iat).")
    for name in ("sub", "client_id", "jti"):
        if not isinstance(claims[name], str):
            raise errors.invalid_token(f"The access token's {name} is not a string.")
    scope = claims.get("scope")
    if scope is not None and not isinstance(scope, str):
        raise errors.invalid_token("The access token's scope is not a string.")


def is_numeric_date(value: Any) -> TypeGuard[int | float]:
    """A NumericDate (RFC 7519 §2): a finite number; ``true`` is not one. An int is always
    finite (``math.isfinite`` would raise OverflowError past a float's range, e.g. 10**400)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def scopes_of(claims: dict[str, Any]) -> frozenset[str]:
    """RFC 9068 §2.2.3: ``scope`` as a set (RFC 6749 §3.3: space-delimited)."""
    scope = claims.get("scope")
    return frozenset(scope.split()) if isinstance(scope, str) else frozenset()
