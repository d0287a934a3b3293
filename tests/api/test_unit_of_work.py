"""One unit of work per JSON API request: the bearer check and the handler's reads and writes
run in one transaction on one pooled connection (counted on the app's engine)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from server.deps import AppState
from tests.conftest import ClientCreds, MakeClient, MakeUser, UserCreds, password_grant

pytestmark = pytest.mark.feature("account-api", "admin-api")


@dataclass
class Callers:
    """A first-party app, the person it signed in (with their token), and an admin token."""

    app: ClientCreds
    user: UserCreds
    person: dict[str, str]
    admin: dict[str, str]


@pytest.fixture
async def callers(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> Callers:
    app = await make_client(
        "app", grants=["password"], scope="profile email api account", first_party=True
    )
    ops = await make_client("ops", admin=True, grants=["client_credentials"], scope="")
    user = await make_user("dora")
    signed_in = await password_grant(client, app, user)
    person = {"Authorization": f"Bearer {signed_in.json()['access_token']}"}
    grant = {"grant_type": "client_credentials", "scope": "admin"}
    issued = await client.post("/oauth2/token", data=grant, headers=ops.basic)
    admin = {"Authorization": f"Bearer {issued.json()['access_token']}"}
    return Callers(app, user, person, admin)


@contextmanager
def counted(state: AppState) -> Iterator[dict[str, int]]:
    """Transactions begun and connections checked out of the pool on the app's engine."""
    counts = {"transactions": 0, "checkouts": 0}
    engine = state.db.engine.sync_engine

    def began(*_: Any) -> None:
        counts["transactions"] += 1

    def checked_out(*_: Any) -> None:
        counts["checkouts"] += 1

    event.listen(engine, "begin", began)
    event.listen(engine.pool, "checkout", checked_out)
    try:
        yield counts
    finally:
        event.remove(engine, "begin", began)
        event.remove(engine.pool, "checkout", checked_out)


async def test_each_request_is_one_transaction_on_one_connection(
    client: httpx.AsyncClient, state: AppState, callers: Callers
) -> None:
    user, person, admin = callers.user, callers.person, callers.admin

    requests: list[tuple[str, str, dict[str, str], dict[str, Any] | None, int]] = [
        ("GET", "/api/v1/me/sessions", person, None, 200),  # account API, a read
        ("GET", "/admin/v1/users", admin, None, 200),  # admin API, a read
        ("PATCH", "/api/v1/me", person, {"name": "Dora"}, 200),  # a write
        ("POST", f"/admin/v1/users/{user.id}/disable", admin, None, 200),  # a write
        ("GET", "/api/v1/me", person, None, 401),  # refused: the sign-in was just ended
    ]
    seen: dict[str, dict[str, int]] = {}
    for method, path, headers, body, status in requests:
        with counted(state) as counts:
            response = await client.request(method, path, headers=headers, json=body)
        assert response.status_code == status, (path, response.text)
        seen[f"{method} {path}"] = counts
    one = {"transactions": 1, "checkouts": 1}
    assert seen == {request: one for request in seen}

    # The writes were committed, not just counted.
    listed = await client.get("/admin/v1/users", headers=admin)
    assert [(u["name"], u["disabled"]) for u in listed.json()["items"]] == [("Dora", True)]

    # A token that is not one of ours is refused before any connection is taken.
    with counted(state) as counts:
        forged = await client.get("/admin/v1/users", headers={"Authorization": "Bearer x.y.z"})
    assert forged.status_code == 401
    assert counts == {"transactions": 0, "checkouts": 0}


@pytest.mark.feature("nonblocking-argon2")
async def test_argon2_runs_holding_no_connection(
    client: httpx.AsyncClient, state: AppState, callers: Callers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The password change (verify, then hash), the admin's reset (hash) and creating a person
    (the admin API, sign-up: hash) end or have not begun their transaction when argon2 runs,
    as the token endpoint does: no connection is checked out (nor, on SQLite, the write lock
    held) while it does."""
    app, user, person, admin = callers.app, callers.user, callers.person, callers.admin

    pool = state.db.engine.sync_engine.pool
    held: list[tuple[str, int]] = []
    passwords = state.passwords
    hash_async, verify_async = passwords.hash_async, passwords.verify_async

    async def hashing(password: str) -> str:
        held.append(("hash", pool.checkedout()))
        return await hash_async(password)

    async def verifying(password_hash: str | None, password: str) -> Any:
        held.append(("verify", pool.checkedout()))
        return await verify_async(password_hash, password)

    monkeypatch.setattr(passwords, "hash_async", hashing)
    monkeypatch.setattr(passwords, "verify_async", verifying)

    change = {"current_password": user.password, "new_password": "a brand new passphrase"}
    changed = await client.post("/api/v1/me/password", json=change, headers=person)
    assert changed.status_code == 204, changed.text
    assert held == [("verify", 0), ("hash", 0)]

    held.clear()
    reset = {"password": "the operator's choice"}
    done = await client.post(f"/admin/v1/users/{user.id}/password", json=reset, headers=admin)
    assert done.status_code == 204, done.text
    assert held == [("hash", 0)]

    held.clear()
    new = {"username": "erin", "password": "a long enough passphrase"}
    created = await client.post("/admin/v1/users", json=new, headers=admin)
    assert created.status_code == 201, created.text
    registered = await client.post("/api/v1/users", json={**new, "username": "fay"})
    assert registered.status_code == 201, registered.text
    assert held == [("hash", 0), ("hash", 0)]  # creating a person: the admin API, sign-up

    # And the last password is the one that works.
    monkeypatch.undo()
    user.password = reset["password"]
    assert (await password_grant(client, app, user)).status_code == 200
