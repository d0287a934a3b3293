"""The ``Authorization`` header in, ``WWW-Authenticate`` challenges and JSON bodies out.

RFC 6750 §2.1: ``Bearer`` 1*SP b64token; RFC 9449 §7.1: ``DPoP`` with the same token syntax.
The scheme is case-insensitive (RFC 9110 §11.1). A request with another scheme (``Basic``) or
none carries no token of ours: it gets the challenges without an error code (RFC 6750 §3.1).
A ``Bearer`` or ``DPoP`` header whose token is malformed is ``invalid_request`` (400).

Challenges name this API's RFC 9728 metadata in ``resource_metadata`` (§5.1), so a client
refused here can find the authorization server; a ``DPoP`` challenge lists the proof
algorithms accepted (RFC 9449 §7.1, ``algs``).
"""

from __future__ import annotations

import re
from typing import Any

from . import errors
from .config import ResourceServerConfig
from .errors import BEARER, DPOP, TokenError

#: RFC 6750 §2.1 b64token; bounded (a token of ours is about 1 KB; 16 KiB is plenty).
MAX_TOKEN_LENGTH = 16_384
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
#: RFC 6750 §3: error_description and scope are %x20-21 / %x23-5B / %x5D-7E (no " or \).
_UNSAFE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
_SCHEMES = {"bearer": BEARER, "dpop": DPOP}


def parse_authorization(value: str | None) -> tuple[str, str] | None:
    """``(scheme, token)`` with the scheme spelled ``Bearer`` or ``DPoP``; ``None`` when the
    request carries no token in either scheme. Raises ``TokenError`` (``invalid_request``)
    for a malformed one."""
    if value is None:
        return None
    value = value.strip(" \t")
    if not value:
        return None
    name, separator, rest = value.partition(" ")
    scheme = _SCHEMES.get(name.lower())
    if scheme is None:
        return None  # another scheme: not ours to judge (RFC 6750 §3.1, no error code)
    token = rest.strip(" ")
    if not separator or not token:
        raise errors.invalid_request(f"The {scheme} scheme needs a token.")
    if len(token) > MAX_TOKEN_LENGTH:
        raise errors.invalid_request(f"The token must be at most {MAX_TOKEN_LENGTH} characters.")
    if not _B64TOKEN.fullmatch(token):
        raise errors.invalid_request(f"The {scheme} token is malformed (RFC 6750 §2.1).")
    return scheme, token


def _quoted(value: str) -> str:
    return '"' + _UNSAFE.sub("?", value) + '"'


def www_authenticate(
    error: TokenError,
    config: ResourceServerConfig,
    metadata_url: str,
    nonce: str | None = None,
) -> list[str]:
    """One challenge per scheme the client may use: the one the error names, or every scheme
    this API accepts (``Bearer`` unless DPoP is required, ``DPoP`` when it is accepted)."""
    accepted = [s for s in (BEARER, DPOP) if _accepts(config, s)]
    schemes = [error.scheme] if error.scheme in accepted else accepted
    values = []
    for scheme in schemes:
        params = [("realm", config.realm)]
        if error.error is not None:
            params.append(("error", error.error))
            if error.description:
                params.append(("error_description", error.description))
            if error.scope:
                params.append(("scope", error.scope))
        if scheme == DPOP:
            params.append(("algs", " ".join(config.dpop_algorithms)))
        params.append(("resource_metadata", metadata_url))
        values.append(scheme + " " + ", ".join(f"{k}={_quoted(v)}" for k, v in params))
    return values


def _accepts(config: ResourceServerConfig, scheme: str | None) -> bool:
    if scheme == DPOP:
        return config.dpop
    return scheme == BEARER and not (config.dpop and config.dpop_required)


def error_body(error: TokenError) -> dict[str, Any]:
    """The JSON body of a refusal: the same code and description as the challenge."""
    body: dict[str, Any] = {}
    if error.error is not None:
        body["error"] = error.error
    body["error_description"] = error.description
    if error.scope:
        body["scope"] = error.scope
    return body
