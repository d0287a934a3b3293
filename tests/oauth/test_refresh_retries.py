"""Refresh retries (SPEC.md, "Second horizon: refresh retries"): within a client's retry window
the token it just rotated gets the same successor again, and nothing else is forgiven."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from server import metrics, models
from server.config import Settings
from server.deps import AppState
from server.models import RefreshFamily, RefreshToken
from tests.conftest import (
    ClientCreds,
    Events,
    MakeClient,
    MakeUser,
    make_settings,
    password_grant,
    refresh_grant,
)

pytestmark = pytest.mark.feature("refresh-retries")

WINDOW = 30
ORDERS = "https://orders.example.com"


@pytest.fixture
def settings(database_url: str, keys_dir: Path) -> Settings:
    return make_settings(database_url, keys_dir, resources=ORDERS)


@pytest.fixture
def with_setting(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """``AUTH_REFRESH_RETRY_WINDOW`` = WINDOW for this test (the server reads its settings)."""
    server = app.state.oauth
    monkeypatch.setattr(
        server, "settings", server.settings.model_copy(update={"refresh_retry_window": WINDOW})
    )


async def sign_in(
    http: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    *,
    window: int | None = WINDOW,
    **extra: Any,
) -> tuple[ClientCreds, dict[str, Any]]:
    creds = await make_client(refresh_retry_window=window)
    response = await password_grant(http, creds, await make_user(), **extra)
    assert response.status_code == 200, response.text
    return creds, response.json()


async def family_state(state: AppState) -> tuple[int, bool]:
    """(refresh tokens stored, whether the one family is revoked)."""
    async with state.db.sessions() as db:
        count = await db.scalar(select(func.count()).select_from(RefreshToken))
        family = (await db.scalars(select(RefreshFamily))).one()
    return int(count or 0), family.revoked_at is not None


async def test_a_retry_within_the_window_gets_the_same_successor_and_the_family_lives(
    client: httpx.AsyncClient,
    state: AppState,
    make_client: MakeClient,
    make_user: MakeUser,
    events: Events,
) -> None:
    creds, first = await sign_in(client, make_client, make_user)
    served = metrics.REGISTRY.get_sample_value("refresh_retries_served_total") or 0
    rotated = (await refresh_grant(client, creds, first["refresh_token"])).json()
    retried = await refresh_grant(client, creds, first["refresh_token"])
    assert retried.status_code == 200, retried.text
    assert retried.json()["refresh_token"] == rotated["refresh_token"]
    assert retried.json()["access_token"] != rotated["access_token"]  # a fresh one
    assert await family_state(state) == (2, False)  # one rotation, never a branch
    assert [name for name, _ in events].count("refresh.retry_served") == 1
    assert "refresh.reuse_detected" not in [name for name, _ in events]
    assert metrics.REGISTRY.get_sample_value("refresh_retries_served_total") == served + 1
    # The successor is the live token: it rotates on.
    onward = await refresh_grant(client, creds, rotated["refresh_token"])
    assert onward.status_code == 200
    assert await family_state(state) == (3, False)


async def test_twenty_simultaneous_presentations_get_one_successor(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds, first = await sign_in(client, make_client, make_user)
    answers = await asyncio.gather(
        *(refresh_grant(client, creds, first["refresh_token"]) for _ in range(20))
    )
    assert {a.status_code for a in answers} == {200}, [a.text for a in answers]
    assert len({a.json()["refresh_token"] for a in answers}) == 1
    assert await family_state(state) == (2, False)  # exactly one rotation row


@pytest.mark.usefixtures("with_setting")
async def test_a_clients_own_zero_is_strict_whatever_the_setting(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    """Window 0 (the default setting, tested by every rotation test, or a client's own 0 over
    a wider setting): every reuse revokes, as before."""
    creds, first = await sign_in(client, make_client, make_user, window=0)
    await refresh_grant(client, creds, first["refresh_token"])
    again = await refresh_grant(client, creds, first["refresh_token"])
    assert again.status_code == 400
    assert await family_state(state) == (2, True)


@pytest.mark.usefixtures("with_setting")
async def test_the_setting_applies_to_a_client_without_its_own_window(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds, first = await sign_in(client, make_client, make_user, window=None)
    rotated = (await refresh_grant(client, creds, first["refresh_token"])).json()
    retried = await refresh_grant(client, creds, first["refresh_token"])
    assert retried.json()["refresh_token"] == rotated["refresh_token"]


async def test_a_token_two_rotations_back_is_reuse(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    """Only the immediate predecessor is shielded; this is also a retry after the successor
    has itself been used."""
    creds, first = await sign_in(client, make_client, make_user)
    second = (await refresh_grant(client, creds, first["refresh_token"])).json()
    third = (await refresh_grant(client, creds, second["refresh_token"])).json()
    old = await refresh_grant(client, creds, first["refresh_token"])
    assert old.status_code == 400 and old.json()["error"] == "invalid_grant"
    assert (await family_state(state))[1] is True
    assert (await refresh_grant(client, creds, third["refresh_token"])).status_code == 400


async def test_a_late_retry_is_reuse(
    client: httpx.AsyncClient,
    state: AppState,
    make_client: MakeClient,
    make_user: MakeUser,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    creds, first = await sign_in(client, make_client, make_user)
    await refresh_grant(client, creds, first["refresh_token"])
    later = models.now() + WINDOW + 1
    monkeypatch.setattr(models, "clock", lambda: later)
    late = await refresh_grant(client, creds, first["refresh_token"])
    assert late.status_code == 400
    assert (await family_state(state))[1] is True


async def test_a_retry_at_the_edge_of_the_window_is_served(
    client: httpx.AsyncClient,
    state: AppState,
    make_client: MakeClient,
    make_user: MakeUser,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    creds, first = await sign_in(client, make_client, make_user)
    rotated = (await refresh_grant(client, creds, first["refresh_token"])).json()
    edge = models.now() + WINDOW
    monkeypatch.setattr(models, "clock", lambda: edge)
    retried = await refresh_grant(client, creds, first["refresh_token"])
    assert retried.json().get("refresh_token") == rotated["refresh_token"], retried.text


@pytest.mark.parametrize(
    ("first_extra", "retry_extra"),
    [
        ({"scope": "profile"}, {}),  # wider than the first request
        ({}, {"scope": "profile"}),  # another scope
        ({"resource": ORDERS}, {}),  # other resources: the whole grant this time
    ],
)
async def test_a_retry_asking_for_something_else_is_reuse(
    client: httpx.AsyncClient,
    state: AppState,
    make_client: MakeClient,
    make_user: MakeUser,
    first_extra: dict[str, str],
    retry_extra: dict[str, str],
) -> None:
    granted = [state.settings.audience, ORDERS]  # two resource parameters
    creds, first = await sign_in(
        client, make_client, make_user, scope="profile api", resource=granted
    )
    rotated = await refresh_grant(client, creds, first["refresh_token"], **first_extra)
    assert rotated.status_code == 200, rotated.text
    retried = await refresh_grant(client, creds, first["refresh_token"], **retry_extra)
    assert retried.status_code == 400
    assert (await family_state(state))[1] is True


async def test_another_client_presenting_it_is_refused_and_the_owner_keeps_the_sign_in(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds, first = await sign_in(client, make_client, make_user)
    rotated = (await refresh_grant(client, creds, first["refresh_token"])).json()
    other = await make_client("other", refresh_retry_window=WINDOW)
    stolen = await refresh_grant(client, other, first["refresh_token"])
    assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_grant"
    assert await family_state(state) == (2, False)
    assert (await refresh_grant(client, creds, rotated["refresh_token"])).status_code == 200


async def test_a_rotated_token_asking_beyond_the_grant_is_reuse_too(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    """Refused for its scope (invalid_scope) and still reuse: only a retry of the rotation is
    forgiven, so a rotated token cannot be probed with requests that fail for other reasons."""
    creds, first = await sign_in(client, make_client, make_user, scope="profile")
    await refresh_grant(client, creds, first["refresh_token"])
    beyond = await refresh_grant(client, creds, first["refresh_token"], scope="profile email")
    assert beyond.status_code == 400 and beyond.json()["error"] == "invalid_scope"
    assert (await family_state(state))[1] is True


async def test_a_retry_naming_the_same_scope_and_resources_in_another_order_is_a_retry(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    """Scope is a set (RFC 6749 §3.3) and so are resources: order is not a different request."""
    granted = [state.settings.audience, ORDERS]
    creds, first = await sign_in(
        client, make_client, make_user, scope="profile api", resource=granted
    )
    rotated = await refresh_grant(
        client, creds, first["refresh_token"], scope="profile api", resource=granted
    )
    assert rotated.status_code == 200, rotated.text
    retried = await refresh_grant(
        client, creds, first["refresh_token"], scope="api profile", resource=granted[::-1]
    )
    assert retried.status_code == 200, retried.text
    assert retried.json()["refresh_token"] == rotated.json()["refresh_token"]
    assert await family_state(state) == (2, False)
