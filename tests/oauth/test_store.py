"""Round trips of the hot paths, counted: the statements each request sends to the database.

The targets of the request-path issue (server/oauth/store.py): client_credentials sends none
once its client is cached, a refresh one read and one write (on PostgreSQL; SQLite, which has no
writable CTEs, sends the write as three statements in the same local transaction),
introspection one. Transaction control (BEGIN, COMMIT) is not a statement here: SQLAlchemy's
asyncpg driver sends it outside the cursor, and SQLite's BEGIN IMMEDIATE is filtered out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from server.deps import AppState
from tests.conftest import MakeClient, MakeUser, password_grant, refresh_grant

pytestmark = pytest.mark.feature("hot-path-round-trips")

CC = {"grant_type": "client_credentials"}


@contextmanager
def statements(state: AppState) -> Iterator[list[str]]:
    """The SQL statements sent on the app's engine inside the block."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not statement.lstrip().upper().startswith(("BEGIN", "PRAGMA")):
            sent.append(statement)

    engine = state.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


async def test_client_credentials_sends_no_statement_once_its_client_is_cached(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient
) -> None:
    creds = await make_client(grants=["client_credentials"])
    with statements(state) as first:
        assert (await client.post("/oauth2/token", data=CC, headers=creds.basic)).status_code == 200
    assert len(first) == 1, first  # the client, read once
    with statements(state) as sent:
        for _ in range(3):
            response = await client.post("/oauth2/token", data=CC, headers=creds.basic)
            assert response.status_code == 200
    assert sent == []


async def test_a_refresh_is_one_read_and_one_write(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    issued = (await password_grant(client, creds, await make_user())).json()
    with statements(state) as sent:
        response = await refresh_grant(client, creds, issued["refresh_token"])
    assert response.status_code == 200, response.text
    reads = [s for s in sent if s.lstrip().upper().startswith("SELECT")]
    writes = [s for s in sent if s not in reads]
    assert len(reads) == 1, sent
    if state.db.engine.dialect.name == "postgresql":
        assert len(writes) == 1, sent  # touch the family, claim, insert: one statement
    else:
        assert len(writes) == 3, sent


async def test_introspection_is_one_statement(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    rs = await make_client("rs", resource_server=True)
    issued = (await password_grant(client, creds, await make_user())).json()
    for token in (issued["access_token"], issued["refresh_token"]):
        await client.post("/oauth2/introspect", data={"token": token}, headers=rs.basic)
        with statements(state) as sent:
            response = await client.post(
                "/oauth2/introspect", data={"token": token}, headers=rs.basic
            )
        assert response.json()["active"] is True
        assert len(sent) == 1, sent
