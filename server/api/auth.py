"""Protecting the JSON APIs with our own access tokens (bearer.py: the credential, its
validation and the RFC 6750 §3 refusals, shared with /userinfo).

On top of a live token (``bearer.Bearer``):

- ``PersonScope(scope)``: a person's token carrying ``scope`` from a client still allowed it;
  ``CallerDep`` is ``PersonScope("account")`` (the account API), ``FirstPartyCallerDep`` the
  same from a first-party client (the password change).
- ``ClientScope(scope)``: a client_credentials token carrying ``scope`` from a client still
  allowed it; ``AdminDep`` is ``ClientScope("admin")``, the admin API.

Each request is one unit of work (``Unit``): the dependency takes one session from
``Database.session`` once the token passed the checks that need no database, finds the token
live in its transaction, and hands that session to the handler (``caller.db``, ``admin.db``),
which reads and writes in the same transaction and commits. Handlers that run argon2 end the
transaction first (``Unit.release``), as the token endpoint does.

Refusals are the ``API`` realm's (``bearer.py``): 401 with ``WWW-Authenticate: Bearer
realm="api"`` and ``DPoP realm="api", algs="…"`` when no token was sent, and
``error="invalid_token"`` or 403 ``insufficient_scope`` in the scheme of the token that was
(RFC 6750 §3, RFC 9449 §7.1); the body is SPEC's ``{"detail", "error_code"}``, as every
``ApiError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from pydantic import BaseModel, ConfigDict, field_validator
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from .. import manage
from ..bearer import Bearer, Realm, Refusal, live_bearer, token_claims
from ..boundary import text_problem
from ..deps import AppState, StateDep
from ..models import ACCOUNT_SCOPE, Client, User
from ..observability import audit


class Body(BaseModel):
    """A request body of the JSON APIs: exactly what its schema says. No unknown fields, no
    lax conversions (pydantic would otherwise read ``1`` and ``"yes"`` as ``true``), and no
    text the database cannot store (``boundary.text_problem``) in any field, however added.

    The text check is a validator of every field rather than a type of each: a type with its
    own validator hides the field's ``pattern`` from the OpenAPI schema, which clients and
    schemathesis read."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        for text in value if isinstance(value, list) else [value]:
            problem = text_problem(text) if isinstance(text, str) else None
            if problem is not None:
                raise ValueError(f"Text {problem}.")
        return value


class ApiError(Exception):
    """An error of the JSON APIs: ``{"detail", "error_code"}`` with ``status`` and headers."""

    def __init__(
        self, status: int, error_code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error_code = error_code
        self.detail = detail
        self.headers = headers or {}


#: The JSON APIs' answer to a refused token: ``{"detail", "error_code"}``.
API = Realm(
    "api",
    "api",
    invalid="The access token is invalid, expired or revoked.",
    missing="A bearer access token is required.",
    dpop=True,
)


@dataclass(frozen=True)
class Unit:
    """The request's unit of work: one session, on one pooled connection taken through
    ``Database.session`` (the breaker, the connect retries), in whose transaction the token
    was found live. The handler reads and writes in it, and commits what it writes: a fault
    during that commit is a 503, as the commit may or may not have landed. Whatever is not
    committed when the handler returns is rolled back, and the connection goes back to the
    pool before the response is sent.

    Requests are not re-run on a fault (their body is read once); only taking the connection
    is retried, before anything ran."""

    db: AsyncSession

    async def commit(self) -> None:
        await self.db.commit()

    async def release(self) -> None:
        """End the transaction and give the connection back now, before slow work that
        needs no database: argon2 (as ``TokenServer.verify_password`` does), key files. The
        session takes a connection again if it is used after this."""
        await self.db.commit()


@dataclass(frozen=True)
class Caller(Unit):
    """The person behind a validated user access token, what the token grants, and the
    request's unit of work."""

    user: User
    claims: dict[str, Any]

    @property
    def family_id(self) -> str:
        return str(self.claims["sid"])


@dataclass(frozen=True)
class Admin(Unit):
    """The client acting on the admin API, and the request's unit of work."""

    client: Client

    @property
    def client_id(self) -> str:
        return self.client.client_id


def _scope_refusal(
    bearer: Bearer, scope: str, *, person: bool, first_party: bool = False
) -> tuple[str, str] | None:
    """Why a live token may not call an API guarded by ``scope``, as (audit reason,
    description), or None. ``person``: the API is a person's (the account API), else a
    client's (the admin API). The client must still be registered for the scope, so a client
    stripped of it is refused at once (RFC 6750 §3.1 ``insufficient_scope``)."""
    if person and bearer.user is None:
        return "client_token", "This API needs a token issued to a person, not to a client."
    if not person and bearer.user is not None:
        return "user_token", "This API needs a client_credentials token, not a person's token."
    if scope not in bearer.scopes:
        return "scope_missing", f"The token lacks the {scope} scope."
    if scope not in bearer.client.scope_list:
        return "scope_withdrawn", f"The client is no longer allowed the {scope} scope."
    if first_party and not bearer.client.is_first_party:
        return "not_first_party", "Only a first-party application may do this."
    return None


def _refusal(
    request: Request, bearer: Bearer | None, scope: str, *, person: bool, first_party: bool
) -> Refusal | None:
    """401 for a token that is not live, 403 with ``scope`` in the challenge for one that
    ``_scope_refusal`` finds against; else None. Refusals of a valid token are audited: they
    are either a misconfigured client or someone probing."""
    if bearer is None:
        return API.invalid_token()
    refusal = _scope_refusal(bearer, scope, person=person, first_party=first_party)
    if refusal is None:
        return None
    reason, description = refusal
    audit(
        "api.access_denied",
        client_id=bearer.client.client_id,
        scope=scope,
        reason=reason,
        path=request.url.path,
    )
    return API.insufficient_scope(description, scope)


@asynccontextmanager
async def _authorized(
    request: Request, state: AppState, scope: str, *, person: bool, first_party: bool = False
) -> AsyncIterator[tuple[Bearer, AsyncSession]]:
    """The request's live token, once nothing refuses it, with the session of the unit of
    work it was checked in; the handler runs inside. A token that is not ours, or expired, is
    refused before any connection is taken; a refusal after the check ends its transaction
    first (the database answered; the breaker hears so)."""
    claims = await token_claims(request, state, API)
    async with state.db.session() as db:
        bearer = await live_bearer(db, claims)
        refusal = _refusal(request, bearer, scope, person=person, first_party=first_party)
        if refusal is None:
            assert bearer is not None  # _refusal refuses a token that is not live
            yield bearer, db
            return
    raise refusal


class PersonScope:
    """Dependency: a live token issued to a person, whose ``scope`` claim holds ``scope``, from a
    client whose registration still allows it; with ``first_party``, from a first-party client
    only. Yields the caller with the request's unit of work. The account API must not be
    reachable with a sign-in token (``openid`` alone): a client the person let see who they
    are could otherwise read and change their profile and recovery email."""

    def __init__(self, scope: str, *, first_party: bool = False) -> None:
        self.scope = scope
        self.first_party = first_party

    async def __call__(self, request: Request, state: StateDep) -> AsyncIterator[Caller]:
        async with _authorized(
            request, state, self.scope, person=True, first_party=self.first_party
        ) as (bearer, db):
            assert bearer.user is not None  # _scope_refusal refuses a token without a person
            yield Caller(db, bearer.user, bearer.claims)


class ClientScope:
    """Dependency: a live client_credentials token whose ``scope`` claim holds ``scope``, from
    a client whose registration still allows it. Yields the acting client with the request's
    unit of work."""

    def __init__(self, scope: str) -> None:
        self.scope = scope

    async def __call__(self, request: Request, state: StateDep) -> AsyncIterator[Admin]:
        async with _authorized(request, state, self.scope, person=False) as (bearer, db):
            yield Admin(db, bearer.client)


@contextmanager
def _refusals(invalid_code: str, taken_code: str) -> Iterator[None]:
    """``manage``'s errors as the API's: 404, 409, 400 with the right code; never a 500."""
    try:
        yield
    except manage.NotFoundError as error:
        raise ApiError(404, "not_found", str(error)) from None
    except manage.PublicClientError as error:
        raise ApiError(409, "public_client", str(error)) from None
    except manage.AlreadyExistsError as error:
        raise ApiError(409, taken_code, str(error)) from None
    except IntegrityError:  # a simultaneous create with the same key won the insert
        raise ApiError(409, taken_code, "It already exists.") from None
    except manage.RedirectUriError as error:
        raise ApiError(400, "invalid_redirect_uri", str(error)) from None
    except manage.PasswordPolicyError as error:
        raise ApiError(400, "weak_password", str(error)) from None
    except manage.ManageError as error:
        raise ApiError(400, invalid_code, str(error)) from None


def client_refusals() -> AbstractContextManager[None]:
    return _refusals("invalid_client_metadata", "client_exists")


def user_refusals() -> AbstractContextManager[None]:
    return _refusals("invalid_user", "username_taken")


# ``scope="function"``: the unit of work ends when the handler returns, before the response is
# sent, so no connection (nor SQLite's lock) is held while the client reads it.
CallerDep = Annotated[Caller, Depends(PersonScope(ACCOUNT_SCOPE), scope="function")]
FirstPartyCallerDep = Annotated[
    Caller, Depends(PersonScope(ACCOUNT_SCOPE, first_party=True), scope="function")
]
AdminDep = Annotated[Admin, Depends(ClientScope("admin"), scope="function")]


def no_store(response: Response) -> None:
    """Router dependency: answers with personal data or secrets are never cached (RFC 9111
    §5.2.2.5); the OAuth endpoints do the same (RFC 6749 §5.1)."""
    response.headers["Cache-Control"] = "no-store"
