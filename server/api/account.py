"""The account API for first-party apps: the signed-in person and their sign-ins (/api/v1).

Each sign-in (a refresh-token family) is listed and can be ended, as on the /account page;
so can the second factors (passkeys, the one-time code app), as on /account/security.
Every endpoint but registration needs a person's token with the ``account`` scope; the password
change and removing a factor also a first-party client (``auth.PersonScope``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from .. import factors, manage, mfa
from ..bearer import BEARER, DPOP, challenge
from ..boundary import NO_NUL, PATH_ID
from ..deps import StateDep
from ..models import RefreshFamily, User, live_families, now
from ..observability import audit
from ..passwords import normalize_username
from .auth import (
    API,
    ApiError,
    Body,
    Caller,
    CallerDep,
    FirstPartyCallerDep,
    no_store,
    user_refusals,
)

router = APIRouter(prefix="/api/v1", tags=["account"], dependencies=[Depends(no_store)])


class Me(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    username: str
    email: str | None
    name: str | None


class NewUser(Body):
    #: Letters, digits and ``. @ + - _`` (400 ``invalid_user``): not a schema pattern, because
    #: ``\w`` means ASCII letters to schema tools and every script's letters here.
    username: str = Field(min_length=1, max_length=150, pattern=NO_NUL)
    password: str = Field(min_length=1, max_length=4096, pattern=NO_NUL)
    email: str | None = Field(default=None, max_length=254, pattern=manage.EMAIL_RE.pattern)
    name: str | None = Field(default=None, max_length=200, pattern=NO_NUL)


class ProfileChange(Body):
    """Only the fields sent change; ``null`` clears one."""

    email: str | None = Field(default=None, max_length=254, pattern=manage.EMAIL_RE.pattern)
    name: str | None = Field(default=None, max_length=200, pattern=NO_NUL)


class PasswordChange(Body):
    current_password: str = Field(min_length=1, max_length=4096, pattern=NO_NUL)
    new_password: str = Field(min_length=1, max_length=4096, pattern=NO_NUL)


class FactorRemoval(Body):
    """Only needed to remove the person's last factor (the account then rests on the
    password alone)."""

    current_password: str | None = Field(
        default=None, min_length=1, max_length=4096, pattern=NO_NUL
    )


class FactorOut(BaseModel):
    """A second factor: the one-time code app (id ``totp``) or a passkey."""

    model_config = ConfigDict(extra="forbid")

    #: ``totp`` for the one-time code app (one per person), else the passkey's id.
    id: str
    kind: Literal["totp", "passkey"]
    name: str
    created_at: int
    #: Passkeys: the last sign-in with it; ``null`` for the app and for an unused passkey.
    last_used_at: int | None
    #: Passkeys only (WebAuthn §6.1.3): may be synced to other devices (backup eligible)…
    synced: bool | None
    #: …and is (backed up); ``null`` for the app.
    backed_up: bool | None

    @classmethod
    def of(cls, factor: factors.Factor) -> Self:
        return cls(
            id=factor.id,
            kind="totp" if factor.kind == "totp" else "passkey",
            name=factor.name,
            created_at=factor.created_at,
            last_used_at=factor.last_used_at,
            synced=factor.synced,
            backed_up=factor.backed_up,
        )


class FactorList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    factors: list[FactorOut]
    #: Unused recovery codes (they come with the one-time code app and go with it).
    recovery_codes: int


async def factor_list(db: AsyncSession, user_id: str) -> FactorList:
    """The person's factors, as the account and admin APIs list them."""
    listed = await factors.listed(db, user_id)
    counts = await factors.load(db, user_id)
    return FactorList(
        factors=[FactorOut.of(f) for f in listed], recovery_codes=counts.recovery_codes
    )


class UserSession(BaseModel):
    """One sign-in: a refresh-token family, with the client it was made through."""

    model_config = ConfigDict(extra="forbid")

    id: str
    client_id: str
    client_name: str
    scope: str
    created_at: int
    last_used_at: int
    expires_at: int

    @classmethod
    def of(cls, family: RefreshFamily, client_name: str, **extra: Any) -> Self:
        return cls(
            id=family.id,
            client_id=family.client_id,
            client_name=client_name,
            scope=family.scope,
            created_at=family.created_at,
            last_used_at=family.last_used_at,
            expires_at=family.expires_at,
            **extra,
        )


class Session(UserSession):
    #: The sign-in that issued the token making this request.
    current: bool


class Sessions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sessions: list[Session]


SessionId = Annotated[
    str, Path(min_length=1, max_length=64, pattern=PATH_ID, description="A sign-in's id")
]

FactorId = Annotated[
    str,
    Path(
        min_length=1,
        max_length=64,
        pattern=PATH_ID,
        description="A factor's id: `totp` (the one-time code app) or a passkey's id",
    ),
]

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No token, or an invalid, expired or revoked one (`invalid_token`)"},
    403: {
        "description": "`insufficient_scope`: a token without a person behind it, or without"
        ' the `account` scope (`scope="account"` in the challenge), or from a client no longer'
        " registered with it"
    },
}
#: The password change and removing a factor: also refused to a client that is not first-party.
PASSWORD_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    401: {
        "description": "No token, or an invalid, expired or revoked one (`invalid_token`); or"
        " `insufficient_user_authentication` (RFC 9470 §3): the token's sign-in used no second"
        " factor, and the person has one"
    },
    403: {
        "description": "`insufficient_scope`: as for the other endpoints (no person, no"
        " `account` scope), or a client that is not first-party"
    },
}


def _me(user: User) -> Me:
    return Me(id=user.id, username=user.username, email=user.email, name=user.name)


@router.post(
    "/users",
    status_code=201,
    responses={
        400: {"description": "`invalid_user` or `weak_password`"},
        403: {"description": "Registration is switched off (`registration_disabled`)"},
        409: {"description": "The username is taken (`username_taken`)"},
        429: {"description": "Too many sign-ups from this address (`rate_limited`)"},
    },
)
async def register(new: NewUser, request: Request, state: StateDep) -> Me:
    """Self-registration, with the sign-up page's password policy and its switch."""
    if not state.settings.registration_enabled:
        raise ApiError(403, "registration_disabled", "Registration is switched off.")
    limiter = state.limiter
    verdict = await limiter.hit([(limiter.login_ip, "register-ip", limiter.client_ip(request))])
    if not verdict.allowed:
        retry = str(verdict.retry_after)
        raise ApiError(
            429, "rate_limited", f"Too many requests; retry in {retry} s.", {"Retry-After": retry}
        )
    with user_refusals():
        # Hashed before the connection is taken: none is held while argon2 runs.
        record = await manage.new_user_record(
            state.passwords,
            username=new.username,
            password=new.password,
            email=new.email,
            name=new.name,
        )
        async with state.db.session() as db:
            user = await manage.insert_user(db, record)
            await db.commit()
    return _me(user)


@router.get("/me", responses=ERRORS)
async def me(caller: CallerDep) -> Me:
    return _me(caller.user)


@router.patch("/me", responses=ERRORS)
async def change_profile(change: ProfileChange, caller: CallerDep) -> Me:
    fields = change.model_dump(exclude_unset=True)
    user = caller.user  # loaded with the token, in this unit of work
    for field, value in fields.items():
        setattr(user, field, value or None)
    await caller.commit()
    audit("user.profile_changed", user_id=user.id, fields=sorted(fields))
    return _me(user)


@router.post(
    "/me/password",
    status_code=204,
    responses={
        **PASSWORD_ERRORS,
        400: {"description": "`wrong_password` (the current one) or `weak_password`"},
    },
)
async def change_password(
    change: PasswordChange, request: Request, caller: FirstPartyCallerDep, state: StateDep
) -> Response:
    """Needs the current password; ends every other sign-in of the person (SPEC: a password
    change kills the families), keeping the one making the request. A person with a second
    factor changes it only through a sign-in that used one (``_check_sign_in_level``): else
    whoever knows the password alone (the password grant lets a passkey-only person through
    under ``optional``) could change it and sign everyone else out."""
    user = caller.user  # loaded with the token, in this unit of work
    await _check_sign_in_level(caller)
    # Two transactions, not one: argon2 (verifying the current password here, hashing the new
    # one in manage.reset_password before its first query) runs between them, holding no
    # connection and no lock.
    await caller.release()
    limiter = state.limiter
    account = normalize_username(user.username)
    ip = limiter.client_ip(request)
    if await limiter.throttled(account, ip):
        raise ApiError(400, "wrong_password", "The current password is not correct.")
    result = await state.passwords.verify_async(user.password_hash, change.current_password)
    if not result.ok:
        await limiter.failed(account, ip)
        raise ApiError(400, "wrong_password", "The current password is not correct.")
    with user_refusals():
        await manage.reset_password(
            caller.db, state.passwords, user, change.new_password, keep_family=caller.family_id
        )
    await caller.commit()
    return Response(status_code=204)


@router.get("/me/sessions", responses=ERRORS)
async def my_sessions(caller: CallerDep) -> Sessions:
    families = list(await caller.db.execute(live_families(caller.user.id, now())))
    return Sessions(
        sessions=[
            Session.of(family, name, current=family.id == caller.family_id)
            for family, name in families
        ]
    )


@router.delete(
    "/me/sessions/{session_id}",
    status_code=204,
    responses={**ERRORS, 404: {"description": "No such live sign-in of yours (`not_found`)"}},
)
async def end_session(session_id: SessionId, caller: CallerDep) -> Response:
    """End one sign-in: its refresh token and every access token it issued stop working."""
    # Only the person's own sign-ins.
    ended = await manage.end_sign_in(caller.db, caller.user.id, session_id, reason="signed_out")
    await caller.commit()
    if not ended:
        raise ApiError(404, "not_found", "No such live sign-in of yours.")
    audit("session.revoked", family_id=session_id, user_id=caller.user.id, via="api")
    return Response(status_code=204)


@router.get("/me/factors", responses=ERRORS)
async def my_factors(caller: CallerDep) -> FactorList:
    """The person's second factors (passkeys, the one-time code app) and how many unused
    recovery codes they have."""
    return await factor_list(caller.db, caller.user.id)


async def _removable(db: AsyncSession, user_id: str, factor_id: str) -> bool:
    """Lock the person's factors (``factors.lock``, until the transaction ends) and say
    whether ``factor_id`` is their last factor; 404 when they have no such factor."""
    await factors.lock(db, user_id)
    listed = await factors.listed(db, user_id)
    if not any(f.id == factor_id for f in listed):
        raise ApiError(404, "not_found", "No such sign-in method of yours.")
    return len(listed) == 1


#: RFC 9470 §3: the levels whose sign-ins may change factors (any multi-factor one).
STEP_UP_ACR_VALUES = " ".join(mfa.ACR_VALUES[1:])


async def _check_sign_in_level(caller: Caller) -> None:
    """A person who has a factor changes their factors only through a sign-in that used one
    (``mfa.may_change_factors``: else a password alone, through the password grant, would do
    it). Refused as RFC 9470 §3 says: 401 ``insufficient_user_authentication`` with the
    ``acr_values`` a new sign-in must reach."""
    amr = await caller.db.scalar(
        select(RefreshFamily.amr).where(RefreshFamily.id == caller.family_id)
    )
    if not mfa.may_change_factors(amr or "", await factors.load(caller.db, caller.user.id)):
        detail = "Sign in with a second factor to change your sign-in methods."
        error = "insufficient_user_authentication"
        # The token's own scheme, as every refusal of the API realm (RFC 9449 §7.1: a
        # DPoP-bound token is challenged with DPoP and its algs).
        scheme = DPOP if "cnf" in caller.claims else BEARER
        raise ApiError(
            401,
            error,
            detail,
            challenge(
                API.name,
                error=error,
                description=detail,
                scheme=scheme,
                acr_values=STEP_UP_ACR_VALUES,
            ),
        )


@router.post(
    "/me/factors/{factor_id}/remove",
    status_code=204,
    responses={
        **PASSWORD_ERRORS,
        400: {
            "description": "`wrong_password`: the last factor needs the current password,"
            " and it was missing, wrong, or too many were wrong lately"
        },
        404: {"description": "No such factor of yours (`not_found`)"},
    },
)
async def remove_factor(
    factor_id: FactorId,
    request: Request,
    caller: FirstPartyCallerDep,
    state: StateDep,
    removal: FactorRemoval | None = None,
) -> Response:
    """Remove one second factor (``totp``: the app with its recovery codes). Removing the
    last one needs ``current_password``: the account then rests on the password alone, and a
    token alone must not be enough to bring it there.

    A first-party client only, as for the password change: removing a factor weakens the
    account, which no third-party app the person granted ``account`` should be able to do.
    POST to ``…/remove`` rather than DELETE with a body: content in a DELETE has no defined
    meaning and some intermediaries refuse or drop it (RFC 9110 §9.3.5).

    Every browser session of the person ends, with the sign-ins made through it (whoever
    removed the factor might be someone else, signed in there: NIST SP 800-63B §6.1.2.1),
    but the one the caller's sign-in was made through, as the password change keeps it."""
    user = caller.user  # loaded with the token, in this unit of work
    user_id, username, password_hash = user.id, user.username, user.password_hash
    await _check_sign_in_level(caller)
    if await _removable(caller.db, user_id, factor_id):
        # Two transactions, as for the password change: argon2 runs between them, holding no
        # connection and no lock; the second one checks again under the lock.
        await caller.release()
        password = removal.current_password if removal is not None else None
        if password is None:
            audit("factor.remove_refused", user_id=user_id, factor=factor_id, via="api")
            raise ApiError(
                400, "wrong_password", "Removing your last sign-in method needs your password."
            )
        limiter = state.limiter
        account = normalize_username(username)
        ip = limiter.client_ip(request)
        if await limiter.throttled(account, ip):
            audit("factor.remove_refused", user_id=user_id, factor=factor_id, via="api")
            raise ApiError(400, "wrong_password", "The current password is not correct.")
        result = await state.passwords.verify_async(password_hash, password)
        if not result.ok:
            await limiter.failed(account, ip)
            audit("factor.remove_refused", user_id=user_id, factor=factor_id, via="api")
            raise ApiError(400, "wrong_password", "The current password is not correct.")
        await _removable(caller.db, user_id, factor_id)  # gone meanwhile: 404
    # Otherwise a password sent is not checked: this is no oracle for guessing it.
    db = caller.db
    kind = await factors.remove(db, user_id, factor_id)
    keep = await db.scalar(
        select(RefreshFamily.browser_session_id).where(
            RefreshFamily.id == caller.family_id, RefreshFamily.user_id == user_id
        )
    )
    ended = await factors.end_other_sessions(db, user_id, keep)
    await caller.commit()
    audit(
        "factor.removed",
        user_id=user_id,
        kind=kind,
        factor=factor_id,
        sessions_ended=ended,
        via="api",
    )
    return Response(status_code=204)
