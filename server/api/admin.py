"""The admin API for operators' automation (/admin/v1): clients, users and signing keys, as
the CLI does.

Callers are clients, not people: a client_credentials token carrying the ``admin`` scope,
which only a client created as admin can receive (``AdminDep``). Every action, reads included,
is an audit event with ``actor_client_id`` naming that client. Lists are keyset-paginated:
``limit`` (1-200, default 50) and the opaque ``cursor`` from the previous page's
``next_cursor``, which is ``null`` on the last page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import asdict
from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from .. import manage
from ..boundary import NO_NUL, PATH_ID, text_problem
from ..config import Env
from ..deps import AppState, StateDep
from ..keys import KeyInfo, RotationTooSoonError
from ..models import User, live_families, now
from ..observability import audit
from .account import NewUser, SessionId, UserSession
from .auth import AdminDep, ApiError, Body, client_refusals, no_store, user_refusals

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No token, or an invalid, expired or revoked one (`invalid_token`)"},
    403: {"description": "Not a client token with the `admin` scope (`insufficient_scope`)"},
}
router = APIRouter(
    prefix="/admin/v1", tags=["admin"], dependencies=[Depends(no_store)], responses=ERRORS
)

Grant = Literal["password", "refresh_token", "client_credentials", "authorization_code"]
_SCOPE_TOKEN = manage.SCOPE_TOKEN_RE.pattern.strip("^$")
#: Scope tokens (RFC 6749 §3.3) separated by single spaces, or nothing.
SCOPE_PATTERN = rf"^({_SCOPE_TOKEN}( {_SCOPE_TOKEN})*)?$"
Uri = Annotated[str, Field(min_length=1, max_length=manage.MAX_URI_LENGTH, pattern=NO_NUL)]
ClientId = Annotated[str, Path(min_length=1, max_length=100, pattern=manage.CLIENT_ID_RE.pattern)]
UserId = Annotated[str, Path(min_length=1, max_length=64, pattern=PATH_ID)]
Limit = Annotated[int, Query(ge=1, le=200, description="Items per page")]
Cursor = Annotated[
    str | None,
    Query(max_length=512, pattern=NO_NUL, description="`next_cursor` of the previous page"),
]


# -- models --------------------------------------------------------------------------------


class ClientOut(BaseModel):
    """A client as ``clients show --json`` prints it (RFC 7591 §2 names where one exists)."""

    model_config = ConfigDict(extra="forbid")

    client_id: str
    name: str
    #: No secret: authenticates with PKCE only (``authorization_code``) or not at all.
    public: bool
    admin: bool
    resource_server: bool
    first_party: bool
    grant_types: list[str]
    #: Space-separated (RFC 6749 §3.3).
    scope: str
    redirect_uris: list[str]
    post_logout_redirect_uris: list[str]
    created_at: int


class CreatedClient(ClientOut):
    #: Shown once, in this answer only; ``null`` for a public client.
    client_secret: str | None


class ClientSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")

    client_id: str
    #: Shown once; the previous secret stops working at once.
    client_secret: str


class _Registration(Body):
    """What creating and changing a client share."""

    #: The operator's own app: people are not asked to consent.
    first_party: bool = False
    grant_types: list[Grant] = Field(default_factory=list, max_length=4)
    #: Space-separated scope tokens (RFC 6749 §3.3); ``admin`` only for an admin client.
    scope: str = Field(default="", max_length=2000, pattern=SCOPE_PATTERN)
    redirect_uris: list[Uri] = Field(default_factory=list, max_length=20)
    post_logout_redirect_uris: list[Uri] = Field(default_factory=list, max_length=20)


class NewClient(_Registration):
    """``grant_types`` defaults to password and refresh_token (+ client_credentials unless
    public); none for a resource server."""

    client_id: str = Field(min_length=1, max_length=100, pattern=manage.CLIENT_ID_RE.pattern)
    name: str = Field(default="", max_length=200, pattern=NO_NUL)
    public: bool = False
    #: May receive the ``admin`` scope, and so act on this API.
    admin: bool = False
    #: May introspect every token (RFC 7662 §2.1); must be confidential.
    resource_server: bool = False


class ClientChange(_Registration):
    """Only the fields sent change; lists are replaced whole."""

    name: str = Field(default="", min_length=1, max_length=200, pattern=NO_NUL)


class ClientPage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ClientOut]
    next_cursor: str | None


class UserOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    username: str
    email: str | None
    name: str | None
    disabled: bool
    created_at: int
    password_changed_at: int


class UserPage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[UserOut]
    next_cursor: str | None


class PasswordReset(Body):
    password: str = Field(min_length=1, max_length=4096, pattern=NO_NUL)


class UserSessions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sessions: list[UserSession]


class Revoked(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Sign-ins ended by this request.
    revoked: int


def _user_out(user: User) -> UserOut:
    return UserOut(**manage.user_view(user))


# -- pagination and errors -------------------------------------------------------------------


def _mac(secret_key: str, payload: str) -> str:
    mac = hmac.new(secret_key.encode(), b"cursor|" + payload.encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


def _cursor(secret_key: str, kind: str, key: str) -> str:
    """``payload.mac``: the listing and the last key, HMAC-SHA256 signed with the secret key
    (as the CSRF tokens are, ``web.browser``), so only a cursor this server made is read."""
    raw = json.dumps([kind, key], separators=(",", ":")).encode()
    payload = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return f"{payload}.{_mac(secret_key, payload)}"


def _after(secret_key: str, kind: str, cursor: str | None) -> str | None:
    """The key a cursor continues after; 400 ``invalid_cursor`` for anything we did not make
    for this listing (forged, altered, signed with another key, or another listing's)."""
    if cursor is None:
        return None
    payload, _, mac = cursor.partition(".")
    decoded: Any = None
    # As bytes: compare_digest raises TypeError on a str with non-ASCII characters.
    expected = _mac(secret_key, payload).encode()
    if mac and hmac.compare_digest(expected, mac.encode("utf-8", "surrogatepass")):
        try:
            decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (ValueError, binascii.Error, UnicodeError):
            decoded = None
    if (
        not isinstance(decoded, list)
        or len(decoded) != 2
        or decoded[0] != kind
        or not isinstance(decoded[1], str)
        or text_problem(decoded[1]) is not None
    ):
        raise ApiError(400, "invalid_cursor", "The cursor is not one this listing made.")
    return decoded[1]


def _page(
    secret_key: str, kind: str, rows: list[Any], limit: int, key: str
) -> tuple[list[Any], str | None]:
    """``rows`` was fetched with ``limit + 1``: the extra row only says a next page exists."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, _cursor(secret_key, kind, getattr(rows[-1], key))


def _https_only(state: AppState) -> bool:
    return state.settings.env is Env.production


CLIENT_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such client (`not_found`)"},
}
USER_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such user (`not_found`)"},
}
CURSOR_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "A cursor this listing did not make (`invalid_cursor`)"},
}
CLIENT_INPUT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "description": "`invalid_client_metadata` (e.g. client_credentials for a public "
        "client) or `invalid_redirect_uri` (https only in production, exact strings)"
    },
}

# -- clients ---------------------------------------------------------------------------------


@router.post(
    "/clients",
    status_code=201,
    responses={**CLIENT_INPUT_ERRORS, 409: {"description": "Client id taken (`client_exists`)"}},
)
async def create_client(new: NewClient, admin: AdminDep, state: StateDep) -> CreatedClient:
    """Register a client. Its secret is in this answer and nowhere else, ever."""
    with client_refusals():
        created = await manage.create_client(
            admin.db,
            client_id=new.client_id,
            public=new.public,
            admin=new.admin,
            resource_server=new.resource_server,
            first_party=new.first_party,
            grants=list(new.grant_types),
            scope=new.scope,
            redirect_uris=new.redirect_uris,
            post_logout_redirect_uris=new.post_logout_redirect_uris,
            name=new.name,
            https_only=_https_only(state),
            actor=admin.client_id,
        )
        await admin.commit()
    return CreatedClient(**manage.client_view(created.client), client_secret=created.secret)


@router.get("/clients", responses=CURSOR_ERRORS)
async def list_clients(
    admin: AdminDep, state: StateDep, limit: Limit = 50, cursor: Cursor = None
) -> ClientPage:
    after = _after(state.settings.secret_key, "clients", cursor)
    rows = await manage.page_clients(admin.db, after=after, limit=limit + 1)
    clients, next_cursor = _page(state.settings.secret_key, "clients", rows, limit, "client_id")
    audit("admin.clients_listed", actor_client_id=admin.client_id, count=len(clients))
    return ClientPage(
        items=[ClientOut(**manage.client_view(c)) for c in clients], next_cursor=next_cursor
    )


@router.get("/clients/{client_id}", responses=CLIENT_ERRORS)
async def show_client(client_id: ClientId, admin: AdminDep) -> ClientOut:
    with client_refusals():
        client = await manage.get_client(admin.db, client_id)
    audit("admin.client_viewed", actor_client_id=admin.client_id, client_id=client_id)
    return ClientOut(**manage.client_view(client))


@router.patch("/clients/{client_id}", responses={**CLIENT_ERRORS, **CLIENT_INPUT_ERRORS})
async def update_client(
    client_id: ClientId, change: ClientChange, admin: AdminDep, state: StateDep
) -> ClientOut:
    """Change the name, consent, grants, scopes or URIs; sign-ins already made keep only the
    scopes the client still has when they next refresh."""
    with client_refusals():
        client = await manage.update_client(
            admin.db,
            client_id,
            change.model_dump(include=change.model_fields_set),
            https_only=_https_only(state),
            actor=admin.client_id,
        )
        await admin.commit()
    return ClientOut(**manage.client_view(client))


@router.post(
    "/clients/{client_id}/secret",
    responses={**CLIENT_ERRORS, 409: {"description": "A public client (`public_client`)"}},
)
async def rotate_secret(client_id: ClientId, admin: AdminDep) -> ClientSecret:
    """A new secret, shown once; the old one stops working at once. Tokens already issued
    stay valid until they expire."""
    with client_refusals():
        secret = await manage.rotate_client_secret(admin.db, client_id, actor=admin.client_id)
        await admin.commit()
    return ClientSecret(client_id=client_id, client_secret=secret)


@router.delete(
    "/clients/{client_id}",
    status_code=204,
    responses={
        **CLIENT_ERRORS,
        409: {"description": "The acting client itself (`cannot_delete_self`)"},
    },
)
async def delete_client(client_id: ClientId, admin: AdminDep) -> Response:
    """Delete the client with its sign-ins; its tokens stop working at once."""
    if client_id == admin.client_id:
        # Deleting the last admin client would leave only the CLI; the CLI can do it.
        raise ApiError(409, "cannot_delete_self", "A client cannot delete itself here.")
    with client_refusals():
        await manage.delete_client(admin.db, client_id, actor=admin.client_id)
        await admin.commit()
    return Response(status_code=204)


# -- users -----------------------------------------------------------------------------------


@router.post(
    "/users",
    status_code=201,
    responses={
        400: {"description": "`invalid_user` or `weak_password`"},
        409: {"description": "The username is taken (`username_taken`)"},
    },
)
async def create_user(new: NewUser, admin: AdminDep, state: StateDep) -> UserOut:
    """Create a person, with the password policy of sign-up (registration need not be on)."""
    with user_refusals():
        user = await manage.create_user(
            admin.db,
            state.passwords,
            username=new.username,
            password=new.password,
            email=new.email,
            name=new.name,
            actor=admin.client_id,
        )
        await admin.commit()
    return _user_out(user)


@router.get("/users", responses=CURSOR_ERRORS)
async def list_users(
    admin: AdminDep,
    state: StateDep,
    limit: Limit = 50,
    cursor: Cursor = None,
    search: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=150,
            pattern=NO_NUL,
            description="Part of the username (compared as sign-in does) or of the email",
        ),
    ] = None,
    disabled: Annotated[bool | None, Query(description="Only disabled or enabled")] = None,
) -> UserPage:
    after = _after(state.settings.secret_key, "users", cursor)
    rows = await manage.page_users(
        admin.db, after=after, limit=limit + 1, search=search, disabled=disabled
    )
    users, next_cursor = _page(state.settings.secret_key, "users", rows, limit, "username_key")
    # The search text may be personal data: the audit says only that there was one.
    audit(
        "admin.users_listed",
        actor_client_id=admin.client_id,
        count=len(users),
        searched=search is not None,
    )
    return UserPage(items=[_user_out(u) for u in users], next_cursor=next_cursor)


@router.get("/users/{user_id}", responses=USER_ERRORS)
async def show_user(user_id: UserId, admin: AdminDep) -> UserOut:
    with user_refusals():
        user = await manage.get_user_by_id(admin.db, user_id)
    audit("admin.user_viewed", actor_client_id=admin.client_id, user_id=user_id)
    return _user_out(user)


@router.post("/users/{user_id}/disable", responses=USER_ERRORS)
async def disable_user(user_id: UserId, admin: AdminDep) -> UserOut:
    """The person can no longer sign in; every sign-in and token of theirs stops at once."""
    with user_refusals():
        user = await manage.get_user_by_id(admin.db, user_id)
        await manage.disable(admin.db, user, actor=admin.client_id)
        await admin.commit()
    return _user_out(user)


@router.post("/users/{user_id}/enable", responses=USER_ERRORS)
async def enable_user(user_id: UserId, admin: AdminDep) -> UserOut:
    """The person may sign in again; sign-ins ended by disabling stay ended."""
    with user_refusals():
        user = await manage.get_user_by_id(admin.db, user_id)
        await manage.enable(admin.db, user, actor=admin.client_id)
        await admin.commit()
    return _user_out(user)


@router.post(
    "/users/{user_id}/password",
    status_code=204,
    responses={**USER_ERRORS, 400: {"description": "`weak_password`"}},
)
async def reset_password(
    user_id: UserId, reset: PasswordReset, admin: AdminDep, state: StateDep
) -> Response:
    """Set a new password (the sign-up policy applies); every sign-in of the person ends."""
    with user_refusals():
        user = await manage.get_user_by_id(admin.db, user_id)
        # Two transactions: manage.reset_password hashes (argon2) before its first query, and
        # this one has ended by then, so no connection or lock is held while it does.
        await admin.release()
        await manage.reset_password(
            admin.db, state.passwords, user, reset.password, actor=admin.client_id
        )
        await admin.commit()
    return Response(status_code=204)


@router.get("/users/{user_id}/sessions", responses=USER_ERRORS)
async def list_sessions(user_id: UserId, admin: AdminDep) -> UserSessions:
    """The person's live sign-ins, most recently used first."""
    with user_refusals():
        user = await manage.get_user_by_id(admin.db, user_id)
    families = list(await admin.db.execute(live_families(user.id, now())))
    audit("admin.sessions_listed", actor_client_id=admin.client_id, user_id=user_id)
    return UserSessions(sessions=[UserSession.of(family, name) for family, name in families])


@router.delete("/users/{user_id}/sessions", responses=USER_ERRORS)
async def revoke_sessions(user_id: UserId, admin: AdminDep) -> Revoked:
    """End every sign-in of the person (they may sign in again)."""
    with user_refusals():
        user = await manage.get_user_by_id(admin.db, user_id)
    count = await manage.revoke_user_families(admin.db, user.id, reason="revoked_by_admin")
    await admin.commit()
    audit(
        "session.revoked",
        actor_client_id=admin.client_id,
        via="admin_api",
        user_id=user_id,
        families_revoked=count,
    )
    return Revoked(revoked=count)


@router.delete(
    "/users/{user_id}/sessions/{session_id}",
    status_code=204,
    responses={404: {"description": "No such live sign-in of that user (`not_found`)"}},
)
async def revoke_session(
    user_id: UserId,
    session_id: SessionId,
    admin: AdminDep,
) -> Response:
    """End one sign-in: its refresh token and every access token it issued stop working."""
    ended = await manage.end_sign_in(admin.db, user_id, session_id, reason="revoked_by_admin")
    await admin.commit()
    if not ended:
        raise ApiError(404, "not_found", "No such live sign-in of that user.")
    audit(
        "session.revoked",
        actor_client_id=admin.client_id,
        via="admin_api",
        user_id=user_id,
        family_id=session_id,
    )
    return Response(status_code=204)


# -- signing keys ----------------------------------------------------------------------------


class KeyOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kid: str
    #: ``next`` (published, not yet signing), ``current`` (signs) or ``retired`` (published
    #: until its tokens expire).
    state: str
    created_at: int
    activated_at: int | None
    retired_at: int | None


class Keys(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyOut]


class KeyRotation(Body):
    #: Promote the next key even if it was published less than a JWKS max-age ago (only
    #: safe when no verifier caches the JWKS, or all refetch it on an unknown ``kid``).
    force: bool = False


class KeysPruned(BaseModel):
    model_config = ConfigDict(extra="forbid")

    removed: list[str]
    #: Why each retired key that stays is still needed.
    kept: list[str]
    #: Files keys.json did not list (left by an interrupted rotation), now deleted.
    orphans: list[str]


def _keys_out(infos: list[KeyInfo]) -> Keys:
    return Keys(keys=[KeyOut(**asdict(info)) for info in infos])


@router.get("/keys")
async def list_keys(admin: AdminDep, state: StateDep) -> Keys:
    """The signing keys' manifest (never a private key): the JWKS publishes next, current and
    retired keys; ``current`` signs."""
    await admin.release()  # the keys are files: no transaction is held while they are read
    infos = await to_thread.run_sync(state.keys.read_manifest)
    audit("admin.keys_listed", actor_client_id=admin.client_id)
    return _keys_out(infos)


@router.post(
    "/keys/rotate",
    responses={409: {"description": "The next key is too new to sign (`rotation_too_soon`)"}},
)
async def rotate_keys(
    admin: AdminDep, state: StateDep, rotation: KeyRotation | None = None
) -> Keys:
    """next → current, current → retired, and a new next key, as ``keys rotate`` does. Every
    replica sharing the keys directory picks the change up within AUTH_KEY_RELOAD_INTERVAL."""
    await admin.release()  # the keys are files: no transaction is held while they change
    min_age = 0 if rotation is not None and rotation.force else state.settings.jwks_max_age
    try:
        infos = await to_thread.run_sync(lambda: state.keys.rotate(min_next_age=min_age))
    except RotationTooSoonError:
        detail = (
            f"The next key was published less than the JWKS max-age ({min_age} s) ago, so "
            'cached JWKS may not hold it yet: retry later, or send {"force": true}.'
        )
        raise ApiError(409, "rotation_too_soon", detail) from None
    await to_thread.run_sync(state.keys.reload)  # this replica signs with it at once
    current = next(info.kid for info in infos if info.state == "current")
    audit("key.rotated", kid=current, actor_client_id=admin.client_id, via="admin_api")
    return _keys_out(infos)


@router.post("/keys/prune")
async def prune_keys(admin: AdminDep, state: StateDep) -> KeysPruned:
    """Remove retired keys whose every token has expired, as ``keys prune`` does."""
    await admin.release()  # the keys are files: no transaction is held while they change
    ttl = state.settings.access_token_ttl
    pruned = await to_thread.run_sync(lambda: state.keys.prune(max_token_lifetime=ttl))
    await to_thread.run_sync(state.keys.reload)
    audit(
        "key.pruned",
        removed=pruned.removed,
        orphans=pruned.orphans,
        actor_client_id=admin.client_id,
        via="admin_api",
    )
    return KeysPruned(removed=pruned.removed, kept=pruned.kept, orphans=pruned.orphans)
