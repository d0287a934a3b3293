"""HTTP routes of the OAuth layer: /oauth2/token and the /.well-known documents."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from authlib.oauth2.rfc6749.errors import InvalidRequestError, OAuth2Error
from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .. import documents, mfa
from ..config import Settings
from ..deps import AppState, StateDep
from ..dpop import DpopError, DpopNonceError
from ..models import sha256_hex
from ..names import (
    CONFIDENTIAL_AUTH_METHODS,
    DPOP_ALGS,
    FAPI2_ALGS,
    GRANT_TYPES,
    PRIVATE_KEY_ALGS,
    SECRET_ALGS,
    USER_AUTH_METHODS,
)
from ..observability import audit
from ..passwords import normalize_username
from ..ratelimit import Verdict
from . import store
from .grants import BAD_CREDENTIALS, SECOND_FACTOR_NEEDED
from .requests import FormRequest, form_request
from .server import Response as ServerResponse
from .server import TokenServer

router = APIRouter()

ASSERTION_ALGS = (*PRIVATE_KEY_ALGS, *SECRET_ALGS)

#: Grants whose every check and write needs no database (the client comes from the cache).
NO_DATABASE_GRANTS = frozenset({"client_credentials"})
SCOPES = ["openid", "profile", "email"]
#: What /userinfo can return, by scope (OpenID Connect Core §5.4).
SCOPE_CLAIMS = {"profile": ["preferred_username", "name"], "email": ["email", "email_verified"]}
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def json_response(
    status: int,
    body: dict[str, Any],
    headers: list[tuple[str, str]] | dict[str, str] = (),  # type: ignore[assignment]
    *,
    no_store: bool = False,
) -> Response:
    """A compact JSON answer; the headers are set in one pass (Starlette's mutable headers
    rescan the list on every assignment). ``no_store``: RFC 6749 §5.1's caching headers."""
    extra = {k: v for k, v in dict(headers).items() if k.lower() != "content-type"}
    if no_store:
        extra.update(NO_STORE)
    return Response(
        json.dumps(body, separators=(",", ":")).encode(),
        status_code=status,
        headers=extra,
        media_type="application/json",
    )


def token_response(status: int, body: dict[str, Any], headers: list[tuple[str, str]]) -> Response:
    # RFC 6749 §5.1: no caching of token responses, success or error.
    return json_response(status, body, headers, no_store=True)


async def token(request: Request) -> Response:
    state: AppState = request.app.state.auth
    settings = state.settings
    limiter = state.limiter
    ip = limiter.client_ip(request)
    # Per client IP first, before the body is even read: floods of garbage count too.
    verdict = await limiter.hit([(limiter.token_ip, "token-ip", ip)])
    if not verdict.allowed:
        return _too_many(verdict)
    try:
        oauth_request = await form_request(
            request, uri=settings.issuer + "/oauth2/token", limit=settings.max_body_bytes
        )
        grant_type = oauth_request.form.get("grant_type")
        if grant_type is None:
            raise InvalidRequestError("Missing 'grant_type' parameter.")
        if grant_type not in GRANT_TYPES:
            # Authlib's own error carries no description; never echo the value back.
            raise OAuth2Error(
                error="unsupported_grant_type",
                description=f"Supported grant types: {', '.join(GRANT_TYPES)}.",
            )
    except OAuth2Error as error:
        audit("token.refused", grant_type=None, client_id=None, error=error.error)
        return token_response(*error())
    form = oauth_request.form
    claimed = oauth_request.claimed_client_id
    username = form.get("username") if grant_type == "password" else None
    account = normalize_username(username)[:150] if username else None
    by_account = [(limiter.token_account, "token-account", account)] if account else []
    # A client is only checked here; it is counted below, once it has authenticated.
    checks = [(limiter.token_client, "token-client", claimed[:100])] if claimed else []
    verdict = await limiter.check(checks + by_account)
    if not verdict.allowed:
        return _too_many(verdict)
    if account is not None and await limiter.throttled(account, ip):
        # Too many failed passwords: refused unchecked, with the ordinary answer, so the
        # throttle reveals nothing (not even that the account exists).
        audit("token.refused", grant_type=grant_type, error="invalid_grant", throttled=True)
        await limiter.count(by_account)
        return token_response(
            400, {"error": "invalid_grant", "error_description": BAD_CREDENTIALS}, []
        )

    async def landed(db: AsyncConnection, result: ServerResponse) -> bool:
        """After an uncertain commit: are this grant's writes in the database?

        Asked so that a rotation that landed is answered with its tokens, not with a 503 whose
        retry would be refused as reuse (and would end the sign-in).
        """
        status, body, _ = result
        if status != 200:
            return False  # errors write only idempotent revocations: run again
        if refresh_token := body.get("refresh_token"):
            found = store.REFRESH_EXISTS, {"p_token_hash": sha256_hex(refresh_token)}
        elif oauth_request.family is not None:
            found = store.FAMILY_EXISTS, {"p_family_id": oauth_request.family.id}
        else:
            return True  # nothing was written
        return (await db.execute(*found)).first() is not None

    status, body, headers = await _run(request, oauth_request, "token", landed)
    client_id = getattr(oauth_request.client, "client_id", None)
    # Only authenticated requests count against a client: nobody can spend another's quota.
    by_client = [(limiter.token_client, "token-client", client_id)] if client_id else []
    await limiter.count(by_client + by_account)
    if status == 200:
        user_id = getattr(oauth_request.user, "id", None)
        audit("token.issued", grant_type=grant_type, client_id=client_id, user_id=user_id)
    else:
        audit("token.refused", grant_type=grant_type, client_id=client_id, error=body.get("error"))
        if (
            account is not None
            and body.get("error") == "invalid_grant"
            # A right password refused for want of a second factor is no failed guess.
            and body.get("error_description") != SECOND_FACTOR_NEEDED
        ):
            await limiter.failed(account, ip)
    if status == 200 and oauth_request.dpop is not None and settings.dpop_require_nonce:
        # RFC 9449 §8.2: the nonce for the client's next proof (it rotates by itself).
        nonce = request.app.state.oauth.dpop.current_nonce()
        headers = [*headers, ("DPoP-Nonce", nonce)]
    return token_response(status, body, headers)


def _rate_limited(verdict: Verdict) -> ServerResponse:
    retry_after = verdict.retry_after
    description = f"Too many requests; retry in {retry_after} s."
    return (
        429,
        {"error": "rate_limited", "error_description": description},
        [("Retry-After", str(retry_after))],
    )


def _too_many(verdict: Verdict, endpoint: str = "token") -> Response:
    audit("rate_limit.exceeded", endpoint=endpoint, scope=verdict.scope)
    return token_response(*_rate_limited(verdict))


async def revoke(request: Request) -> Response:
    """RFC 7009: 200 for a revoked, unknown or already-dead token alike (§2.2)."""
    return await _endpoint(request, "revocation", "/oauth2/revoke")


async def introspect(request: Request) -> Response:
    """RFC 7662: the token's metadata if live and the caller may see it, else active false."""
    return await _endpoint(request, "introspection", "/oauth2/introspect")


async def _endpoint(request: Request, name: str, path: str) -> Response:
    settings: Settings = request.app.state.auth.settings
    try:
        oauth_request = await form_request(
            request, uri=settings.issuer + path, limit=settings.max_body_bytes
        )
    except OAuth2Error as error:
        return token_response(*error())
    status, body, headers = await _run(request, oauth_request, name, _run_again)
    return token_response(status, body, headers)


def _dpop_error(error: DpopError) -> dict[str, Any]:
    """RFC 9449 §7.1 / §12.2: ``invalid_dpop_proof`` or ``use_dpop_nonce``, as RFC 6749 §5.2."""
    return {"error": error.error, "error_description": error.description}


async def _run_again(db: AsyncConnection, result: ServerResponse) -> bool:
    """Revocation and introspection: running them twice answers the same, so run again."""
    return False


async def _run(
    request: Request,
    oauth_request: FormRequest,
    endpoint: str,
    landed: Callable[[AsyncConnection, ServerResponse], Awaitable[bool]],
) -> ServerResponse:
    """Run Authlib's synchronous server (built once, ``server.py``) for one request.

    The client comes first, from the cache (``server/clients.py``). A grant that needs no
    database (client_credentials) then runs without a connection. The others run on one
    transaction: a connection lost before the commit runs the whole grant again on a fresh
    one (``Database.run_core``), since nothing of the first attempt was written; one lost
    during the commit (or during the refresh grant's one write, sent without a transaction)
    asks ``landed`` whether it was.
    """
    state: AppState = request.app.state.auth
    server: TokenServer = request.app.state.oauth
    # A URL client id whose document this server would fetch now: limited per address.
    admitted = await documents.admit(state, request, oauth_request.claimed_client_id)
    if not admitted.allowed:
        return _rate_limited(admitted)
    if endpoint == "token":
        # RFC 9449 §5: the proof is checked before anything else runs, so a refused one spends
        # neither a client assertion nor a code or refresh token. Its URI is the issuer's,
        # never one built from the Host header.
        try:
            oauth_request.dpop = await server.dpop.verify(
                request.headers.getlist("dpop"),
                method="POST",
                url=state.settings.issuer + "/oauth2/token",
            )
        except DpopNonceError as error:
            return 400, _dpop_error(error), [("DPoP-Nonce", error.nonce)]
        except DpopError as error:
            return 400, _dpop_error(error), []
    if oauth_request.assertion is not None:
        # RFC 7523 §2.2: verified here, where keys can be fetched and the jti checked in the
        # shared storage; Authlib then finds the verified client (``assertion.py``).
        try:
            await server.assertions.verify(oauth_request, oauth_request.assertion)
        except OAuth2Error as error:
            failed: ServerResponse = server.handle_error_response(oauth_request, error)
            return failed
    elif oauth_request.claimed_client_id:
        await state.clients.get(oauth_request.claimed_client_id)

    def call() -> ServerResponse:
        answer: ServerResponse = (
            server.create_token_response(oauth_request)
            if endpoint == "token"
            else server.create_endpoint_response(endpoint, oauth_request)
        )
        return answer

    if endpoint == "token" and oauth_request.form.get("grant_type") in NO_DATABASE_GRANTS:
        return call()

    def on(connection: Connection) -> ServerResponse:
        oauth_request.db = connection
        return call()

    async def unit(db: AsyncConnection) -> ServerResponse:
        return await db.run_sync(on)

    # Without BEGIN and COMMIT (two round trips): introspection, which only reads, and on
    # PostgreSQL the refresh grant, whose one write is a single atomic statement (store.py).
    no_transaction = endpoint == "introspection" or (
        oauth_request.form.get("grant_type") == "refresh_token"
        and state.db.engine.dialect.name == "postgresql"
    )
    return await state.db.run_core(unit, landed, autocommit=no_transaction)


def discovery_document(settings: Settings) -> dict[str, Any]:
    """RFC 8414 / OpenID Connect Discovery 1.0 metadata: only what this server really does."""
    issuer = settings.issuer
    methods, confidential = list(USER_AUTH_METHODS), list(CONFIDENTIAL_AUTH_METHODS)
    algs, dpop_algs = list(ASSERTION_ALGS), list(DPOP_ALGS)
    if settings.fapi2:
        # FAPI 2.0 Security Profile §5.3.2.1 and §5.4.1: private_key_jwt, and its algorithms.
        methods = confidential = ["private_key_jwt"]
        algs = dpop_algs = list(FAPI2_ALGS)
    document: dict[str, Any] = {
        "issuer": issuer,
        "authorization_endpoint": issuer + "/oauth2/authorize",
        "token_endpoint": issuer + "/oauth2/token",
        "jwks_uri": issuer + "/.well-known/jwks.json",
        "userinfo_endpoint": issuer + "/userinfo",
        "end_session_endpoint": issuer + "/logout",
        "revocation_endpoint": issuer + "/oauth2/revoke",
        "introspection_endpoint": issuer + "/oauth2/introspect",
        "scopes_supported": SCOPES,
        "claims_supported": [
            "sub",
            "iss",
            "aud",
            "exp",
            "iat",
            "auth_time",
            "nonce",
            "at_hash",
            "sid",
            # RFC 8176 methods and the level (OpenID Connect Core §2) of the sign-in.
            "amr",
            "acr",
            *[claim for claims in SCOPE_CLAIMS.values() for claim in claims],
        ],
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": [
            grant for grant in GRANT_TYPES if not (settings.fapi2 and grant == "password")
        ],
        "code_challenge_methods_supported": ["S256"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [settings.signing_alg],
        "token_endpoint_auth_methods_supported": methods,
        "revocation_endpoint_auth_methods_supported": methods,
        # RFC 7662 §2.1: introspection needs a confidential client.
        "introspection_endpoint_auth_methods_supported": confidential,
        # RFC 8414 §2: the algorithms of private_key_jwt and client_secret_jwt assertions.
        "token_endpoint_auth_signing_alg_values_supported": algs,
        "revocation_endpoint_auth_signing_alg_values_supported": algs,
        "introspection_endpoint_auth_signing_alg_values_supported": algs,
        "prompt_values_supported": ["none", "login", "consent"],
        # OpenID Connect Discovery 1.0 §3: the levels ``acr_values`` may ask for, weakest
        # first ("1" password, "2" with a second factor, "phr"/"phrh" passkeys: server/mfa.py).
        "acr_values_supported": list(mfa.ACR_VALUES),
        "authorization_response_iss_parameter_supported": True,  # RFC 9207
        "request_parameter_supported": False,
        "claims_parameter_supported": False,
        "dpop_signing_alg_values_supported": dpop_algs,  # RFC 9449 §5.1
        # RFC 9126 §5: pushed authorization requests, and whether every client must use them.
        "pushed_authorization_request_endpoint": issuer + "/oauth2/par",
        "require_pushed_authorization_requests": settings.require_par or settings.fapi2,
    }
    if settings.client_registration != "off":
        document["registration_endpoint"] = issuer + "/oauth2/register"  # RFC 7591 §3
    if settings.client_metadata_documents:
        # draft-ietf-oauth-client-id-metadata-document: an https client_id is its document.
        document["client_id_metadata_document_supported"] = True
    if settings.resources:
        # RFC 9728 §4: the protected resources this server issues tokens for (AUTH_RESOURCES;
        # the default audience is this server's own, not a listed resource).
        document["protected_resources"] = list(settings.resources)
    return document


@router.get("/.well-known/openid-configuration")
@router.get("/.well-known/oauth-authorization-server")
async def discovery(state: StateDep) -> Response:
    return json_response(
        200,
        discovery_document(state.settings),
        {"Cache-Control": "public, max-age=300"},
    )


class PlainRoute(Route):
    """A Starlette route (no dependency solving), recording itself in ``scope["route"]`` as
    FastAPI's routes do, for the metrics' route label."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self
        await super().handle(scope, receive, send)


#: The token, revocation and introspection endpoints: plain Starlette routes, added to the
#: app's own router (``server.main``), since FastAPI's dependency solver cost about 0.1 ms a
#: request on them (bench/notes.md), for one parameter.
PLAIN_ROUTES = [
    PlainRoute(path, endpoint, methods=["POST"], include_in_schema=False)
    for path, endpoint in (
        ("/oauth2/token", token),
        ("/oauth2/revoke", revoke),
        ("/oauth2/introspect", introspect),
    )
]
