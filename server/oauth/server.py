"""Authlib's ``AuthorizationServer``, built once per app with its grants and endpoints.

Nothing of one request is kept on it: the request object carries the transaction (``db``: a
synchronous Core ``Connection`` at the token endpoint, the ORM ``Session`` at the authorization
endpoint, ``None`` for a grant that needs no database), the one clock reading (``issued_at``),
the client, user and family. Authlib's core is synchronous: the token endpoint reads the body
and looks the client up (``server/clients.py``) first, then runs the grant inside
``AsyncConnection.run_sync``, whose statements still run on the async driver through
SQLAlchemy's greenlet bridge, so the event loop never blocks on the database; argon2 leaves the
loop through a worker thread (``await_only``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Any

from authlib.oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import OAuth2Request
from authlib.oauth2.rfc6749.errors import (
    InvalidClientError,
    UnsupportedResponseTypeError,
)
from authlib.oidc.core.util import create_half_hash
from sqlalchemy.util import await_only

from .. import mfa
from ..bearer import DPOP
from ..clients import ClientCache
from ..deps import AppState
from ..dpop import DpopVerifier, Proof
from ..models import Client, User, new_id, sha256_hex
from ..names import JWT_AUTH_METHODS
from ..passwords import Verification, normalize_username
from ..replay import ReplayGuard
from . import store
from .assertion import CLIENT_AUTH_FAILED, ClientAssertion
from .client_keys import ClientKeys
from .endpoints import Introspection, Revocation
from .grants import (
    ClientCredentialsGrant,
    CodeGrant,
    InvalidDpopProofError,
    PasswordGrant,
    Pkce,
    RefreshTokenGrant,
)
from .registration import Configuration, Registration
from .resources import audience

Response = tuple[int, dict[str, Any], list[tuple[str, str]]]

REFRESH_TOKEN_BYTES = 32  # 256 bits from the OS CSPRNG

__all__ = ["CLIENT_AUTH_FAILED", "Response", "TokenServer"]


def sign_in_claims(amr: str) -> dict[str, Any]:
    """``amr`` (RFC 8176 methods) and ``acr`` (OpenID Connect Core §2) of a sign-in by
    ``amr``: what the ID token (and refreshes of it, §12.2: the family keeps them) and /userinfo
    say. A sign-in from before methods were recorded (empty ``amr``) gets neither: no claim is
    better than a wrong one (both are optional, §2)."""
    acr = mfa.acr_of(amr)
    if acr is None:
        return {}
    return {"amr": mfa.amr_list(amr), "acr": acr}


class TokenServer(AuthorizationServer):  # type: ignore[misc]
    def __init__(self, state: AppState, clients: ClientCache) -> None:
        super().__init__()
        self.state = state
        self.settings = state.settings
        self.clients = clients
        #: One guard for every ``jti`` this app remembers (client assertions and DPoP
        #: proofs, in their own namespaces), in the shared rate-limit storage.
        replay = ReplayGuard(state.limiter.storage)
        #: RFC 9449: the proofs of the token endpoint (``routes._run``) and of the resources
        #: (``bearer.py``), checked by one verifier.
        self.dpop = DpopVerifier(state.settings, replay)
        #: RFC 7523 §2.2: verified in the async prelude (``routes._run``), then handed to
        #: Authlib by the two registered methods.
        self.assertions = ClientAssertion(
            state.settings,
            clients,
            # A ``jwks_uri`` is read through the app's fetcher (SSRF-safe, cached), looked up
            # at each call so that a test may give the app another one.
            ClientKeys(lambda url, refresh: state.fetcher.get_json(url, refresh=refresh)),
            replay,
        )
        for method in JWT_AUTH_METHODS:
            self.register_client_auth_method(method, self.assertions)
        #: Keys the successors of refresh tokens rotated within a retry window (``successor``):
        #: derived from the server secret, so every replica computes the same successor.
        self._successor_key = hmac.new(
            state.settings.secret_key.encode(), b"refresh-retry-successor-v1", hashlib.sha256
        ).digest()
        for grant in (PasswordGrant, RefreshTokenGrant, ClientCredentialsGrant):
            self.register_grant(grant)
        self.register_grant(CodeGrant, [Pkce(required=True)])
        self.register_endpoint(Revocation)
        self.register_endpoint(Introspection)
        self.register_endpoint(Registration)
        self.register_endpoint(Configuration)

    # -- Authlib integration points ---------------------------------------------

    def query_client(self, client_id: str) -> Client | None:
        """The client the route looked up (``ClientCache.get``) before Authlib ran."""
        return self.clients.peek(client_id)

    def authenticate_client(
        self, request: OAuth2Request, methods: list[str], endpoint: str = "token"
    ) -> Client:
        try:
            client: Client = super().authenticate_client(request, methods, endpoint)
        except InvalidClientError as error:
            # SPEC: invalid_client is always 401 with WWW-Authenticate (RFC 6749 §5.2).
            error.status_code = 401
            # One description for an unknown client and a wrong secret (Authlib words them
            # differently): the answer must not tell which client ids exist. Used by the
            # token, revocation and introspection endpoints alike.
            error.description = CLIENT_AUTH_FAILED
            raise
        method = client.token_endpoint_auth_method
        if self.settings.fapi2 and method != "private_key_jwt":
            # FAPI 2.0 Security Profile §5.3.2.1: confidential clients only, authenticated
            # with private_key_jwt (this server has no mutual TLS).
            raise InvalidClientError(
                status_code=401,
                description="This server accepts only private_key_jwt client authentication.",
            )
        bound = client.dpop_bound or self.settings.fapi2  # FAPI 2.0: sender-constrained only
        if endpoint == "token" and bound and getattr(request, "dpop", None) is None:
            # RFC 9449 §5 (dpop_bound_access_tokens): checked once the client has
            # authenticated and before the grant looks at its code or token, so nothing is spent.
            raise InvalidDpopProofError("This client's tokens must be DPoP-bound: send a proof.")
        return client

    def get_authorization_grant(self, request: OAuth2Request) -> Any:
        """Authlib's lookup, but an unknown ``response_type`` gets a fixed description: Authlib's
        quotes the value and raises ``ValueError`` (a 500) when it holds ``"``, ``\\`` or
        non-ASCII text (RFC 6749 §4.1.2.1 bars them from ``error_description``). The error
        goes to the redirect URI only when it is the client's (§4.1.2.1), as Authlib does."""
        if request.payload.response_type == "code":
            return super().get_authorization_grant(request)
        redirect_uri = None
        client = self.query_client(request.payload.client_id or "")
        if client is not None:
            requested = request.payload.redirect_uri
            if requested:
                redirect_uri = requested if client.check_redirect_uri(requested) else None
            else:
                redirect_uri = client.get_default_redirect_uri()
        # The first argument is Authlib's ``response_type`` attribute, which it never sends.
        raise UnsupportedResponseTypeError(
            None,
            description="The response_type is not supported; use 'code'.",
            redirect_uri=redirect_uri,
        )

    def create_oauth2_request(self, request: OAuth2Request) -> OAuth2Request:
        return request

    def create_json_request(self, request: Any) -> Any:
        return request

    def handle_response(
        self, status: int, body: dict[str, Any], headers: list[tuple[str, str]]
    ) -> Response:
        return status, body, headers

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Authlib's hook points; audit events are emitted where the outcome is known."""

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        """Store the first refresh token of a new family (access tokens are self-contained
        JWTs; a rotation stores its successor in ``save_rotation``)."""
        refresh_token = token.get("refresh_token")
        if not refresh_token:
            return
        family: store.Family = request.family
        store.insert_refresh(
            request.db,
            family_id=family.id,
            token_hash=sha256_hex(refresh_token),
            now=request.issued_at,
            expires_at=self._refresh_expiry(request),
        )

    def save_rotation(self, request: OAuth2Request, refresh_token: str) -> bool:
        """Rotate the presented refresh token to ``refresh_token``: True for exactly one of
        simultaneous requests (``store.rotate``)."""
        return store.rotate(
            request.db,
            family_id=request.family.id,
            token_id=request.presented.token_id,
            now=request.issued_at,
            successor_hash=sha256_hex(refresh_token),
            successor_expires_at=self._refresh_expiry(request),
        )

    def _refresh_expiry(self, request: OAuth2Request) -> int:
        expires_at: int = min(
            request.issued_at + self.settings.refresh_token_ttl, request.family.expires_at
        )
        return expires_at

    # -- our own services, used by the grants ------------------------------------

    def find_user(self, request: OAuth2Request, username: str) -> User | None:
        return store.find_user(request.db, normalize_username(username))

    def verify_password(
        self, request: OAuth2Request, user: User | None, password: str
    ) -> Verification:
        """Argon2 on a worker thread, awaited from inside the greenlet bridge.

        The transaction is ended first so no database lock or pooled connection is held
        while the hash runs (tens of milliseconds).
        """
        request.db.commit()
        password_hash = user.password_hash if user is not None else None
        result: Verification = await_only(
            self.state.passwords.verify_async(password_hash, password)
        )
        return result

    def rehash(self, request: OAuth2Request, user: User, password: str) -> None:
        new_hash = await_only(self.state.passwords.hash_async(password))
        store.rehash(request.db, user.id, new_hash)

    def start_family(
        self,
        request: OAuth2Request,
        *,
        scope: str,
        auth_time: int,
        amr: str = "",
        resources: str = "",
        browser_session_id: str | None = None,
    ) -> store.Family:
        """Open a family (one sign-in) for this request's user.

        Every user token belongs to one, refresh tokens or not, so that signing out, revoking,
        disabling the user or changing the password ends all of its access tokens through
        one row (the ``sid`` claim). Without the refresh_token grant the family lives as long
        as its one access token.
        """
        client: Client = request.client
        refreshable = client.check_grant_type("refresh_token")
        lifetime = (
            self.settings.refresh_token_max_lifetime
            if refreshable
            else self.settings.access_token_ttl
        )
        family = store.Family(
            id=new_id(),
            client_id=client.client_id,
            user_id=request.user.id,
            scope=scope,
            resources=resources,
            auth_time=auth_time,
            amr=amr,
            expires_at=request.issued_at + lifetime,
            browser_session_id=browser_session_id,
            # RFC 9449 §5: a public client's refresh tokens are bound to the proof's key (a
            # confidential client's are not: it authenticates when it refreshes).
            dpop_jkt=request.dpop.jkt if request.dpop is not None and client.is_public else None,
        )
        store.insert_family(request.db, family, now=request.issued_at)
        request.family = family
        return family

    def successor(self, presented: str, scope: str, resources: list[str]) -> str:
        """The refresh token that rotating ``presented`` for ``scope`` and ``resources`` gives
        when the client has a retry window: an HMAC of them under a server key, so that a
        retry of the same request recomputes it (and finds it by its hash) while nothing but
        hashes is stored. A retry asking for another scope or other resources computes another
        one, finds nothing, and is reuse; the same ones in another order are the same request
        (scope is a set, RFC 6749 §3.3, and so are resources). 256 bits, as a random token."""
        message = "\n".join(
            [presented, " ".join(sorted(set(scope.split()))), " ".join(sorted(set(resources)))]
        ).encode()
        digest = hmac.new(self._successor_key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def issue(
        self,
        request: OAuth2Request,
        *,
        scope: str,
        nonce: str | None = None,
        refresh_token: str | None = None,
    ) -> dict[str, Any]:
        """The token response (RFC 6749 §5.1) with an RFC 9068 JWT access token; the grant
        stores its refresh token (``save_token``, ``save_rotation``)."""
        settings = self.settings
        client: Client = request.client
        user: User | store.Subject | None = request.user
        family: store.Family | None = request.family
        issued_at: int = request.issued_at
        claims: dict[str, Any] = {
            "iss": settings.issuer,
            "sub": user.id if user is not None else client.client_id,
            # RFC 8707 §2 / RFC 9068 §3: the resources asked for, else the default audience.
            "aud": audience(request.resources, settings),
            "exp": issued_at + settings.access_token_ttl,
            "iat": issued_at,
            "jti": secrets.token_urlsafe(16),
            "client_id": client.client_id,
            "scope": scope,
        }
        if user is not None:
            claims["auth_time"] = family.auth_time if family is not None else issued_at
        if family is not None:
            # The family id lets one lookup revoke or introspect every token of a sign-in.
            claims["sid"] = family.id
        proof: Proof | None = request.dpop
        if proof is not None:
            # RFC 9449 §6.1: bound to the proof's key; worth nothing without a fresh proof.
            claims["cnf"] = {"jkt": proof.jkt}
        token: dict[str, Any] = {
            "access_token": self.state.keys.keyset().sign(claims, "at+jwt"),
            # RFC 9449 §5: a bound token is of type DPoP.
            "token_type": DPOP if proof is not None else "Bearer",
            "expires_in": settings.access_token_ttl,
            "scope": scope,
        }
        if family is not None and client.check_grant_type("refresh_token"):
            token["refresh_token"] = refresh_token or secrets.token_urlsafe(REFRESH_TOKEN_BYTES)
        if user is not None and "openid" in scope.split():
            token["id_token"] = self.id_token(request, token["access_token"], nonce)
        return token

    def id_token(self, request: OAuth2Request, access_token: str, nonce: str | None) -> str:
        """OpenID Connect Core §2 and §3.1.3.6: who signed in, for the client (``aud``).

        Profile claims are served by /userinfo, not copied here (§5.4: they go in the ID token
        only when no access token is issued).
        """
        settings = self.settings
        family: store.Family | None = request.family
        issued_at: int = request.issued_at
        claims: dict[str, Any] = {
            "iss": settings.issuer,
            "sub": request.user.id,
            "aud": request.client.client_id,
            "exp": issued_at + settings.access_token_ttl,
            "iat": issued_at,
            "auth_time": family.auth_time if family is not None else issued_at,
            # §3.1.3.6: left half of SHA-256 of the access token, base64url.
            "at_hash": create_half_hash(access_token, settings.signing_alg).decode("ascii"),
        }
        if nonce:
            claims["nonce"] = nonce
        if family is not None:
            claims["sid"] = family.id
            claims.update(sign_in_claims(family.amr))
        return self.state.keys.keyset().sign(claims, "JWT")
