"""The admin API's users: create, list and search, show, disable and enable, reset the
password, their sign-ins (list, end all, end one) and their second factors (list, reset)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response

from ... import factors, manage
from ...boundary import NO_NUL, PATH_ID
from ...deps import StateDep
from ...models import User, live_families, now
from ...observability import audit
from ..account import FactorList, NewUser, SessionId, UserSession, factor_list
from ..auth import AdminDep, ApiError, user_refusals
from .pagination import CURSOR_ERRORS, Cursor, Limit, cursor_key, page
from .schemas import PasswordReset, Revoked, UserOut, UserPage, UserSessions

router = APIRouter()

UserId = Annotated[str, Path(min_length=1, max_length=64, pattern=PATH_ID)]
USER_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such user (`not_found`)"},
}


def _user_out(user: User) -> UserOut:
    return UserOut(**manage.user_view(user))


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
    await admin.release()  # no connection held while argon2 runs
    with user_refusals():
        record = await manage.new_user_record(
            state.passwords,
            username=new.username,
            password=new.password,
            email=new.email,
            name=new.name,
        )
        user = await manage.insert_user(admin.db, record, actor=admin.client_id)
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
    after = cursor_key(state.settings.secret_key, "users", cursor)
    rows = await manage.page_users(
        admin.db, after=after, limit=limit + 1, search=search, disabled=disabled
    )
    users, next_cursor = page(state.settings.secret_key, "users", rows, limit, "username_key")
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


@router.get("/users/{user_id}/factors", responses=USER_ERRORS)
async def list_factors(user_id: UserId, admin: AdminDep) -> FactorList:
    """The person's second factors (passkeys, the one-time code app) and how many unused
    recovery codes they have; never a secret or a credential."""
    with user_refusals():
        user = await manage.get_user_by_id(admin.db, user_id)
    listed = await factor_list(admin.db, user.id)
    audit("admin.factors_listed", actor_client_id=admin.client_id, user_id=user_id)
    return listed


@router.delete("/users/{user_id}/factors", status_code=204, responses=USER_ERRORS)
async def reset_factors(user_id: UserId, admin: AdminDep) -> Response:
    """Remove every second factor and recovery code of the person (who lost them all): they
    sign in with the password alone, and enrol again. Every browser session of theirs ends,
    with the sign-ins made through it: those were signed in with factors that no longer
    exist (NIST SP 800-63B §6.1.2.3: a lost authenticator's sessions are not kept)."""
    with user_refusals():
        user = await manage.get_user_by_id(admin.db, user_id)
    removed, ended = await factors.reset_person(admin.db, user.id)
    await admin.commit()
    audit(
        "factor.reset",
        actor_client_id=admin.client_id,
        via="admin_api",
        user_id=user_id,
        factors_removed=removed,
        sessions_ended=ended,
    )
    return Response(status_code=204)
