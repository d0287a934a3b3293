"""Password hashing (SPEC.md "Tokens" > passwords): argon2id, policy, off the event loop."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest
from argon2 import PasswordHasher

from server.config import Env, Settings
from server.passwords import (
    Passwords,
    Verification,
    WeakPasswordError,
    normalize_username,
)
from tests.conftest import FAST_ARGON2

GOOD = "correct horse battery"


@pytest.fixture(autouse=True)
def no_auth_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AUTH_"):
            monkeypatch.delenv(name)


def passwords(**overrides: Any) -> Passwords:
    return Passwords(Settings(_env_file=None, **overrides))  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def default_passwords() -> Passwords:
    """The production defaults (OWASP parameters): one instance, its dummy hash is costly."""
    return Passwords(Settings(_env_file=None, env=Env.testing))  # type: ignore[call-arg]


@pytest.fixture
def fast() -> Passwords:
    return passwords(**FAST_ARGON2)


@pytest.mark.feature("password-hashing")
def test_default_hash_is_argon2id_with_owasp_parameters(default_passwords: Passwords) -> None:
    stored = default_passwords.hash(GOOD)
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert default_passwords.verify(stored, GOOD) == Verification(ok=True, needs_rehash=False)


@pytest.mark.feature("password-hashing")
def test_configured_parameters_are_used(fast: Passwords) -> None:
    assert fast.hash(GOOD).startswith("$argon2id$v=19$m=1024,t=1,p=1$")
    assert (
        passwords(**FAST_ARGON2, argon2_parallelism=2)
        .hash(GOOD)
        .startswith("$argon2id$v=19$m=1024,t=1,p=2$")
    )


@pytest.mark.feature("password-hashing")
def test_each_hash_is_salted(fast: Passwords) -> None:
    first, second = fast.hash(GOOD), fast.hash(GOOD)
    assert first != second
    assert fast.verify(first, GOOD).ok
    assert fast.verify(second, GOOD).ok


@pytest.mark.feature("password-hashing")
def test_verify_right_and_wrong_password(fast: Passwords) -> None:
    stored = fast.hash(GOOD)
    assert fast.verify(stored, GOOD) == Verification(ok=True, needs_rehash=False)
    assert fast.verify(stored, GOOD + "!") == Verification(ok=False)
    assert fast.verify(stored, "") == Verification(ok=False)


@pytest.mark.feature("password-hashing")
def test_unknown_user_spends_one_verification_and_fails(
    fast: Passwords, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[str] = []
    real_verify = PasswordHasher.verify

    def spy(self: PasswordHasher, hash: str | bytes, password: str | bytes) -> bool:
        checked.append(str(hash))
        return real_verify(self, hash, password)

    monkeypatch.setattr(PasswordHasher, "verify", spy)
    # Even the dummy password itself must not let an unknown user in.
    assert fast.verify(None, "dummy password for unknown users") == Verification(ok=False)
    assert fast.verify(None, GOOD) == Verification(ok=False)
    assert len(checked) == 2
    assert all(h.startswith("$argon2id$v=19$m=1024,t=1,p=1$") for h in checked)


@pytest.mark.feature("password-hashing")
@pytest.mark.parametrize("stored", ["", "not-a-hash", "$argon2id$v=19$m=1024,t=1,p=1$broken"])
def test_malformed_stored_hash_fails_closed(fast: Passwords, stored: str) -> None:
    assert fast.verify(stored, GOOD) == Verification(ok=False)


@pytest.mark.feature("password-hashing")
def test_needs_rehash_when_parameters_changed(
    fast: Passwords, default_passwords: Passwords
) -> None:
    weak = fast.hash(GOOD)
    assert default_passwords.verify(weak, GOOD) == Verification(ok=True, needs_rehash=True)
    strong = default_passwords.hash(GOOD)
    assert default_passwords.verify(strong, GOOD) == Verification(ok=True, needs_rehash=False)
    # A wrong password never asks for a rehash, whatever the parameters.
    assert default_passwords.verify(weak, "wrong password") == Verification(ok=False)


@pytest.mark.feature("password-hashing")
def test_over_length_password_is_refused_before_hashing(
    fast: Passwords, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert fast.max_length == 256
    longest = "Ab1" + "x" * 253
    fast.check_policy(longest)
    assert fast.verify(fast.hash(longest), longest).ok

    too_long = longest + "y"
    # Stored straight through the hasher (bypassing policy): still refused at sign-in.
    stored = fast.hasher.hash(too_long)
    seen: list[str] = []
    real_verify = PasswordHasher.verify

    def spy(self: PasswordHasher, hash: str | bytes, password: str | bytes) -> bool:
        seen.append(str(password))
        return real_verify(self, hash, password)

    monkeypatch.setattr(PasswordHasher, "verify", spy)
    assert fast.verify(stored, too_long) == Verification(ok=False)
    assert seen == [""]  # the over-long input never reached argon2
    with pytest.raises(WeakPasswordError, match=r"^password must be at most 256 characters$"):
        fast.check_policy(too_long)


@pytest.mark.feature("password-hashing")
def test_length_limits_follow_settings() -> None:
    custom = passwords(**FAST_ARGON2, password_min_length=12, password_max_length=20)
    with pytest.raises(WeakPasswordError, match=r"^password must be at least 12 characters$"):
        custom.check_policy("elevenchars")
    with pytest.raises(WeakPasswordError, match=r"^password must be at most 20 characters$"):
        custom.check_policy("twenty-one characters")
    custom.check_policy("twelve chars")


@pytest.mark.feature("password-hashing")
@pytest.mark.parametrize(
    ("password", "username", "message"),
    [
        ("short", "", "password must be at least 8 characters"),
        ("1234567", "", "password must be at least 8 characters"),
        ("password", "", "password is too common or too simple"),
        ("PassWord123", "", "password is too common or too simple"),
        ("aaaaaaaaaaaa", "", "password is too common or too simple"),
        ("abababababab", "", "password is too common or too simple"),
        ("abc\x00defghij", "", "password must not contain NUL characters"),
        ("AliceSmith", "alicesmith", "password must not be the username"),
        ("alicesmith", "ＡｌｉｃｅＳｍｉｔｈ", "password must not be the username"),
    ],
)
def test_policy_messages(fast: Passwords, password: str, username: str, message: str) -> None:
    with pytest.raises(WeakPasswordError) as caught:
        fast.check_policy(password, username=username)
    assert str(caught.value) == message


@pytest.mark.feature("password-hashing")
@pytest.mark.parametrize("password", [GOOD, "abc12345", "Zürich-Straße-9", "🔑🔒🗝️ key"])
def test_policy_accepts_reasonable_passwords(fast: Passwords, password: str) -> None:
    fast.check_policy(password, username="alice")  # does not raise
    assert fast.verify(fast.hash(password), password) == Verification(ok=True)


@pytest.mark.feature("password-hashing")
@pytest.mark.parametrize(
    ("username", "key"),
    [
        ("ＡＬＩＣＥ", "alice"),
        ("Alice", "alice"),
        ("  bob ", "bob"),
        ("Straße", "strasse"),
        ("ﬁnn", "finn"),
    ],
)
def test_normalize_username_folds_case_and_width(username: str, key: str) -> None:
    assert normalize_username(username) == key
    assert normalize_username(key) == key


@pytest.mark.feature("password-hashing", "nonblocking-argon2")
async def test_verify_async_runs_on_a_worker_thread(
    fast: Passwords, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = fast.hash(GOOD)
    threads: list[int] = []
    real_verify = PasswordHasher.verify

    def spy(self: PasswordHasher, hash: str | bytes, password: str | bytes) -> bool:
        threads.append(threading.get_ident())
        return real_verify(self, hash, password)

    monkeypatch.setattr(PasswordHasher, "verify", spy)
    loop_thread = threading.get_ident()
    assert await fast.verify_async(stored, GOOD) == Verification(ok=True)
    assert await fast.verify_async(None, GOOD) == Verification(ok=False)
    assert len(threads) == 2
    assert loop_thread not in threads


@pytest.mark.feature("password-hashing", "nonblocking-argon2")
async def test_hash_async_runs_on_a_worker_thread(
    fast: Passwords, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    real_hash = PasswordHasher.hash

    def spy(self: PasswordHasher, password: str | bytes, *, salt: bytes | None = None) -> str:
        threads.append(threading.get_ident())
        return real_hash(self, password, salt=salt)

    monkeypatch.setattr(PasswordHasher, "hash", spy)
    stored = await fast.hash_async(GOOD)
    assert stored.startswith("$argon2id$v=19$m=1024,t=1,p=1$")
    assert fast.verify(stored, GOOD).ok
    assert len(threads) == 1
    assert threads[0] != threading.get_ident()


@pytest.mark.feature("nonblocking-argon2")
async def test_event_loop_keeps_running_during_verification(
    fast: Passwords, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop runs code while a verification is in progress: the verification ends only
    when the loop, seeing it under way, releases it. Run on the loop's own thread, it would
    wait for a release that can never come (the loop is blocked) and fail at the guard."""
    started = threading.Event()
    release = threading.Event()

    def held(self: PasswordHasher, hash: str | bytes, password: str | bytes) -> bool:
        started.set()
        assert release.wait(timeout=10), "never released: the event loop was blocked"
        return True

    monkeypatch.setattr(PasswordHasher, "verify", held)
    monkeypatch.setattr(PasswordHasher, "check_needs_rehash", lambda self, hash: False)

    async def release_once_one_is_running() -> None:
        for _ in range(30_000):  # the loop polls, without blocking, until one is under way
            if started.is_set():
                release.set()
                return
            await asyncio.sleep(0.001)
        raise AssertionError("no verification started")

    results = await asyncio.gather(
        fast.verify_async("stored", GOOD),
        fast.verify_async("stored", GOOD),
        release_once_one_is_running(),
    )
    assert list(results[:2]) == [Verification(ok=True), Verification(ok=True)]
