"""The admin API's clients with JWT authentication methods, keys and resources (issue 19)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey

from server import manage
from server.config import Settings
from server.deps import AppState
from server.models import Client
from tests.conftest import ClientCreds, MakeClient, make_settings

API = "https://api.example"
TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
KEY = ECKey.generate_key("P-256", parameters={"kid": "k1"})
JWKS = {"keys": [KEY.as_dict(private=False)]}


@pytest.fixture
def settings(database_url: str, keys_dir: Path) -> Settings:
    return make_settings(database_url, keys_dir, resources=[API, "https://reports.example"])


@pytest.fixture
async def admin(client: httpx.AsyncClient, make_client: MakeClient) -> dict[str, str]:
    ops: ClientCreds = await make_client("ops", admin=True, grants=["client_credentials"], scope="")
    issued = await client.post(
        "/oauth2/token",
        data={"grant_type": "client_credentials", "scope": "admin"},
        headers=ops.basic,
    )
    assert issued.status_code == 200, issued.text
    return {"Authorization": "Bearer " + issued.json()["access_token"]}


def assertion(issuer: str, client_id: str, key: Any, alg: str) -> dict[str, str]:
    issued = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": issuer,
        "iat": issued,
        "exp": issued + 60,
        "jti": f"{client_id}-{time.monotonic_ns()}",
    }
    token = jwt.encode({"alg": alg}, claims, key, algorithms=[alg])
    return {"grant_type": "client_credentials", "client_assertion_type": TYPE,
            "client_assertion": token}  # fmt: skip


@pytest.mark.feature("client-auth-private-key-jwt", "admin-api")
async def test_admin_creates_a_private_key_jwt_client_that_then_authenticates(
    client: httpx.AsyncClient, admin: dict[str, str], state: AppState
) -> None:
    made = await client.post(
        "/admin/v1/clients",
        headers=admin,
        json={
            "client_id": "bank",
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": JWKS,
            "resources": [API],
        },
    )
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["client_secret"] is None
    assert body["token_endpoint_auth_method"] == "private_key_jwt"
    assert body["jwks"] == JWKS and body["jwks_uri"] is None
    assert body["resources"] == [API] and body["origin"] is None
    token = await client.post(
        "/oauth2/token", data=assertion(state.settings.issuer, "bank", KEY, "ES256")
    )
    assert token.status_code == 200, token.text
    # Its keys move to a jwks_uri; it has no secret to rotate.
    moved = await client.patch(
        "/admin/v1/clients/bank", headers=admin, json={"jwks_uri": "https://bank.example/jwks"}
    )
    assert moved.status_code == 200, moved.text
    assert moved.json()["jwks"] is None and moved.json()["jwks_uri"] == "https://bank.example/jwks"
    assert moved.json()["client_secret"] is None
    rotate = await client.post("/admin/v1/clients/bank/secret", headers=admin)
    assert rotate.status_code == 400, rotate.text
    widened = await client.patch("/admin/v1/clients/bank", headers=admin, json={"resources": None})
    assert widened.status_code == 200 and widened.json()["resources"] is None


@pytest.mark.feature("client-auth-client-secret-jwt", "admin-api")
async def test_admin_creates_and_converts_client_secret_jwt_clients(
    client: httpx.AsyncClient, admin: dict[str, str], state: AppState
) -> None:
    made = await client.post(
        "/admin/v1/clients",
        headers=admin,
        json={
            "client_id": "hmac",
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "client_secret_jwt",
        },
    )
    assert made.status_code == 201, made.text
    secret = made.json()["client_secret"]
    issuer = state.settings.issuer
    ok = await client.post(
        "/oauth2/token", data=assertion(issuer, "hmac", OctKey.import_key(secret), "HS256")
    )
    assert ok.status_code == 200, ok.text
    rotated = await client.post("/admin/v1/clients/hmac/secret", headers=admin)
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["client_secret"]
    old = await client.post(
        "/oauth2/token", data=assertion(issuer, "hmac", OctKey.import_key(secret), "HS256")
    )
    assert old.status_code == 401, old.text
    fresh = await client.post(
        "/oauth2/token", data=assertion(issuer, "hmac", OctKey.import_key(new), "HS256")
    )
    assert fresh.status_code == 200, fresh.text
    # A secret client converted to client_secret_jwt gets a new (sealed) secret, once.
    basic = await client.post(
        "/admin/v1/clients",
        headers=admin,
        json={"client_id": "plain", "grant_types": ["client_credentials"]},
    )
    converted = await client.patch(
        "/admin/v1/clients/plain",
        headers=admin,
        json={"token_endpoint_auth_method": "client_secret_jwt"},
    )
    assert converted.status_code == 200, converted.text
    sealed_secret = converted.json()["client_secret"]
    assert sealed_secret and sealed_secret != basic.json()["client_secret"]
    works = await client.post(
        "/oauth2/token", data=assertion(issuer, "plain", OctKey.import_key(sealed_secret), "HS256")
    )
    assert works.status_code == 200, works.text
    # Between the two secret methods the secret stays.
    post = await client.patch(
        "/admin/v1/clients/hmac",
        headers=admin,
        json={"token_endpoint_auth_method": "client_secret_post"},
    )
    assert post.status_code == 200 and post.json()["client_secret"], post.text


@pytest.mark.feature("client-auth-private-key-jwt", "admin-api")
async def test_admin_refuses_bad_methods_keys_and_resources(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    private = {"keys": [KEY.as_dict(private=True)]}
    pk = {"client_id": "x", "grant_types": ["client_credentials"],
          "token_endpoint_auth_method": "private_key_jwt"}  # fmt: skip
    cases: list[tuple[dict[str, Any], int]] = [
        (pk, 400),
        ({**pk, "jwks": private}, 400),
        ({**pk, "jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}}, 400),
        ({**pk, "jwks": JWKS, "jwks_uri": "https://x.example/jwks"}, 400),
        ({**pk, "jwks_uri": "ftp://x.example/jwks"}, 400),
        ({**pk, "jwks": {"keys": []}}, 422),
        ({**pk, "jwks": {"keys": "nope"}}, 422),
        ({**pk, "jwks": ["not", "a", "set"]}, 422),
        ({"client_id": "x", "jwks": JWKS}, 400),
        ({"client_id": "x", "token_endpoint_auth_method": "magic"}, 422),
        (
            {
                "client_id": "x",
                "public": True,
                "token_endpoint_auth_method": "private_key_jwt",
                "jwks": JWKS,
            },
            400,
        ),
        ({"client_id": "x", "resources": ["https://elsewhere.example"]}, 400),
        ({"client_id": "x", "resources": "https://api.example"}, 422),
    ]
    for body, status in cases:
        response = await client.post("/admin/v1/clients", headers=admin, json=body)
        assert response.status_code == status, (body, response.text)
    listing = await client.get("/admin/v1/clients", headers=admin)
    assert [c["client_id"] for c in listing.json()["items"]] == ["ops"]
    public = await client.post(
        "/admin/v1/clients", headers=admin, json={"client_id": "pub", "public": True}
    )
    assert public.status_code == 201, public.text
    for change in (
        {"token_endpoint_auth_method": "client_secret_basic"},
        {"jwks": JWKS},
        {"resources": ["https://elsewhere.example"]},
    ):
        refused = await client.patch("/admin/v1/clients/pub", headers=admin, json=change)
        assert refused.status_code == 400, (change, refused.text)
        assert refused.json()["error_code"] == "invalid_client_metadata"


@pytest.mark.feature("admin-api")
async def test_admin_sets_dpop_bound_access_tokens(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    created = await client.post(
        "/admin/v1/clients",
        headers=admin,
        json={"client_id": "fapi", "dpop_bound_access_tokens": True},
    )
    assert created.status_code == 201, created.text
    assert created.json()["dpop_bound_access_tokens"] is True
    for bad in ("true", 1, None):
        refused = await client.patch(
            "/admin/v1/clients/fapi", headers=admin, json={"dpop_bound_access_tokens": bad}
        )
        assert refused.status_code == 422, (bad, refused.text)
    changed = await client.patch(
        "/admin/v1/clients/fapi", headers=admin, json={"dpop_bound_access_tokens": False}
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["dpop_bound_access_tokens"] is False
    shown = await client.get("/admin/v1/clients/fapi", headers=admin)
    assert shown.json()["dpop_bound_access_tokens"] is False


@pytest.mark.feature("admin-api")
async def test_admin_sets_require_pushed_authorization_requests(
    client: httpx.AsyncClient, admin: dict[str, str], state: AppState
) -> None:
    """RFC 9126 §6: created, changed, shown and stored like ``dpop_bound_access_tokens``."""
    flag = "require_pushed_authorization_requests"
    plain = await client.post("/admin/v1/clients", headers=admin, json={"client_id": "plain"})
    assert plain.status_code == 201, plain.text
    assert plain.json()[flag] is False
    created = await client.post(
        "/admin/v1/clients", headers=admin, json={"client_id": "pushy", flag: True}
    )
    assert created.status_code == 201, created.text
    assert created.json()[flag] is True
    assert created.json()["dpop_bound_access_tokens"] is False
    assert (await client.get("/admin/v1/clients/pushy", headers=admin)).json()[flag] is True
    for bad in ("true", 1, None):
        refused = await client.patch("/admin/v1/clients/pushy", headers=admin, json={flag: bad})
        assert refused.status_code == 422, (bad, refused.text)
        made = await client.post(
            "/admin/v1/clients", headers=admin, json={"client_id": "bad", flag: bad}
        )
        assert made.status_code == 422, (bad, made.text)
    async with state.db.sessions() as db:
        row = await db.get(Client, "pushy")
        assert row is not None and row.require_par is True
    changed = await client.patch("/admin/v1/clients/pushy", headers=admin, json={flag: False})
    assert changed.status_code == 200, changed.text
    assert changed.json()[flag] is False
    shown = await client.get("/admin/v1/clients/pushy", headers=admin)
    assert shown.json()[flag] is False
    again = await client.patch("/admin/v1/clients/plain", headers=admin, json={flag: True})
    assert again.status_code == 200, again.text
    assert again.json()[flag] is True
    async with state.db.sessions() as db:
        rows = {c: await db.get(Client, c) for c in ("pushy", "plain")}
        assert {c: r is not None and r.require_par for c, r in rows.items()} == {
            "pushy": False,
            "plain": True,
        }


@pytest.mark.feature("admin-api")
@pytest.mark.parametrize(
    "flag", ["dpop_bound_access_tokens", "require_pushed_authorization_requests"]
)
async def test_manage_refuses_a_flag_that_is_not_a_bool(state: AppState, flag: str) -> None:
    """What the API's schema stops, ``manage`` still refuses, and changes nothing."""
    async with state.db.sessions() as db:
        await manage.create_client(db, client_id="app")
        await db.commit()
    for bad in ("true", 1, None):
        async with state.db.sessions() as db:
            with pytest.raises(manage.ManageError, match=f"{flag} must be true or false"):
                await manage.update_client(db, "app", {flag: bad})
    async with state.db.sessions() as db:
        changed = await manage.update_client(db, "app", {flag: True})
        await db.commit()
        view = manage.client_view(changed.client)
    assert view[flag] is True
    other = ({"dpop_bound_access_tokens", "require_pushed_authorization_requests"} - {flag}).pop()
    assert view[other] is False
