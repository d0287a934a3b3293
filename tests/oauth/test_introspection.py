"""POST /oauth2/introspect (RFC 7662): live tokens described, everything else exactly inactive.

The hostile-token table re-signs tokens with the server's real key where it matters, so each
case proves the one rule it names (a ``jku`` header signed with our key is still refused).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from joserfc.jwk import RSAKey

from server import manage
from server.deps import AppState
from tests.conftest import ClientCreds, MakeClient, MakeUser, password_grant, refresh_grant

pytestmark = pytest.mark.feature("introspection")
INACTIVE = {"active": False}
ATTACKER = RSAKey.generate_key(2048, private=True)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def rs256(key: RSAKey, signing_input: str) -> str:
    private = key.private_key
    assert private is not None
    signature = private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr,call-arg]
    return b64(signature)


def forge(
    header: dict[str, Any], claims: Any, key: RSAKey | None, *, raw_claims: bytes | None = None
) -> str:
    body = raw_claims if raw_claims is not None else json.dumps(claims).encode()
    signing_input = b64(json.dumps(header).encode()) + "." + b64(body)
    return signing_input + "." + (rs256(key, signing_input) if key is not None else "")


async def introspect(
    http: httpx.AsyncClient, creds: ClientCreds, token: str, **extra: str
) -> httpx.Response:
    return await http.post(
        "/oauth2/introspect", data={"token": token, **extra}, headers=creds.basic
    )


async def sign_in(
    http: httpx.AsyncClient, creds: ClientCreds, make_user: MakeUser
) -> tuple[dict[str, Any], Any]:
    user = await make_user()
    response = await password_grant(http, creds, user, scope="profile api")
    assert response.status_code == 200, response.text
    return response.json(), user


async def test_a_live_access_token_is_described(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    creds = await make_client()
    tokens, user = await sign_in(client, creds, make_user)
    claims = unb64(tokens["access_token"].split(".")[1])

    response = await introspect(client, creds, tokens["access_token"])

    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    assert response.json() == {
        "active": True,
        "token_type": "Bearer",
        "scope": "profile api",
        "client_id": "app",
        "sub": user.id,
        "exp": claims["exp"],
        "iat": claims["iat"],
        "iss": state.settings.issuer,
        "aud": state.settings.audience,
        "jti": claims["jti"],
    }


async def test_a_live_refresh_token_is_described(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    creds = await make_client()
    tokens, user = await sign_in(client, creds, make_user)

    body = (await introspect(client, creds, tokens["refresh_token"])).json()

    assert body.pop("exp") - body.pop("iat") == state.settings.refresh_token_ttl
    assert body == {
        "active": True,
        "token_type": "refresh_token",
        "scope": "profile api",
        "client_id": "app",
        "sub": user.id,
        "iss": state.settings.issuer,
    }


async def test_a_client_credentials_token_is_described(
    client: httpx.AsyncClient, make_client: MakeClient
) -> None:
    creds = await make_client("svc", grants=["client_credentials"], scope="api")
    token = (
        await client.post(
            "/oauth2/token", data={"grant_type": "client_credentials"}, headers=creds.basic
        )
    ).json()["access_token"]
    body = (await introspect(client, creds, token)).json()
    assert (body["active"], body["sub"], body["client_id"], body["scope"]) == (
        True,
        "svc",
        "svc",
        "api",
    )


# -- the hostile-token table -------------------------------------------------------------

Mutation = Callable[[dict[str, Any], dict[str, Any], RSAKey, str], str]


def resign(
    header: dict[str, Any] | None = None,
    claims: dict[str, Any] | None = None,
    drop_header: tuple[str, ...] = (),
    drop_claims: tuple[str, ...] = (),
) -> Mutation:
    """Change the header/claims and sign again with the server's own current key."""

    def mutate(h: dict[str, Any], c: dict[str, Any], key: RSAKey, token: str) -> str:
        new_h = {k: v for k, v in {**h, **(header or {})}.items() if k not in drop_header}
        new_c = {k: v for k, v in {**c, **(claims or {})}.items() if k not in drop_claims}
        return forge(new_h, new_c, key)

    return mutate


def unsigned(alg: str) -> Mutation:
    return lambda h, c, key, token: forge({**h, "alg": alg}, c, None)


def hs256_with_public_key(h: dict[str, Any], c: dict[str, Any], key: RSAKey, token: str) -> str:
    # The classic confusion: HMAC keyed with the PEM of our *public* key.
    secret = key.as_pem(private=False)
    signing_input = (
        b64(json.dumps({**h, "alg": "HS256"}).encode()) + "." + b64(json.dumps(c).encode())
    )
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(mac)


def attacker_key_in_jwk_header(kid_ours: bool) -> Mutation:
    def mutate(h: dict[str, Any], c: dict[str, Any], key: RSAKey, token: str) -> str:
        jwk = ATTACKER.as_dict(private=False)
        kid = h["kid"] if kid_ours else ATTACKER.thumbprint()
        return forge({**h, "kid": kid, "jwk": jwk}, c, ATTACKER)

    return mutate


def signed_by_attacker(h: dict[str, Any], c: dict[str, Any], key: RSAKey, token: str) -> str:
    return forge({**h, "kid": ATTACKER.thumbprint()}, c, ATTACKER)


def attacker_signature_with_our_kid(
    h: dict[str, Any], c: dict[str, Any], key: RSAKey, token: str
) -> str:
    return forge(h, c, ATTACKER)


def tampered_claims(h: dict[str, Any], c: dict[str, Any], key: RSAKey, token: str) -> str:
    head, _, signature = token.split(".")
    return f"{head}.{b64(json.dumps({**c, 'scope': 'admin'}).encode())}.{signature}"


def tampered_signature(h: dict[str, Any], c: dict[str, Any], key: RSAKey, token: str) -> str:
    head, payload, signature = token.split(".")
    flipped = ("A" if signature[10] != "A" else "B").join((signature[:10], signature[11:]))
    return f"{head}.{payload}.{flipped}"


def raw_payload(body: bytes) -> Mutation:
    return lambda h, c, key, token: forge(h, None, key, raw_claims=body)


def constant(value: str) -> Mutation:
    return lambda h, c, key, token: value


NOW = int(time.time())
HOSTILE: dict[str, Mutation] = {
    "expired": resign(claims={"exp": NOW - 1}),
    "exp-as-string": resign(claims={"exp": str(NOW + 3600)}),
    "exp-as-bool": resign(claims={"exp": True}),
    "exp-missing": resign(drop_claims=("exp",)),
    "wrong-iss": resign(claims={"iss": "https://evil.example"}),
    "wrong-aud": resign(claims={"aud": "https://other-api.example"}),
    "aud-list-without-ours": resign(claims={"aud": ["https://other-api.example"]}),
    "typ-JWT-an-id-token": resign(header={"typ": "JWT"}),
    "typ-missing": resign(drop_header=("typ",)),
    "typ-not-a-string": resign(header={"typ": ["at+jwt"]}),
    "alg-none": unsigned("none"),
    "alg-None": unsigned("None"),
    "alg-NONE": unsigned("NONE"),
    "alg-nOnE": unsigned("nOnE"),
    "alg-none-with-our-signature": lambda h, c, key, token: forge({**h, "alg": "none"}, c, key),
    "alg-missing": resign(drop_header=("alg",)),
    "alg-RS512-label": resign(header={"alg": "RS512"}),
    "alg-PS256-label": resign(header={"alg": "PS256"}),
    "hs256-keyed-with-our-public-key": hs256_with_public_key,
    "jwk-header-attacker-key-and-kid": attacker_key_in_jwk_header(kid_ours=False),
    "jwk-header-attacker-key-our-kid": attacker_key_in_jwk_header(kid_ours=True),
    "jwk-header-our-key-and-signature": resign(header={"jwk": {"kty": "RSA"}}),
    "jku-header": resign(header={"jku": "https://evil.example/jwks.json"}),
    "x5u-header": resign(header={"x5u": "https://evil.example/cert.pem"}),
    "x5c-header": resign(header={"x5c": ["MIIB"]}),
    "crit-header": resign(header={"crit": ["exp"]}),
    "unknown-key": signed_by_attacker,
    "attacker-signature-our-kid": attacker_signature_with_our_kid,
    "kid-path-traversal": resign(header={"kid": "../../../../etc/passwd"}),
    "kid-sql-injection": resign(header={"kid": "' OR '1'='1' --"}),
    "kid-huge": resign(header={"kid": "k" * 4000}),
    "kid-null": resign(header={"kid": None}),
    "kid-number": resign(header={"kid": 1}),
    "kid-list": resign(header={"kid": ["a"]}),
    "kid-missing": resign(drop_header=("kid",)),
    "tampered-claims": tampered_claims,
    "tampered-signature": tampered_signature,
    "signature-stripped": lambda h, c, key, token: token.rsplit(".", 1)[0] + ".",
    "jti-missing": resign(drop_claims=("jti",)),
    "sub-missing": resign(drop_claims=("sub",)),
    "client_id-not-a-string": resign(claims={"client_id": 7}),
    "payload-not-json": raw_payload(b"not json"),
    "payload-a-json-array": raw_payload(b"[1, 2]"),
    "payload-invalid-utf8": raw_payload(b"\xff\xfe"),
    "header-a-json-array": lambda h, c, key, token: "WzFd." + token.split(".", 1)[1],
    "header-not-base64": lambda h, c, key, token: "!!!." + token.split(".", 1)[1],
    "four-segments": lambda h, c, key, token: token + ".x",
    "two-segments": lambda h, c, key, token: token.rsplit(".", 1)[0],
    "garbage": constant("garbage"),
    "dots-only": constant(".."),
    "non-ascii": constant("ü.ü.ü"),
    "longer-than-any-token-we-sign": lambda h, c, key, token: token + "A" * 9000,
    "sql-injection": constant("' OR 1=1; DROP TABLE users; --"),
    "template-injection": constant("{{7*7}}${7*7}"),
}


@pytest.mark.one_backend
@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_access_tokens_are_exactly_inactive(
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
    case: str,
) -> None:
    creds = await make_client()
    tokens, _ = await sign_in(client, creds, make_user)
    token = tokens["access_token"]
    head, payload, _ = token.split(".")
    key = state.keys.keyset().current
    # Control: the untouched header and claims, re-signed with our key, are active, so the
    # one change each case makes is what turns it inactive.
    control = resign()(unb64(head), unb64(payload), key, token)
    assert (await introspect(client, creds, control)).json()["active"] is True

    hostile = HOSTILE[case](unb64(head), unb64(payload), key, token)
    response = await introspect(client, creds, hostile)

    assert response.status_code == 200
    assert response.json() == INACTIVE


@pytest.mark.parametrize(
    "change",
    [
        {"aud": ["https://other-api.example", "AUDIENCE"]},
        {"typ": "application/at+jwt"},
        {"typ": "AT+JWT"},
    ],
    ids=["aud-list-with-ours", "typ-media-type", "typ-upper-case"],
)
async def test_valid_variants_stay_active(
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
    change: dict[str, Any],
) -> None:
    # RFC 7519 §4.1.3 (aud may be a list) and RFC 9068 §4 / RFC 7515 §4.1.9 (typ spellings).
    creds = await make_client()
    tokens, _ = await sign_in(client, creds, make_user)
    head, payload, _ = tokens["access_token"].split(".")
    header, claims = unb64(head), unb64(payload)
    if "aud" in change:
        claims["aud"] = [a.replace("AUDIENCE", state.settings.audience) for a in change["aud"]]
    else:
        header["typ"] = change["typ"]
    token = forge(header, claims, state.keys.keyset().current)
    assert (await introspect(client, creds, token)).json()["active"] is True


# -- state the database knows ----------------------------------------------------------


async def test_refresh_tokens_rotated_revoked_or_unknown_are_inactive(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    tokens, _ = await sign_in(client, creds, make_user)
    rotated = (await refresh_grant(client, creds, tokens["refresh_token"])).json()
    assert (await introspect(client, creds, tokens["refresh_token"])).json() == INACTIVE
    assert (await introspect(client, creds, rotated["refresh_token"])).json()["active"] is True
    assert (await introspect(client, creds, "X" * 43)).json() == INACTIVE
    # Replaying the rotated one revokes the family: the newest refresh and access die too.
    await refresh_grant(client, creds, tokens["refresh_token"])
    for token in (rotated["refresh_token"], rotated["access_token"]):
        assert (await introspect(client, creds, token)).json() == INACTIVE


async def test_disabling_the_user_or_changing_the_password_makes_tokens_inactive(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    with_family = await make_client("web")
    # No refresh_token grant: still a family (a sign-in) of its own, without refresh tokens.
    no_family = await make_client("cli", grants=["password"])
    user = await make_user()
    a = (await password_grant(client, with_family, user)).json()
    b = (await password_grant(client, no_family, user)).json()
    for creds, token in ((with_family, a["access_token"]), (no_family, b["access_token"])):
        assert (await introspect(client, creds, token)).json()["active"] is True

    async with state.db.sessions() as db:
        await manage.set_password(db, state.passwords, user.username, "another long password")
        await db.commit()

    assert (await introspect(client, with_family, a["access_token"])).json() == INACTIVE
    assert (await introspect(client, with_family, a["refresh_token"])).json() == INACTIVE
    assert (await introspect(client, no_family, b["access_token"])).json() == INACTIVE

    # A token issued after the change is live; disabling the user ends it.
    user.password = "another long password"
    c = (await password_grant(client, no_family, user)).json()
    assert (await introspect(client, no_family, c["access_token"])).json()["active"] is True
    async with state.db.sessions() as db:
        await manage.disable_user(db, user.username)
        await db.commit()
    assert (await introspect(client, no_family, c["access_token"])).json() == INACTIVE


async def test_tokens_of_a_deleted_client_are_inactive(
    client: httpx.AsyncClient, make_client: MakeClient, state: AppState
) -> None:
    svc = await make_client("svc", grants=["client_credentials"])
    api = await make_client("api", grants=["client_credentials"], resource_server=True)
    token = (
        await client.post(
            "/oauth2/token", data={"grant_type": "client_credentials"}, headers=svc.basic
        )
    ).json()["access_token"]
    assert (await introspect(client, api, token)).json()["active"] is True
    async with state.db.sessions() as db:
        await manage.delete_client(db, "svc")
        await db.commit()
    assert (await introspect(client, api, token)).json() == INACTIVE


async def test_a_client_sees_only_its_own_tokens_a_resource_server_sees_all(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    owner = await make_client("owner")
    other = await make_client("other")
    api = await make_client("api", resource_server=True)
    tokens, _ = await sign_in(client, owner, make_user)
    for token in (tokens["access_token"], tokens["refresh_token"]):
        # RFC 7662 §2.2 allows "active": false to keep a client from scanning others' tokens.
        assert (await introspect(client, other, token)).json() == INACTIVE
        body = (await introspect(client, api, token)).json()
        assert (body["active"], body["client_id"]) == (True, "owner")


@pytest.mark.one_backend
@pytest.mark.parametrize(
    ("body", "headers", "status", "error"),
    [
        ("token=t", {}, 401, "invalid_client"),
        ("token=t&client_id=spa", {}, 401, "invalid_client"),
        ("token=t&client_id=app&client_secret=nope", {}, 401, "invalid_client"),
        ("", None, 400, "invalid_request"),
        ("token=a&token=b", None, 400, "invalid_request"),
        ("token=t&token_type_hint=id_token", None, 400, "unsupported_token_type"),
    ],
    ids=["no-auth", "public-client", "bad-secret", "no-token", "duplicate", "unknown-hint"],
)
async def test_bad_requests(
    client: httpx.AsyncClient,
    make_client: MakeClient,
    body: str,
    headers: dict[str, str] | None,
    status: int,
    error: str,
) -> None:
    creds = await make_client()
    await make_client("spa", public=True)
    response = await client.post(
        "/oauth2/introspect",
        content=body.encode(),
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            **(creds.basic if headers is None else headers),
        },
    )
    assert (response.status_code, response.json()["error"]) == (status, error)
    assert response.headers["cache-control"] == "no-store"


async def test_the_hint_does_not_hide_a_token(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    tokens, _ = await sign_in(client, creds, make_user)
    wrong = await introspect(client, creds, tokens["access_token"], token_type_hint="refresh_token")
    assert wrong.json()["active"] is True
    wrong = await introspect(client, creds, tokens["refresh_token"], token_type_hint="access_token")
    assert wrong.json()["active"] is True
