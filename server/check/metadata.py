"""Checks of what the server publishes: health, the two discovery documents and the JWKS."""

from __future__ import annotations

from typing import Any

import httpx
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

from .context import INTROSPECT_PATH, JWKS_PATH, REVOKE_PATH, TOKEN_PATH, Context, check
from .outcome import CheckFailed
from .parse import (
    b64url_decode,
    cache_directives,
    describe,
    error_code,
    json_object,
    parse_json,
    short,
)

DISCOVERY_PATHS = ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server")
#: Endpoint metadata (RFC 8414 §2) and the fixed path each must point to (SPEC.md, Endpoints).
ENDPOINTS = {
    "token_endpoint": TOKEN_PATH,
    "jwks_uri": JWKS_PATH,
    "revocation_endpoint": REVOKE_PATH,
    "introspection_endpoint": INTROSPECT_PATH,
}
GRANTS = ("password", "refresh_token", "client_credentials")
AUTH_METHOD_LISTS = (
    "token_endpoint_auth_methods_supported",
    "revocation_endpoint_auth_methods_supported",
    "introspection_endpoint_auth_methods_supported",
)
#: RFC 8414 §2: listing one of these client authentication methods in a ``…_auth_methods_
#: supported`` list makes the matching ``…_auth_signing_alg_values_supported`` required.
JWT_AUTH_METHODS = ("private_key_jwt", "client_secret_jwt")
#: RFC 7591 §3.2.2: what a registration endpoint answers a registration it refuses.
METADATA_ERRORS = ("invalid_client_metadata", "invalid_redirect_uri")
#: RFC 7518 §6.3.2: the private members of an RSA JWK; none may be published.
PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth")
MIN_RSA_BITS = 2048


@check("health")
async def check_health(ctx: Context) -> None:
    """/healthz (liveness) and /readyz (database and keys) answer 200."""
    for path in ("/healthz", "/readyz"):
        response = await ctx.get(path)
        if response.status_code != 200:
            raise CheckFailed(f"GET {path}: HTTP {response.status_code}")


def is_fapi2(document: dict[str, Any]) -> bool:
    """A server that says it is one of the FAPI 2.0 Security Profile: every request pushed,
    and private_key_jwt the only client authentication."""
    return document.get("require_pushed_authorization_requests") is True and document.get(
        "token_endpoint_auth_methods_supported"
    ) == ["private_key_jwt"]


@check("discovery")
async def check_discovery(ctx: Context) -> None:
    """Both metadata documents (RFC 8414, OIDC Discovery) agree and point at this server."""
    documents: list[dict[str, Any]] = []
    for path in DISCOVERY_PATHS:
        response = await ctx.get(path)
        if response.status_code != 200:
            raise CheckFailed(f"GET {path}: HTTP {response.status_code}")
        documents.append(json_object(response, f"GET {path}"))
    oidc, oauth = documents
    for name in sorted(oidc.keys() & oauth.keys()):
        if oidc[name] != oauth[name]:
            raise CheckFailed(f"the two documents disagree on {name}")
    for path, doc in zip(DISCOVERY_PATHS, documents, strict=True):
        issuer = doc.get("issuer")
        if issuer != ctx.base_url:
            raise CheckFailed(f"{path}: issuer is {short(issuer)}, expected {ctx.base_url!r}")
        for name, endpoint in ENDPOINTS.items():
            if doc.get(name) != ctx.base_url + endpoint:
                raise CheckFailed(f"{path}: {name} is {short(doc.get(name))}")
        for name, value in doc.items():
            # RFC 8414 §2: every endpoint of this server lives under its issuer.
            under = isinstance(value, str) and value.startswith(ctx.base_url + "/")
            if name.endswith("_endpoint") and not under:
                raise CheckFailed(f"{path}: {name} is not under the issuer")
        # A FAPI 2.0 server (AUTH_FAPI2) refuses the password grant and every client
        # authentication but private_key_jwt: that is what it must say, and nothing more.
        fapi2 = is_fapi2(doc)
        grants = doc.get("grant_types_supported")
        required = [grant for grant in GRANTS if not (fapi2 and grant == "password")]
        if not isinstance(grants, list) or not set(required) <= set(grants):
            raise CheckFailed(f"{path}: grant_types_supported lacks one of {', '.join(required)}")
        if fapi2 and "password" in grants:
            raise CheckFailed(f"{path}: a FAPI 2.0 server lists the password grant")
        method = "private_key_jwt" if fapi2 else "client_secret_basic"
        for name in AUTH_METHOD_LISTS:
            methods = doc.get(name)
            if not isinstance(methods, list) or method not in methods:
                raise CheckFailed(f"{path}: {name} lacks {method}")
            check_signing_algs(path, doc, name.removesuffix("methods_supported"))
        supported = doc.get("client_id_metadata_document_supported", False)
        if not isinstance(supported, bool):
            # draft-ietf-oauth-client-id-metadata-document: a boolean.
            raise CheckFailed(f"{path}: client_id_metadata_document_supported is not a boolean")
    ctx.documents = dict(zip(DISCOVERY_PATHS, documents, strict=True))
    registration = oauth.get("registration_endpoint", oidc.get("registration_endpoint"))
    # Under the issuer (the loop above): the only URL of a document ``check`` ever sends to.
    ctx.registration_endpoint = registration if isinstance(registration, str) else None


def check_signing_algs(path: str, doc: dict[str, Any], prefix: str) -> None:
    """RFC 8414 §2: ``{prefix}signing_alg_values_supported`` is required when a JWT client
    authentication method is listed, and never names ``none``."""
    name = prefix + "signing_alg_values_supported"
    methods = doc.get(prefix + "methods_supported")
    jwt = [m for m in JWT_AUTH_METHODS if isinstance(methods, list) and m in methods]
    algs = doc.get(name)
    if algs is None:
        if jwt:
            raise CheckFailed(f"{path}: {name} is required with {jwt[0]}")
        return
    if not isinstance(algs, list) or not algs or not all(isinstance(a, str) for a in algs):
        raise CheckFailed(f"{path}: {name} is not a list of algorithm names")
    if "none" in algs:
        raise CheckFailed(f"{path}: {name} lists none")


@check("registration-refuses-empty")
async def check_registration_refuses_empty(ctx: Context) -> None:
    """An advertised registration endpoint (RFC 7591) registers nothing from an empty request:
    400 invalid_client_metadata or invalid_redirect_uri (§3.2.2), or 401 where an initial
    access token is required (§3); never 2xx, never 5xx. Nothing to check (and nothing
    registered) when the server advertises none (``AUTH_CLIENT_REGISTRATION=off``)."""
    ctx.need("discovery")
    endpoint = ctx.registration_endpoint
    if endpoint is None:
        return
    # ``{}``: no redirect URI, no token: nothing a careful server can register.
    response = await ctx.http.post(endpoint, json={})
    status = response.status_code
    if status == 401 or (status == 400 and error_code(response) in METADATA_ERRORS):
        return
    what = f"POST registration_endpoint with {{}}: {describe(response)}"
    if 200 <= status < 300:
        raise CheckFailed(
            f"{what}, a client was registered from nothing{await undo(ctx, response)}"
        )
    expected = "expected 400 invalid_client_metadata or invalid_redirect_uri, or 401"
    raise CheckFailed(f"{what}, {expected}")


async def undo(ctx: Context, response: httpx.Response) -> str:
    """Delete what a faulty endpoint registered (RFC 7592 §2.3), if it says how: a check must
    leave nothing behind. The reason's tail: whether that worked."""
    body = parse_json(response)
    if not isinstance(body, dict):
        return ""
    for name in ("registration_access_token", "client_secret"):
        if isinstance(body.get(name), str):
            ctx.sensitive.add(body[name])
    uri, token = body.get("registration_client_uri"), body.get("registration_access_token")
    if not isinstance(uri, str) or not isinstance(token, str):
        return " (and no registration_client_uri to delete it with)"
    if not uri.startswith(ctx.base_url + "/"):
        return " (its registration_client_uri is not under the issuer: not deleted)"
    deleted = await ctx.http.delete(uri, headers={"Authorization": "Bearer " + token})
    if deleted.status_code == 204:
        return " (deleted again)"
    return f" (deleting it: {describe(deleted)})"


@check("jwks-hygiene")
async def check_jwks_hygiene(ctx: Context) -> None:
    """The JWKS holds public RSA signing keys only (alg RS256, or PS256 where discovery says
    tokens are PS256): kid, use sig, >= 2048 bits, unique kids."""
    response = await ctx.get(JWKS_PATH)
    if response.status_code != 200:
        raise CheckFailed(f"GET {JWKS_PATH}: HTTP {response.status_code}")
    keys = json_object(response, f"GET {JWKS_PATH}").get("keys")
    if not isinstance(keys, list) or not keys:
        raise CheckFailed("no keys in the JWKS")
    found: dict[str, RSAKey] = {}
    for index, key in enumerate(keys):
        if not isinstance(key, dict):
            raise CheckFailed(f"key #{index} is not a JSON object")
        kid = key.get("kid")
        label = f"key {short(kid, 50)}" if isinstance(kid, str) else f"key #{index}"
        leaked = [member for member in PRIVATE_MEMBERS if member in key]
        if leaked:
            raise CheckFailed(f"{label} publishes private member(s) {', '.join(leaked)}")
        if not isinstance(kid, str) or not kid:
            raise CheckFailed(f"{label} has no kid")
        if kid in found:
            raise CheckFailed(f"{label} appears twice")
        for name, expected in (("kty", "RSA"), ("use", "sig"), ("alg", ctx.signing_alg)):
            if key.get(name) != expected:
                raise CheckFailed(f"{label}: {name} is {short(key.get(name))}, expected {expected}")
        try:
            bits = int.from_bytes(b64url_decode(str(key.get("n", ""))), "big").bit_length()
        except ValueError as exc:
            raise CheckFailed(f"{label}: n is not base64url") from exc
        if bits < MIN_RSA_BITS:
            raise CheckFailed(f"{label} has a {bits}-bit modulus, expected >= {MIN_RSA_BITS}")
        try:
            found[kid] = RSAKey.import_key(key)
        except (ValueError, JoseError) as exc:
            raise CheckFailed(f"{label} is not a valid RSA public key") from exc
    ctx.keys = found


@check("jwks-cache")
async def check_jwks_cache(ctx: Context) -> None:
    """The JWKS is cacheable (public, max-age > 0) and revalidates with its ETag (304)."""
    response = await ctx.get(JWKS_PATH)
    if response.status_code != 200:
        raise CheckFailed(f"GET {JWKS_PATH}: HTTP {response.status_code}")
    cache_control = response.headers.get("cache-control", "")
    directives = cache_directives(cache_control)
    max_age = directives.get("max-age", "")
    numeric = max_age.isascii() and max_age.isdigit()  # "²" is a digit to isdigit(), not int()
    if "public" not in directives or not numeric or int(max_age) <= 0:
        raise CheckFailed(f"Cache-Control is {short(cache_control)}, expected public, max-age=N")
    etag = response.headers.get("etag")
    if not etag:
        raise CheckFailed("no ETag header")
    again = await ctx.get(JWKS_PATH, headers={"If-None-Match": etag})
    if again.status_code != 304:
        raise CheckFailed(f"If-None-Match with the ETag: HTTP {again.status_code}, expected 304")
