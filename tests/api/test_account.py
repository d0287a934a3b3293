"""The account API (/api/v1/me…): success, every way to be refused, and the schema."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from server import manage, models
from server.bearer import DPOP_ALGS_PARAM
from server.config import Env
from server.deps import AppState
from server.main import create_app
from server.tokens import decode_access_token
from tests.conftest import (
    ClientCreds,
    Events,
    MakeClient,
    MakeUser,
    UserCreds,
    make_settings,
    password_grant,
)

pytestmark = pytest.mark.feature("account-api")


async def sign_in(client: httpx.AsyncClient, creds: ClientCreds, user: UserCreds) -> dict[str, str]:
    response = await password_grant(client, creds, user)
    assert response.status_code == 200, response.text
    body: dict[str, str] = response.json()
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def app_client(make_client: MakeClient) -> ClientCreds:
    # A first-party app allowed the account scope: what the account API is for.
    return await make_client(
        "app",
        grants=["password", "refresh_token", "client_credentials"],
        scope="profile email api account",
        first_party=True,
    )


async def test_me_is_the_signed_in_person(
    client: httpx.AsyncClient, app_client: ClientCreds, make_user: MakeUser
) -> None:
    user = await make_user("dora", email="dora@example.com", name="Dora")
    tokens = await sign_in(client, app_client, user)
    response = await client.get("/api/v1/me", headers=bearer(tokens["access_token"]))
    assert response.status_code == 200
    assert response.json() == {
        "id": user.id,
        "username": "dora",
        "email": "dora@example.com",
        "name": "Dora",
    }


async def test_sessions_are_listed_and_one_can_be_ended(
    client: httpx.AsyncClient, app_client: ClientCreds, make_user: MakeUser
) -> None:
    user = await make_user()
    first = await sign_in(client, app_client, user)
    second = await sign_in(client, app_client, user)
    listed = await client.get("/api/v1/me/sessions", headers=bearer(second["access_token"]))
    assert listed.status_code == 200
    sessions = listed.json()["sessions"]
    assert len(sessions) == 2
    assert [s["current"] for s in sessions].count(True) == 1
    assert {s["client_id"] for s in sessions} == {"app"}
    first_id = next(s["id"] for s in sessions if not s["current"])

    ended = await client.delete(
        f"/api/v1/me/sessions/{first_id}", headers=bearer(second["access_token"])
    )
    assert ended.status_code == 204
    # That sign-in is over: its refresh token and its access token stop working.
    refused = await client.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]},
        headers=app_client.basic,
    )
    assert refused.status_code == 400
    gone = await client.get("/api/v1/me", headers=bearer(first["access_token"]))
    assert gone.status_code == 401
    again = await client.delete(
        f"/api/v1/me/sessions/{first_id}", headers=bearer(second["access_token"])
    )
    assert again.status_code == 404
    assert again.json() == {"detail": "No such live sign-in of yours.", "error_code": "not_found"}


async def test_another_persons_session_cannot_be_ended(
    client: httpx.AsyncClient, app_client: ClientCreds, make_user: MakeUser
) -> None:
    alice = await sign_in(client, app_client, await make_user("alice"))
    bob = await sign_in(client, app_client, await make_user("bob"))
    bobs = (await client.get("/api/v1/me/sessions", headers=bearer(bob["access_token"]))).json()
    target = bobs["sessions"][0]["id"]
    response = await client.delete(
        f"/api/v1/me/sessions/{target}", headers=bearer(alice["access_token"])
    )
    assert response.status_code == 404
    still = await client.get("/api/v1/me", headers=bearer(bob["access_token"]))
    assert still.status_code == 200


@pytest.mark.parametrize("path", ["/api/v1/me", "/api/v1/me/sessions"])
async def test_no_token_is_a_401_with_a_bare_bearer_challenge(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path)
    assert response.status_code == 401
    # RFC 6750 §3.1 and RFC 9449 §7.1: no error code, one challenge per scheme accepted.
    assert response.headers.get_list("www-authenticate") == [
        'Bearer realm="api"',
        f'DPoP realm="api", algs="{DPOP_ALGS_PARAM}"',
    ]
    assert response.json()["error_code"] == "missing_token"
    basic = await client.get(path, headers={"Authorization": "Basic YTpi"})
    assert basic.status_code == 401


@pytest.mark.parametrize(
    "token",
    ["garbage", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "a.b.c", "x" * 9000],
    ids=["garbage", "alg-none", "three-junk-segments", "oversized"],
)
async def test_a_bad_token_is_a_401_invalid_token(client: httpx.AsyncClient, token: str) -> None:
    response = await client.get("/api/v1/me", headers=bearer(token))
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert response.json()["error_code"] == "invalid_token"


async def test_an_expired_token_is_refused(
    client: httpx.AsyncClient,
    app_client: ClientCreds,
    make_user: MakeUser,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The server's clock (models.clock) is frozen, then moved: no waiting for exp.
    issued_at = int(time.time())
    monkeypatch.setattr(models, "clock", lambda: issued_at)
    issued = await sign_in(client, app_client, await make_user("eve"))
    token, lifetime = issued["access_token"], int(issued["expires_in"])
    monkeypatch.setattr(models, "clock", lambda: issued_at + lifetime - 1)
    last_second = await client.get("/api/v1/me", headers=bearer(token))
    assert last_second.status_code == 200, last_second.text
    monkeypatch.setattr(models, "clock", lambda: issued_at + lifetime)  # now == exp: expired
    expired = await client.get("/api/v1/me", headers=bearer(token))
    assert expired.status_code == 401
    assert expired.json()["error_code"] == "invalid_token"


async def test_a_client_credentials_token_has_no_person_behind_it(
    client: httpx.AsyncClient, app_client: ClientCreds
) -> None:
    issued = await client.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, headers=app_client.basic
    )
    response = await client.get("/api/v1/me", headers=bearer(issued.json()["access_token"]))
    assert response.status_code == 403
    assert 'error="insufficient_scope"' in response.headers["www-authenticate"]
    assert response.json()["error_code"] == "insufficient_scope"


async def test_a_disabled_person_is_refused_at_once(
    client: httpx.AsyncClient, app_client: ClientCreds, make_user: MakeUser, state: AppState
) -> None:
    user = await make_user("frank")
    tokens = await sign_in(client, app_client, user)
    async with state.db.sessions() as db:
        await manage.disable_user(db, "frank")
        await db.commit()
    response = await client.get("/api/v1/me", headers=bearer(tokens["access_token"]))
    assert response.status_code == 401
    # The token itself is still well signed and unexpired: it is the database that refuses.
    claims = decode_access_token(
        state.keys.keyset(),
        tokens["access_token"],
        issuer=state.settings.issuer,
        audience=state.settings.audience,
        now=int(time.time()),
    )
    assert claims is not None


async def test_the_schema_lists_the_json_apis_only(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert sorted(schema["paths"]) == [
        "/admin/v1/clients",
        "/admin/v1/clients/{client_id}",
        "/admin/v1/clients/{client_id}/secret",
        "/admin/v1/keys",
        "/admin/v1/keys/prune",
        "/admin/v1/keys/rotate",
        "/admin/v1/users",
        "/admin/v1/users/{user_id}",
        "/admin/v1/users/{user_id}/disable",
        "/admin/v1/users/{user_id}/enable",
        "/admin/v1/users/{user_id}/factors",
        "/admin/v1/users/{user_id}/password",
        "/admin/v1/users/{user_id}/sessions",
        "/admin/v1/users/{user_id}/sessions/{session_id}",
        "/api/v1/me",
        "/api/v1/me/factors",
        "/api/v1/me/factors/{factor_id}/remove",
        "/api/v1/me/password",
        "/api/v1/me/sessions",
        "/api/v1/me/sessions/{session_id}",
        "/api/v1/users",
    ]
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "swagger-ui" in docs.text
    assert "frame-ancestors 'none'" in docs.headers["content-security-policy"]


async def test_production_serves_no_schema_unless_asked(database_url: str, keys_dir: Path) -> None:
    base = make_settings(database_url, keys_dir)
    production = base.model_copy(update={"env": Env.production})
    assert production.docs_enabled is False
    assert production.model_copy(update={"api_docs": True}).docs_enabled is True
    app = create_app(make_settings(database_url, keys_dir, api_docs=False))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            assert (await http.get("/openapi.json")).status_code == 404
            assert (await http.get("/docs")).status_code == 404
            assert (await http.get("/api/v1/me")).status_code == 401  # the API itself stays


# -- registration, profile, password ------------------------------------------------------------


async def test_registration_creates_a_person_who_can_sign_in(
    client: httpx.AsyncClient, app_client: ClientCreds
) -> None:
    created = await client.post(
        "/api/v1/users",
        json={"username": "gina", "password": "correct horse battery", "email": "g@example.com"},
    )
    assert created.status_code == 201, created.text
    assert created.json()["username"] == "gina"
    assert created.json()["email"] == "g@example.com"
    user = UserCreds(created.json()["id"], "gina", "correct horse battery")
    assert (await password_grant(client, app_client, user)).status_code == 200


@pytest.mark.one_backend
@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"username": "ALICE", "password": "correct horse battery"}, 409, "username_taken"),
        ({"username": "newbie", "password": "password"}, 400, "weak_password"),
        ({"username": "newbie", "password": "newbie-newbie"[:6]}, 400, "weak_password"),
        ({"username": "no spaces", "password": "correct horse battery"}, 400, "invalid_user"),
        (
            {"username": "newbie", "password": "correct horse battery", "email": "x"},
            422,
            "validation_error",
        ),
        (
            {"username": "newbie", "password": "correct horse battery", "admin": True},
            422,
            "validation_error",
        ),
        ({"username": "newbie"}, 422, "validation_error"),
        ({"username": "", "password": "correct horse battery"}, 422, "validation_error"),
        ({"username": "n" * 151, "password": "correct horse battery"}, 422, "validation_error"),
    ],
    ids=[
        "duplicate-case-variant",
        "common-password",
        "short-password",
        "bad-username",
        "bad-email",
        "unknown-field",
        "missing-password",
        "empty-username",
        "long-username",
    ],
)
async def test_registration_refuses_bad_input_with_its_code(
    client: httpx.AsyncClient, make_user: MakeUser, body: dict[str, object], status: int, code: str
) -> None:
    await make_user("alice")
    response = await client.post("/api/v1/users", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error_code"] == code
    assert "correct horse battery" not in response.text  # never echoes a password


async def test_registration_follows_the_switch_and_the_limit(
    database_url: str, keys_dir: Path
) -> None:
    closed = create_app(make_settings(database_url, keys_dir, registration_enabled=False))
    body = {"username": "hal", "password": "correct horse battery"}
    async with closed.router.lifespan_context(closed):
        transport = httpx.ASGITransport(app=closed)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            refused = await http.post("/api/v1/users", json=body)
            assert refused.status_code == 403
            assert refused.json()["error_code"] == "registration_disabled"
    limited = create_app(make_settings(database_url, keys_dir, rate_limit_login_ip="2/minute"))
    async with limited.router.lifespan_context(limited):
        transport = httpx.ASGITransport(app=limited)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            statuses = [
                (await http.post("/api/v1/users", json={**body, "username": f"u{n}"})).status_code
                for n in range(3)
            ]
            assert statuses[2] == 429
            assert statuses[:2] == [201, 201] or statuses[:2] == [201, 409]


async def test_profile_changes_only_what_is_sent(
    client: httpx.AsyncClient, app_client: ClientCreds, make_user: MakeUser
) -> None:
    user = await make_user("ivy", email="ivy@example.com", name="Ivy")
    token = (await sign_in(client, app_client, user))["access_token"]
    renamed = await client.patch("/api/v1/me", json={"name": "Ivy B."}, headers=bearer(token))
    assert renamed.status_code == 200
    assert renamed.json()["name"] == "Ivy B." and renamed.json()["email"] == "ivy@example.com"
    cleared = await client.patch("/api/v1/me", json={"email": None}, headers=bearer(token))
    assert cleared.json()["email"] is None and cleared.json()["name"] == "Ivy B."
    assert (await client.get("/api/v1/me", headers=bearer(token))).json()["name"] == "Ivy B."
    bad = await client.patch("/api/v1/me", json={"email": "not-an-address"}, headers=bearer(token))
    assert bad.status_code == 422 and bad.json()["error_code"] == "validation_error"
    unknown = await client.patch("/api/v1/me", json={"username": "x"}, headers=bearer(token))
    assert unknown.status_code == 422
    assert (await client.patch("/api/v1/me", json={"name": "x"})).status_code == 401


async def test_password_change_needs_the_current_one_and_ends_the_other_sign_ins(
    client: httpx.AsyncClient, app_client: ClientCreds, make_user: MakeUser
) -> None:
    user = await make_user("jon")
    other = await sign_in(client, app_client, user)
    this = await sign_in(client, app_client, user)
    headers = bearer(this["access_token"])
    wrong = await client.post(
        "/api/v1/me/password",
        json={"current_password": "not it at all", "new_password": "a brand new passphrase"},
        headers=headers,
    )
    assert wrong.status_code == 400 and wrong.json()["error_code"] == "wrong_password"
    weak = await client.post(
        "/api/v1/me/password",
        json={"current_password": user.password, "new_password": "password"},
        headers=headers,
    )
    assert weak.status_code == 400 and weak.json()["error_code"] == "weak_password"
    changed = await client.post(
        "/api/v1/me/password",
        json={"current_password": user.password, "new_password": "a brand new passphrase"},
        headers=headers,
    )
    assert changed.status_code == 204
    # The other sign-in is over; this one goes on.
    assert (
        await client.get("/api/v1/me", headers=bearer(other["access_token"]))
    ).status_code == 401
    assert (await client.get("/api/v1/me", headers=headers)).status_code == 200
    kept = await client.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": this["refresh_token"]},
        headers=app_client.basic,
    )
    assert kept.status_code == 200
    old = await password_grant(client, app_client, user)
    assert old.status_code == 400
    new = UserCreds(user.id, user.username, "a brand new passphrase")
    assert (await password_grant(client, app_client, new)).status_code == 200


#: Every protected operation of the account API, with a body that would succeed.
PROTECTED: list[tuple[str, str, dict[str, object] | None]] = [
    ("GET", "/api/v1/me", None),
    ("PATCH", "/api/v1/me", {"name": "Z"}),
    ("POST", "/api/v1/me/password", {"current_password": "x", "new_password": "y"}),
    ("GET", "/api/v1/me/sessions", None),
    ("DELETE", "/api/v1/me/sessions/0123", None),
]


@pytest.mark.one_backend
@pytest.mark.parametrize("operation", PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
async def test_every_protected_operation_refuses_every_wrong_token(
    client: httpx.AsyncClient,
    app_client: ClientCreds,
    make_user: MakeUser,
    state: AppState,
    operation: tuple[str, str, dict[str, object] | None],
) -> None:
    method, path, body = operation
    live = (await sign_in(client, app_client, await make_user("kate")))["access_token"]
    keyset = state.keys.keyset()
    claims = decode_access_token(
        keyset,
        live,
        issuer=state.settings.issuer,
        audience=state.settings.audience,
        now=int(time.time()),
    )
    assert claims is not None
    stamp = int(time.time())
    expired = keyset.sign({**claims, "iat": stamp - 3600, "exp": stamp - 60}, "at+jwt")
    gone = (await sign_in(client, app_client, await make_user("gone")))["access_token"]
    async with state.db.sessions() as db:
        await manage.disable_user(db, "gone")
        await db.commit()
    robot = await client.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, headers=app_client.basic
    )

    async def status(headers: dict[str, str]) -> tuple[int, str]:
        response = await client.request(method, path, json=body, headers=headers)
        return response.status_code, response.json()["error_code"]

    assert await status({}) == (401, "missing_token")
    assert await status(bearer(expired)) == (401, "invalid_token")
    assert await status(bearer(gone)) == (401, "invalid_token")
    assert await status(bearer(robot.json()["access_token"])) == (403, "insufficient_scope")
    # The same token before it expired: the refusal above was the expiry alone.
    assert (await client.get("/api/v1/me", headers=bearer(live))).status_code == 200


# -- the account scope ----------------------------------------------------------------------------


def refused_for_scope(response: httpx.Response) -> bool:
    """RFC 6750 §3.1: 403 insufficient_scope, naming the scope needed in the challenge."""
    challenge = response.headers.get("www-authenticate", "")
    return (
        response.status_code == 403
        and response.json()["error_code"] == "insufficient_scope"
        and 'error="insufficient_scope"' in challenge
        and 'scope="account"' in challenge
    )


@pytest.mark.one_backend
@pytest.mark.feature("account-api-scope")
@pytest.mark.parametrize("operation", PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
async def test_a_token_without_the_account_scope_is_refused(
    client: httpx.AsyncClient,
    app_client: ClientCreds,
    make_client: MakeClient,
    make_user: MakeUser,
    events: Events,
    operation: tuple[str, str, dict[str, object] | None],
) -> None:
    method, path, body = operation
    user = await make_user("lou", email="lou@example.com", name="Lou")
    # A sign-in only (what /userinfo would answer with `sub` alone), from a third party...
    rp = await make_client("rp", grants=["password"], scope="openid")
    signed_in = (await sign_in(client, rp, user))["access_token"]
    # ...and from the first-party app itself, asking for less than account.
    narrow = (await password_grant(client, app_client, user, scope="profile email")).json()
    for token in (signed_in, narrow["access_token"]):
        response = await client.request(method, path, json=body, headers=bearer(token))
        assert refused_for_scope(response), response.text
    denials = [fields for event, fields in events if event == "api.access_denied"]
    assert [(d["client_id"], d["reason"], d["scope"]) for d in denials] == [
        ("rp", "scope_missing", "account"),
        ("app", "scope_missing", "account"),
    ]
    # Nothing was read or changed: the email is the person's, the sign-ins all live.
    full = (await sign_in(client, app_client, user))["access_token"]
    me = await client.get("/api/v1/me", headers=bearer(full))
    assert me.json()["email"] == "lou@example.com" and me.json()["name"] == "Lou"
    sessions = (await client.get("/api/v1/me/sessions", headers=bearer(full))).json()["sessions"]
    assert len(sessions) == 3
    assert (await password_grant(client, app_client, user)).status_code == 200


@pytest.mark.feature("account-api-scope")
async def test_a_client_stripped_of_the_account_scope_is_refused_at_once(
    client: httpx.AsyncClient, app_client: ClientCreds, make_user: MakeUser, state: AppState
) -> None:
    token = (await sign_in(client, app_client, await make_user("max")))["access_token"]
    assert (await client.get("/api/v1/me", headers=bearer(token))).status_code == 200
    async with state.db.sessions() as db:
        await manage.update_client(db, "app", {"scope": "profile email api"})
        await db.commit()
    assert refused_for_scope(await client.get("/api/v1/me", headers=bearer(token)))


@pytest.mark.feature("account-api-scope")
async def test_only_a_first_party_client_may_change_the_password(
    client: httpx.AsyncClient, app_client: ClientCreds, make_user: MakeUser, state: AppState
) -> None:
    user = await make_user("ned", email="ned@example.com")
    token = (await sign_in(client, app_client, user))["access_token"]
    # The operator no longer treats the app as its own: the account scope it holds is still
    # enough for the profile and the sign-ins...
    async with state.db.sessions() as db:
        await manage.update_client(db, "app", {"first_party": False})
        await db.commit()
    assert (await client.get("/api/v1/me", headers=bearer(token))).status_code == 200
    # ...not for the password, even with the right current one.
    change = {"current_password": user.password, "new_password": "a brand new passphrase"}
    refused = await client.post("/api/v1/me/password", json=change, headers=bearer(token))
    assert refused_for_scope(refused), refused.text
    assert "first-party" in refused.json()["detail"]
    assert (await sign_in(client, app_client, user))["access_token"]  # old password still works


@pytest.mark.feature("account-api-scope", "grant-password")
async def test_the_password_grant_gives_the_account_scope_to_first_party_clients_only(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    # The password grant shows no consent page: a third-party client registered with the
    # account scope gets it only through the authorization code flow's consent.
    user = await make_user("ora")
    third = await make_client("third", grants=["password"], scope="profile account")
    asked = await password_grant(client, third, user, scope="profile account")
    assert (asked.status_code, asked.json()["error"]) == (400, "invalid_scope")
    default = await password_grant(client, third, user)
    assert default.status_code == 200
    assert default.json()["scope"] == "profile"  # everything else it may ask for
    first = await make_client(
        "first", grants=["password"], scope="profile account", first_party=True
    )
    granted = await password_grant(client, first, user, scope="profile account")
    assert (granted.status_code, granted.json()["scope"]) == (200, "profile account")


@pytest.mark.feature("account-api-scope")
async def test_the_schema_documents_the_scope_refusals(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path, method in [
        ("/api/v1/me", "get"),
        ("/api/v1/me", "patch"),
        ("/api/v1/me/password", "post"),
        ("/api/v1/me/sessions", "get"),
        ("/api/v1/me/sessions/{session_id}", "delete"),
    ]:
        assert "`account`" in paths[path][method]["responses"]["403"]["description"], path
    assert "first-party" in paths["/api/v1/me/password"]["post"]["responses"]["403"]["description"]
