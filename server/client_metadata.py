"""Client metadata (RFC 7591 §2) as a careful server checks it: from a registration request, an
RFC 7592 update, or a client metadata document (draft-ietf-oauth-client-id-metadata-document).

One function, ``parse_client_metadata``, turns a JSON object into ``ClientMetadata`` or raises
``MetadataError`` with the RFC 7591 §3.2.2 error code (``invalid_redirect_uri`` or
``invalid_client_metadata``) and a description that never repeats the value at length.
Unknown members are ignored (RFC 7591 §2: "the authorization server MUST ignore any client
metadata sent by the client that it does not understand").
"""

from __future__ import annotations

import ipaddress
import json
import re
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import KeySet

from .boundary import text_problem
from .config import Env, Settings
from .names import CLIENT_AUTH_METHODS, KEYED_AUTH_METHODS, SECRET_AUTH_METHODS

#: What a client that registered itself may do: never the password grant (it would collect
#: people's passwords in its own UI, RFC 9700 §2.4), never ``admin``.
REGISTRABLE_GRANTS: tuple[str, ...] = ("authorization_code", "refresh_token", "client_credentials")
REGISTRABLE_SCOPES: tuple[str, ...] = ("openid", "profile", "email", "account")
DEFAULT_SCOPE = "openid profile email"
MAX_URIS = 20
MAX_URI_LENGTH = 2000
MAX_NAME_LENGTH = 200
MAX_KEYS = 10
#: The JWK Set of a registration, serialised: more is not a key set a client needs.
MAX_JWKS_BYTES = 16_384
MIN_RSA_BITS = 2048
#: RFC 7517 §4 private members of RSA, EC, OKP keys, and the symmetric ``k``.
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
SCOPE_TOKEN_RE = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]{1,64}$")  # RFC 6749 §3.3 scope-token


class MetadataError(ValueError):
    def __init__(self, description: str, error: str = "invalid_client_metadata") -> None:
        super().__init__(description)
        self.error = error
        self.description = description


@dataclass(frozen=True)
class ClientMetadata:
    name: str
    redirect_uris: list[str]
    post_logout_redirect_uris: list[str]
    grant_types: list[str]
    response_types: list[str]
    auth_method: str
    jwks: dict[str, Any] | None
    jwks_uri: str | None
    scope: str
    #: RFC 8707 resources of ``AUTH_RESOURCES`` it may ask for; ``None``: all of them.
    resources: list[str] | None
    #: RFC 9449 §5.2 ``dpop_bound_access_tokens``: token requests need a DPoP proof.
    dpop_bound: bool = False
    #: RFC 9126 §6 ``require_pushed_authorization_requests``: authorization requests must be
    #: pushed (PAR) first.
    require_par: bool = False

    @property
    def jwks_json(self) -> str | None:
        return None if self.jwks is None else json.dumps(self.jwks, separators=(",", ":"))


def _string(data: dict[str, Any], name: str, limit: int) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise MetadataError(f"{name} must be a string")
    problem = text_problem(value, limit)
    if problem is not None:
        raise MetadataError(f"{name} {problem}")
    return value


def _strings(data: dict[str, Any], name: str, limit: int = MAX_URIS) -> list[str] | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise MetadataError(f"{name} must be an array of strings")
    if len(value) > limit:
        raise MetadataError(f"{name} may hold at most {limit} values")
    return list(dict.fromkeys(value))


def _loopback_literal(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_redirect_uri(uri: str, name: str = "redirect_uris") -> str:
    """RFC 8252 and RFC 9700 §4.1: https with a host; http only to a loopback IP literal (a
    native app's listener, RFC 8252 §7.3; not ``localhost``, §8.3); or a private-use scheme in
    reverse-domain form (RFC 8252 §7.1). Always absolute, without a fragment (RFC 6749
    §3.1.2), spaces, user information or wildcards, compared later as the exact string."""

    def refuse(why: str) -> MetadataError:
        return MetadataError(f"each of {name} {why}", "invalid_redirect_uri")

    if text_problem(uri, MAX_URI_LENGTH) is not None or len(uri) > MAX_URI_LENGTH:
        raise refuse(f"must be text of at most {MAX_URI_LENGTH} characters")
    if any(c.isspace() for c in uri) or "#" in uri or "*" in uri:
        raise refuse("must be an exact URI without a fragment, spaces or wildcards")
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        raise refuse("must be a valid URI") from None
    scheme = parts.scheme.lower()
    if scheme == "https":
        if not parts.hostname or "@" in parts.netloc:
            raise refuse("must name a host, without user information")
    elif scheme == "http":
        if not parts.hostname or not _loopback_literal(parts.hostname) or "@" in parts.netloc:
            raise refuse(
                "must be https, or http to a loopback IP literal (127.0.0.1 or [::1]) for "
                "a native app (RFC 8252 section 7.3)"
            )
    elif not re.fullmatch(r"[a-z][a-z0-9+-]*(\.[a-z0-9+-]+)+", scheme) or not uri.startswith(
        parts.scheme + ":/"
    ):
        raise refuse(
            "must be https, loopback http, or a private-use scheme in reverse-domain form "
            "(com.example.app:/callback, RFC 8252 section 7.1)"
        )
    return uri


def check_fetch_url(url: str, settings: Settings, name: str) -> str:
    """A URL this server will fetch (``jwks_uri``, a metadata document): https in production;
    plain http is accepted outside production only (a local test server). The address it
    resolves to is checked when it is fetched (``server/fetch.py``)."""
    if text_problem(url, MAX_URI_LENGTH) is not None or any(c.isspace() for c in url):
        raise MetadataError(f"{name} must be an absolute https URL")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a port out of range)
    except ValueError:
        raise MetadataError(f"{name} must be an absolute https URL") from None
    allowed = ("https",) if settings.env is Env.production else ("https", "http")
    if parts.scheme not in allowed or not parts.hostname or "@" in parts.netloc or parts.fragment:
        raise MetadataError(f"{name} must be an absolute https URL without a fragment")
    return url


def check_jwks(value: Any) -> dict[str, Any]:
    """A JWK Set of public signing keys only: RSA of 2048 bits or more, EC, or OKP; never a
    private member, never a symmetric key (one could otherwise key an HMAC)."""
    if not isinstance(value, dict) or not isinstance(value.get("keys"), list):
        raise MetadataError("jwks must be a JWK Set: an object with a 'keys' array")
    keys = value["keys"]
    if not 1 <= len(keys) <= MAX_KEYS:
        raise MetadataError(f"jwks must hold 1 to {MAX_KEYS} keys")
    if len(json.dumps(value)) > MAX_JWKS_BYTES:
        raise MetadataError(f"jwks must be at most {MAX_JWKS_BYTES} bytes")
    for key in keys:
        if not isinstance(key, dict) or key.get("kty") not in ("RSA", "EC", "OKP"):
            raise MetadataError("jwks keys must be public RSA, EC or OKP keys")
        if PRIVATE_MEMBERS & set(key):
            raise MetadataError("jwks must hold public keys only: a private member was sent")
        if key.get("use", "sig") != "sig":
            raise MetadataError("jwks keys must be signing keys (use 'sig')")
    try:
        with warnings.catch_warnings():
            # joserfc warns of a small RSA key; it is refused just below, with a reason.
            warnings.simplefilter("ignore", SecurityWarning)
            keyset = KeySet.import_key_set(value)  # type: ignore[arg-type]
    except (JoseError, ValueError, TypeError, KeyError):
        raise MetadataError("jwks holds a key that cannot be read") from None
    for key in keyset:
        size = getattr(key.public_key, "key_size", None)
        if key.key_type == "RSA" and (size is None or size < MIN_RSA_BITS):
            raise MetadataError(f"jwks RSA keys must be at least {MIN_RSA_BITS} bits")
    return {"keys": [dict(key) for key in keys]}


def parse_client_metadata(
    data: Any, settings: Settings, *, document: bool = False
) -> ClientMetadata:
    """``document``: the rules of a client metadata document (no shared secret: its client
    authenticates with ``none`` or ``private_key_jwt``, and ``none`` is the default)."""
    if not isinstance(data, dict):
        raise MetadataError("the client metadata must be a JSON object")
    grants = _strings(data, "grant_types", len(REGISTRABLE_GRANTS) + 2)
    grants = ["authorization_code"] if grants is None else grants
    if "password" in grants:
        raise MetadataError(
            "the password grant is only for clients an operator creates; use authorization_code"
        )
    unknown = [g for g in grants if g not in REGISTRABLE_GRANTS]
    if unknown:
        raise MetadataError(f"grant_types may hold only {', '.join(REGISTRABLE_GRANTS)}")
    code_flow = "authorization_code" in grants
    responses = _strings(data, "response_types", 4)
    responses = (["code"] if code_flow else []) if responses is None else responses
    if [r for r in responses if r != "code"]:
        raise MetadataError("response_types may hold only 'code'")
    if ("code" in responses) != code_flow:
        # RFC 7591 §2.1: response type code goes with the authorization_code grant.
        raise MetadataError(
            "response_types 'code' and grant_types 'authorization_code' go together"
        )

    default_method = "none" if document else "client_secret_basic"
    method = _string(data, "token_endpoint_auth_method", 64) or default_method
    if method not in CLIENT_AUTH_METHODS:
        raise MetadataError(
            f"token_endpoint_auth_method must be one of {', '.join(CLIENT_AUTH_METHODS)}"
        )
    if settings.fapi2 and method != "private_key_jwt":
        # FAPI 2.0 Security Profile §5.3.2.1: confidential clients with private_key_jwt.
        raise MetadataError("token_endpoint_auth_method must be private_key_jwt on this server")
    if document and method not in ("none", "private_key_jwt"):
        raise MetadataError(
            "a client metadata document's client authenticates with none or private_key_jwt "
            "(it has no shared secret)"
        )
    if document and "client_credentials" in grants:
        # Anyone can publish a document: it identifies an app people sign in to (with their
        # consent), never a service acting on its own, which only an operator or a vetted
        # registration (an initial access token) may create.
        raise MetadataError(
            "a client metadata document's client uses authorization_code and refresh_token only"
        )
    if "client_credentials" in grants and method not in KEYED_AUTH_METHODS:
        raise MetadataError("client_credentials needs a confidential authentication method")
    jwks = data.get("jwks")
    jwks_uri = _string(data, "jwks_uri", MAX_URI_LENGTH)
    if jwks is not None and jwks_uri is not None:
        raise MetadataError("send jwks or jwks_uri, not both (RFC 7591 section 2)")
    if method == "private_key_jwt":
        if jwks is None and jwks_uri is None:
            raise MetadataError("private_key_jwt needs jwks or jwks_uri")
    elif jwks is not None or jwks_uri is not None:
        raise MetadataError("jwks and jwks_uri are used only with private_key_jwt")
    keys = check_jwks(jwks) if jwks is not None else None
    if jwks_uri is not None:
        check_fetch_url(jwks_uri, settings, "jwks_uri")

    redirect_uris = [check_redirect_uri(u) for u in _strings(data, "redirect_uris") or []]
    if code_flow and not redirect_uris:
        raise MetadataError(
            "the authorization_code grant needs redirect_uris", "invalid_redirect_uri"
        )
    logout_uris = [
        check_redirect_uri(u, "post_logout_redirect_uris")
        for u in _strings(data, "post_logout_redirect_uris") or []
    ]

    scope_text = _string(data, "scope", 1000)
    scopes = (DEFAULT_SCOPE if scope_text is None else scope_text).split()
    if "admin" in scopes:
        raise MetadataError("the admin scope is never given to a registered client")
    bad = [s for s in scopes if not SCOPE_TOKEN_RE.fullmatch(s) or s not in REGISTRABLE_SCOPES]
    if bad:
        raise MetadataError(f"scope may hold only {' '.join(REGISTRABLE_SCOPES)}")

    resources = _strings(data, "resources")
    if resources is not None and not set(resources) <= set(settings.resources):
        raise MetadataError("resources may hold only resources this server serves")

    flags: dict[str, bool] = {}
    for flag in ("dpop_bound_access_tokens", "require_pushed_authorization_requests"):
        value = data.get(flag)
        if value is not None and not isinstance(value, bool):
            raise MetadataError(f"{flag} must be a boolean")
        flags[flag] = bool(value)

    name = _string(data, "client_name", MAX_NAME_LENGTH) or ""
    return ClientMetadata(
        name=name,
        redirect_uris=redirect_uris,
        post_logout_redirect_uris=logout_uris,
        grant_types=list(dict.fromkeys(grants)),
        response_types=responses,
        auth_method=method,
        jwks=keys,
        jwks_uri=jwks_uri,
        scope=" ".join(dict.fromkeys(scopes)),
        resources=resources,
        dpop_bound=flags["dpop_bound_access_tokens"],
        require_par=flags["require_pushed_authorization_requests"],
    )


def metadata_view(client: Any) -> dict[str, Any]:
    """RFC 7591 section 3.2.1: every metadata value registered for ``client`` (a model row)."""
    view: dict[str, Any] = {
        "client_id": client.client_id,
        "client_id_issued_at": client.created_at,
        "client_name": client.name,
        "redirect_uris": client.redirect_uri_list,
        "grant_types": client.grant_type_list,
        "response_types": ["code"] if client.check_grant_type("authorization_code") else [],
        "token_endpoint_auth_method": client.token_endpoint_auth_method,
        "scope": client.scope,
        # RFC 9449 §5.2: always answered, false when it was not registered (its default).
        "dpop_bound_access_tokens": bool(client.dpop_bound),
        # RFC 9126 §6: likewise, false by default.
        "require_pushed_authorization_requests": bool(client.require_par),
    }
    if client.post_logout_redirect_uris:
        view["post_logout_redirect_uris"] = client.post_logout_redirect_uri_list
    if client.jwks is not None:
        view["jwks"] = json.loads(client.jwks)
    if client.jwks_uri is not None:
        view["jwks_uri"] = client.jwks_uri
    if client.resources is not None:
        view["resources"] = client.resource_list
    if client.token_endpoint_auth_method in (*SECRET_AUTH_METHODS, "client_secret_jwt"):
        view["client_secret_expires_at"] = 0  # RFC 7591 §3.2.1: 0, it does not expire
    return view
