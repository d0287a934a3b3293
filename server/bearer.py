"""Authenticating resource requests with our own access tokens, as a resource server must: one
module for /userinfo, the account API (/api/v1) and the admin API (/admin/v1).

- The credential: ``presented`` reads ``Authorization: Bearer <token>`` (RFC 6750 §2.1; the
  scheme is case-insensitive, RFC 9110 §11.1). Without one the answer is a bare challenge
  (RFC 6750 §3.1: no error code).
- Validation, in two steps. ``token_claims`` checks the token alone, without the database
  (``tokens.decode_access_token``: RFC 9068 §4 signature with a published key, ``typ``
  at+jwt, ``iss``, ``aud``, ``exp``), so a forged or expired token never costs a connection.
  ``live_bearer`` then asks the database, in the caller's unit of work, whether it is still
  live (``store.access_token_live``: deny-list, client, family) and loads who is behind
  it, as introspection does. A user token of a disabled person is not live.
- Refusals: a ``Refusal`` carries RFC 6750 §3's challenge (``WWW-Authenticate: Bearer``,
  401 ``invalid_token``, 403 ``insufficient_scope`` naming the scope needed) and renders the
  answer. What differs between endpoints is a ``Realm`` (a parameter, not code): the realm's
  name, its descriptions and the body's shape, ``oauth`` (RFC 6750 §3 / OpenID Connect Core
  §5.3.3 ``{"error", "error_description"}``, /userinfo) or ``api`` (the JSON APIs'
  ``{"detail", "error_code"}``).

What a token may do (its scope, a person or a client behind it) is each endpoint's own rule,
checked on the ``Bearer`` it gets and refused through its realm.

DPoP (RFC 9449 §7): ``presented`` also reads ``Authorization: DPoP <token>``, and
``token_claims`` then checks the request's ``DPoP`` proof (``dpop.DpopVerifier``: ``htm`` the
request's method, ``htu`` the issuer and the request's path, ``ath`` the token's hash, the key
the token's ``cnf.jkt``). A bound token sent as ``Bearer``, and an unbound one sent as ``DPoP``
(§7.2 lets a server refuse it), are ``invalid_token``, challenged in the scheme the token
needs; a bad proof is 401 with
``WWW-Authenticate: DPoP error="invalid_dpop_proof", algs="…"`` (§7.1), a missing nonce
``use_dpop_nonce`` with ``DPoP-Nonce``. A request without credentials is challenged with both
schemes; one with a token, in the scheme it was sent with: so are the refusals an endpoint
makes itself once ``token_claims`` passed (403 ``insufficient_scope``, 401 for a token the
database finds dead), as ``WWW-Authenticate: DPoP algs="…", error="insufficient_scope"`` for a
DPoP-bound token (RFC 9449 §7.1; RFC 6750 §3.1's error codes in the DPoP scheme).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from .deps import AppState
from .dpop import DpopBindingError, DpopError, DpopNonceError, DpopVerifier
from .models import Client, User, now
from .names import DPOP_ALGS
from .oauth.store import access_token_live
from .tokens import decode_access_token

BEARER = "Bearer"
DPOP = "DPoP"
#: RFC 9449 §7.1: the ``algs`` parameter of a DPoP challenge.
DPOP_ALGS_PARAM = " ".join(DPOP_ALGS)
BOUND_AS_BEARER = "This access token is DPoP-bound: send it with the DPoP scheme and a proof."
NOT_BOUND = "This access token is not DPoP-bound: send it with the Bearer scheme."

#: The scheme of the credential ``token_claims`` read for the request being served (each
#: request runs in a context of its own; ``token_claims`` sets it on every call). The
#: refusals an endpoint makes after it (``Realm.insufficient_scope``, ``Realm.invalid_token``
#: without a scheme) challenge in that scheme without being told.
_request_scheme: ContextVar[str] = ContextVar("bearer_request_scheme", default=BEARER)


@dataclass(frozen=True)
class Credential:
    """An access token as a request presented it, with its authentication scheme."""

    scheme: str
    token: str


def presented(request: Request) -> Credential | None:
    """The request's ``Authorization: Bearer`` (RFC 6750 §2.1) or ``Authorization: DPoP``
    (RFC 9449 §7.1) token, if it sent one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if not token:
        return None
    return {"bearer": Credential(BEARER, token), "dpop": Credential(DPOP, token)}.get(
        scheme.lower()
    )


def challenge(
    realm: str,
    error: str | None = None,
    description: str = "",
    scope: str = "",
    scheme: str = BEARER,
    acr_values: str = "",
) -> dict[str, str]:
    """The RFC 6750 §3 ``WWW-Authenticate`` header; with the DPoP scheme, RFC 9449 §7.1's
    (``algs`` added); ``acr_values``: RFC 9470 §3's, for ``insufficient_user_authentication``."""
    parts = [f'realm="{realm}"']
    if scheme == DPOP:
        parts.append(f'algs="{DPOP_ALGS_PARAM}"')
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append(f'error_description="{description}"')
    if scope:
        parts.append(f'scope="{scope}"')
    if acr_values:
        parts.append(f'acr_values="{acr_values}"')
    return {"WWW-Authenticate": f"{scheme} " + ", ".join(parts)}


@dataclass(frozen=True)
class Realm:
    """How one protected resource answers a refused request: RFC 6750 §3 fixes the statuses,
    the error codes and the challenge; the realm's name, the descriptions and the body are
    the resource's."""

    name: str
    #: ``oauth``: ``{"error", "error_description"}`` (RFC 6750 §3), and no body at all for a
    #: request without credentials; ``api``: ``{"detail", "error_code"}``, always.
    body: Literal["oauth", "api"]
    #: The description of a token that is not (or no longer) a live one.
    invalid: str
    #: The ``api`` body's ``detail`` for a request without credentials.
    missing: str = ""
    #: The resource takes DPoP-bound tokens too (``token_claims``; RFC 9449 §7.1), and
    #: challenges with both schemes. Off for credentials that are only ever bearer tokens
    #: (registration's, RFC 7591 §3 / RFC 7592 §3).
    dpop: bool = False

    def missing_token(self) -> Refusal:
        # RFC 6750 §3.1: a request without credentials gets the challenge and no error code.
        return Refusal(self, 401, None, self.missing)

    def scheme(self, scheme: str | None = None) -> str:
        """The scheme to challenge in: ``scheme`` if given, else the one the request's token
        was sent with (``token_claims``); always Bearer for a realm without DPoP."""
        if scheme is not None:
            return scheme
        return _request_scheme.get() if self.dpop else BEARER

    def invalid_token(self, scheme: str | None = None, description: str = "") -> Refusal:
        """RFC 6750 §3.1 ``invalid_token`` (RFC 9449 §7.1 in the DPoP scheme)."""
        description = description or self.invalid
        return Refusal(self, 401, "invalid_token", description, scheme=self.scheme(scheme))

    def dpop_refused(self, error: DpopError) -> Refusal:
        """RFC 9449 §7.1: a proof refused (``invalid_dpop_proof``) or without the nonce it
        needs (``use_dpop_nonce``, the nonce in ``DPoP-Nonce``)."""
        nonce = error.nonce if isinstance(error, DpopNonceError) else None
        return Refusal(self, 401, error.error, error.description, scheme=DPOP, nonce=nonce)

    def insufficient_scope(
        self, description: str, scope: str = "", scheme: str | None = None
    ) -> Refusal:
        """RFC 6750 §3.1 403 ``insufficient_scope`` naming ``scope``; for a token sent with
        the DPoP scheme, RFC 9449 §7.1's challenge (``DPoP``, with ``algs``). The token was
        sent, in one scheme: that one alone is challenged, as for ``invalid_token``."""
        return Refusal(
            self, 403, "insufficient_scope", description, scope, scheme=self.scheme(scheme)
        )


class Refusal(Exception):
    """A request refused by bearer authentication; ``response()`` is the answer its realm
    gives (main.py answers every ``Refusal`` raised by a route or a dependency with it)."""

    def __init__(
        self,
        realm: Realm,
        status: int,
        error: str | None,
        description: str,
        scope: str = "",
        *,
        scheme: str = BEARER,
        nonce: str | None = None,
    ) -> None:
        super().__init__(description)
        self.realm = realm
        self.status = status
        #: ``None``: no credentials were sent (RFC 6750 §3.1).
        self.error = error
        self.description = description
        self.scope = scope
        #: The scheme the challenge names: the one the credential was sent with.
        self.scheme = scheme
        #: RFC 9449 §8: the ``DPoP-Nonce`` to send.
        self.nonce = nonce

    def response(self) -> Response:
        description = self.description if self.error else ""
        headers = challenge(self.realm.name, self.error, description, self.scope, self.scheme)
        if self.nonce is not None:
            headers["DPoP-Nonce"] = self.nonce
        response: Response
        if self.realm.body == "api":
            body = {"detail": self.description, "error_code": self.error or "missing_token"}
            response = JSONResponse(body, self.status, {"Cache-Control": "no-store", **headers})
        elif self.error is None:
            response = Response(status_code=self.status, headers=headers)
        else:
            # RFC 6750 §3: the error in the challenge, and the same in the body.
            body = {"error": self.error, "error_description": self.description}
            response = JSONResponse(body, self.status, {**headers, "Cache-Control": "no-store"})
        if self.error is None and self.realm.dpop:
            # No credentials: both schemes are accepted, each challenge in its own field
            # (RFC 9110 §11.6.1, RFC 9449 §7.1).
            dpop = challenge(self.realm.name, scheme=DPOP)["WWW-Authenticate"]
            response.headers.append("WWW-Authenticate", dpop)
        return response


@dataclass(frozen=True)
class Bearer:
    """A live access token: its claims, its client and, for a user token, the person."""

    claims: dict[str, Any]
    client: Client
    #: ``None`` for a client_credentials token (no ``auth_time``: nobody signed in).
    user: User | None

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(str(self.claims["scope"]).split())


async def token_claims(request: Request, state: AppState, realm: Realm) -> dict[str, Any]:
    """The claims of the request's access token if it is one we signed, it has not expired
    and, when it is DPoP-bound, the request's proof is good for it; checked without the
    database; else the realm's 401 (never raises anything else, whatever was sent)."""
    credential = presented(request)
    if credential is None or (credential.scheme == DPOP and not realm.dpop):
        _request_scheme.set(BEARER)
        raise realm.missing_token()
    _request_scheme.set(credential.scheme)
    claims = decode_access_token(
        state.keys.keyset(),
        credential.token,
        issuer=state.settings.issuer,
        audience=state.settings.audience,
        now=now(),
    )
    if claims is None:
        raise realm.invalid_token(credential.scheme)
    jkt = bound_key(claims)
    if credential.scheme == BEARER:
        if jkt is not None:
            # RFC 9449 §7.1: a bound token is worth nothing without its proof; the challenge
            # names the scheme it needs (and the token sent as DPoP unbound, Bearer).
            raise realm.invalid_token(DPOP, BOUND_AS_BEARER)
        return claims
    if jkt is None:
        raise realm.invalid_token(BEARER, NOT_BOUND)
    verifier: DpopVerifier = request.app.state.oauth.dpop
    try:
        await verifier.verify(
            request.headers.getlist("dpop"),
            method=request.method,
            # The URI the client addressed, from the issuer: never the Host header.
            url=state.settings.issuer + request.url.path,
            access_token=credential.token,
            required_jkt=jkt,
        )
    except DpopBindingError:
        raise realm.invalid_token(DPOP) from None
    except DpopError as error:
        raise realm.dpop_refused(error) from None
    return claims


def bound_key(claims: dict[str, Any]) -> str | None:
    """RFC 9449 §6.1: the thumbprint an access token is bound to (``cnf.jkt``), if any."""
    cnf = claims.get("cnf")
    jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
    return jkt if isinstance(jkt, str) else None


def _load(db: Session, claims: dict[str, Any]) -> Bearer | None:
    if not access_token_live(db, claims):
        return None
    client = db.get(Client, claims["client_id"])
    assert client is not None  # access_token_live found it, in this same transaction
    if "auth_time" not in claims:
        return Bearer(claims, client, None)
    user = db.get(User, claims["sub"])
    return None if user is None or user.disabled else Bearer(claims, client, user)


async def live_bearer(db: AsyncSession, claims: dict[str, Any]) -> Bearer | None:
    """The token of ``claims`` (from ``token_claims``) with its client and person, if the
    database says it is live; else ``None``. Runs in ``db``, the caller's unit of work."""
    return await db.run_sync(_load, claims)
