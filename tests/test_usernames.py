"""The username profile (RFC 8265 UsernameCaseMapped, UTS #39 highly restrictive) at every door
that creates an account: the JSON API, the admin API, the sign-up page (the CLI is in
tests/test_cli.py). Accounts made before keep signing in: only creation is checked."""

from __future__ import annotations

import re

import httpx
import pytest
from sqlalchemy import func, select

from server.deps import AppState
from server.models import User
from server.passwords import normalize_username
from server.usernames import UsernameError, check_username
from tests.conftest import MakeClient, MakeUser, UserCreds, csrf_of, password_grant

pytestmark = pytest.mark.feature("username-profile")
PASSWORD = "correct horse battery"

#: Ordinary names in one script (or Latin with Japanese, Chinese or Korean): accepted.
ACCEPTED = [
    "ann",
    "josé",
    "Борис",
    "山田",
    "ユーザー",
    "山田たろう",
    "홍길동",
    "Ἀλέξανδρος",
    "שלום",
    "tanaka山田",
    "2024",
    "a.b@c+d-e_f",
]
#: Look-alikes of ``paypal`` (and friends): (name, what the refusal says).
LOOKALIKES = [
    ("p\u0430ypal", "mix letters of different scripts"),  # Cyrillic а
    ("paypa\u04cf", "mix letters of different scripts"),  # Cyrillic palochka
    ("pay\u03c1al", "mix letters of different scripts"),  # Greek rho
    ("paypal\u3164", "U+3164"),  # HANGUL FILLER: invisible
    ("\u1160paypal", "U+1160"),  # HANGUL JUNGSEONG FILLER: invisible
    ("pay\uffa0pal", "U+FFA0"),  # HALFWIDTH HANGUL FILLER: invisible
    ("paypal\u115f", "U+115F"),  # HANGUL CHOSEONG FILLER: invisible
    ("\ufb01nn", "U+FB01"),  # the ligature ﬁ: a compatibility character
    ("\u0627\u0628c", "right-to-left"),  # Arabic then Latin: the Bidi Rule
]
LOOKALIKE_IDS = ["cyrillic-a", "palochka", "greek-rho", "u3164", "u1160", "uffa0", "u115f", "fi"]
LOOKALIKE_IDS.append("bidi")


@pytest.mark.parametrize("username", ACCEPTED)
def test_ordinary_names_in_any_script_fit_the_profile(username: str) -> None:
    check_username(username)  # does not raise


@pytest.mark.parametrize(("username", "reason"), LOOKALIKES, ids=LOOKALIKE_IDS)
def test_look_alikes_do_not_fit_the_profile(username: str, reason: str) -> None:
    with pytest.raises(UsernameError, match=re.escape(reason)):
        check_username(username)


async def user_count(state: AppState) -> int:
    async with state.db.sessions() as db:
        return int(await db.scalar(select(func.count()).select_from(User)) or 0)


@pytest.mark.parametrize(("username", "reason"), LOOKALIKES, ids=LOOKALIKE_IDS)
async def test_registration_refuses_a_look_alike_beside_the_real_account(
    client: httpx.AsyncClient, make_user: MakeUser, state: AppState, username: str, reason: str
) -> None:
    await make_user("paypal")
    response = await client.post("/api/v1/users", json={"username": username, "password": PASSWORD})
    assert response.status_code == 400, response.text
    assert response.json()["error_code"] == "invalid_user"
    assert reason in response.json()["detail"]
    assert await user_count(state) == 1


@pytest.mark.parametrize("username", ACCEPTED)
async def test_registration_accepts_ordinary_names(
    client: httpx.AsyncClient, make_client: MakeClient, username: str
) -> None:
    response = await client.post("/api/v1/users", json={"username": username, "password": PASSWORD})
    assert response.status_code == 201, response.text
    app = await make_client("app", grants=["password"])
    user = UserCreds(response.json()["id"], username, PASSWORD)
    assert (await password_grant(client, app, user)).status_code == 200


async def test_the_admin_api_refuses_a_look_alike(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    await make_user("paypal")
    ops = await make_client("ops", admin=True, grants=["client_credentials"], scope="admin")
    data = {"grant_type": "client_credentials", "scope": "admin"}
    issued = await client.post("/oauth2/token", data=data, headers=ops.basic)
    admin = {"Authorization": f"Bearer {issued.json()['access_token']}"}
    for username, _ in LOOKALIKES:
        response = await client.post(
            "/admin/v1/users", json={"username": username, "password": PASSWORD}, headers=admin
        )
        assert response.status_code == 400, response.text
        assert response.json()["error_code"] == "invalid_user"
    made = await client.post(
        "/admin/v1/users", json={"username": "Борис", "password": PASSWORD}, headers=admin
    )
    assert made.status_code == 201, made.text
    assert await user_count(state) == 2


async def test_the_sign_up_page_refuses_a_look_alike_with_a_form_error(
    browser: httpx.AsyncClient, make_user: MakeUser, state: AppState
) -> None:
    await make_user("paypal")
    page = await browser.get("/register")
    response = await browser.post(
        "/register",
        data={
            "csrf_token": csrf_of(page),
            "username": "p\u0430ypal",
            "email": "",
            "name": "",
            "password": PASSWORD,
            "password_confirm": PASSWORD,
        },
    )
    assert response.status_code == 400
    assert "mix letters of different scripts" in response.text
    assert await user_count(state) == 1


async def test_accounts_made_before_the_profile_still_sign_in(
    client: httpx.AsyncClient, make_client: MakeClient, state: AppState
) -> None:
    # Made before the profile existed (written straight to the table, as the old code did):
    # the key is computed as it always was, and the account keeps working.
    old_names = ["p\u0430ypal", "\ufb01nn", "x\u3164"]
    async with state.db.sessions() as db:
        for name in old_names:
            db.add(
                User(
                    username=name,
                    username_key=normalize_username(name),
                    password_hash=await state.passwords.hash_async(PASSWORD),
                )
            )
        await db.commit()
    app = await make_client("app", grants=["password"])
    for name in old_names:
        user = UserCreds("", name, PASSWORD)
        assert (await password_grant(client, app, user)).status_code == 200, name
    # "finn" collides with the key of "ﬁnn" (NFKC): still taken, as before.
    taken = await client.post("/api/v1/users", json={"username": "finn", "password": PASSWORD})
    assert (taken.status_code, taken.json()["error_code"]) == (409, "username_taken")
