"""Settings (SPEC.md "Operator contract"): defaults, ``AUTH_*`` variables, the production guard."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from server.config import DEV_SECRET_KEY, Env, InsecureSettingsError, Settings
from server.main import create_app

# 48 characters, all distinct, not the development default (a fixed token_urlsafe(36)).
STRONG_SECRET = "q7Zr2LxW9mPb4TnV8cKd1HyF6sJg3RaE0uMwXo5BkQ_e-NhC"

ISSUER_REASON = "AUTH_ISSUER='http://127.0.0.1:8000' is not https: set it to the public https URL"
# Each reason names the setting and says how to fix it; the fixes' wording may evolve.
SECRET_REASON = (
    "AUTH_SECRET_KEY is the development default, shorter than 32 characters or not random "
    "(fewer than 16 distinct characters, or only whitespace): "
)
SECRET_FIX = "secrets.token_urlsafe(48)"
# 18 distinct Unicode whitespace characters (str.isspace).
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
ARGON2_REASON = (
    "AUTH_ARGON2_MEMORY_COST/AUTH_ARGON2_TIME_COST are below OWASP's minimum (19456 KiB, 2): "
)
ARGON2_FIX = "remove them to use the defaults"


def keys_reason(directory: Path) -> str:
    return (
        f"no signing keys in AUTH_KEYS_DIR={str(directory)!r}: "
        "run `python -m server keys rotate` to create them"
    )


@pytest.fixture(autouse=True)
def no_auth_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings must come from the test alone, not from the environment of the run."""
    for name in list(os.environ):
        if name.startswith("AUTH_"):
            monkeypatch.delenv(name)


def production(keys_dir: Path, **overrides: Any) -> Settings:
    """Production settings that pass the guard, with ``overrides`` applied."""
    values: dict[str, Any] = {
        "env": "production",
        "issuer": "https://auth.example.com",
        "secret_key": STRONG_SECRET,
        "keys_dir": keys_dir,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.mark.feature("settings")
def test_defaults_match_the_specification() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.env is Env.development
    assert settings.database_url == "sqlite+aiosqlite:///./data/auth.db"
    assert settings.issuer == "http://127.0.0.1:8000"
    assert settings.keys_dir == Path("keys")
    assert settings.access_token_ttl == 900
    assert settings.refresh_token_ttl == 7 * 86_400
    assert settings.refresh_token_max_lifetime == 30 * 86_400
    assert settings.default_audience == ""
    assert settings.audience == "http://127.0.0.1:8000"
    assert settings.rate_limit_storage == "memory://"
    assert settings.trusted_proxies == []
    assert settings.rate_limits_enabled is True
    assert settings.secret_key == DEV_SECRET_KEY
    assert (settings.argon2_memory_cost, settings.argon2_time_cost) == (19_456, 2)
    assert settings.argon2_parallelism == 1
    assert settings.is_sqlite is True


@pytest.mark.feature("settings")
def test_environment_variables_with_auth_prefix_are_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    environment = {
        "AUTH_ENV": "testing",
        "AUTH_DATABASE_URL": "postgresql+asyncpg://auth@db.internal/auth",
        "AUTH_ISSUER": "https://auth.example.com",
        "AUTH_KEYS_DIR": str(tmp_path),
        "AUTH_ACCESS_TOKEN_TTL": "600",
        "AUTH_REFRESH_TOKEN_TTL": "3600",
        "AUTH_REFRESH_TOKEN_MAX_LIFETIME": "86400",
        "AUTH_DEFAULT_AUDIENCE": "https://api.example.com",
        "AUTH_RATE_LIMIT_STORAGE": "redis://cache:6379/0",
        "AUTH_RATE_LIMITS_ENABLED": "false",
        "AUTH_TRUSTED_PROXIES": "10.0.0.1, 192.168.0.0/16 ,,",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.env is Env.testing
    assert settings.database_url == "postgresql+asyncpg://auth@db.internal/auth"
    assert settings.is_sqlite is False
    assert settings.issuer == "https://auth.example.com"
    assert settings.keys_dir == tmp_path
    assert settings.access_token_ttl == 600
    assert settings.refresh_token_ttl == 3600
    assert settings.refresh_token_max_lifetime == 86_400
    assert settings.audience == "https://api.example.com"
    assert settings.rate_limit_storage == "redis://cache:6379/0"
    assert settings.rate_limits_enabled is False
    assert settings.trusted_proxies == ["10.0.0.1", "192.168.0.0/16"]


@pytest.mark.feature("settings")
def test_env_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("AUTH_ACCESS_TOKEN_TTL=120\nAUTH_ISSUER=https://e.example/\n")
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.access_token_ttl == 120
    assert settings.issuer == "https://e.example"


@pytest.mark.feature("settings")
def test_trusted_proxies_accepts_a_list_too() -> None:
    settings = Settings(_env_file=None, trusted_proxies=["10.0.0.1"])  # type: ignore[call-arg]
    assert settings.trusted_proxies == ["10.0.0.1"]


@pytest.mark.feature("settings")
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://auth.example.com/", "https://auth.example.com"),
        ("https://auth.example.com/tenant//", "https://auth.example.com/tenant"),
        ("https://auth.example.com", "https://auth.example.com"),
    ],
)
def test_issuer_trailing_slash_is_stripped(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: str
) -> None:
    monkeypatch.setenv("AUTH_ISSUER", raw)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.issuer == expected
    assert settings.audience == expected


@pytest.mark.feature("settings")
@pytest.mark.parametrize(
    ("interval", "max_age"), [(60, 6), (3600, 360), (86_400, 3600), (30 * 86_400, 3600)]
)
def test_jwks_max_age_is_shorter_than_the_rotation_interval(interval: int, max_age: int) -> None:
    settings = Settings(_env_file=None, key_rotation_interval=interval)  # type: ignore[call-arg]
    assert settings.jwks_max_age == max_age
    assert 0 < settings.jwks_max_age < settings.key_rotation_interval


@pytest.mark.feature("settings")
@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("AUTH_ACCESS_TOKEN_TTL", "abc", "unable to parse string as an integer"),
        ("AUTH_ACCESS_TOKEN_TTL", "10", "greater than or equal to 30"),
        ("AUTH_ENV", "staging", "'development', 'testing' or 'production'"),
        ("AUTH_RATE_LIMITS_ENABLED", "maybe", "valid boolean"),
    ],
)
def test_invalid_values_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)  # type: ignore[call-arg]
    errors = caught.value.errors()
    assert [error["loc"] for error in errors] == [(name.removeprefix("AUTH_").lower(),)]
    assert message in errors[0]["msg"]


@pytest.mark.feature("settings")
def test_settings_are_frozen() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        settings.issuer = "https://other.example"
    assert settings.issuer == "http://127.0.0.1:8000"


@pytest.mark.feature("production-guard")
def test_production_guard_names_every_insecure_setting(tmp_path: Path) -> None:
    empty = tmp_path / "no-keys"
    empty.mkdir()
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, env=Env.production, keys_dir=empty, argon2_memory_cost=1024
    )
    with pytest.raises(InsecureSettingsError) as caught:
        settings.check_production()
    header, *reasons = str(caught.value).split("\n")
    assert header == "refusing to start in production:"
    assert len(reasons) == 4
    assert reasons[0] == "  - " + ISSUER_REASON
    assert reasons[1].startswith("  - " + SECRET_REASON)
    assert SECRET_FIX in reasons[1]
    assert reasons[2] == "  - " + keys_reason(empty)
    assert reasons[3].startswith("  - " + ARGON2_REASON)
    assert ARGON2_FIX in reasons[3]


@pytest.mark.feature("production-guard")
@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"issuer": "http://auth.example.com"}, "AUTH_ISSUER='http://auth.example.com' is not"),
        ({"secret_key": DEV_SECRET_KEY}, SECRET_REASON),
        ({"secret_key": "x" * 31}, SECRET_REASON),
        ({"secret_key": " " * 32}, SECRET_REASON),
        ({"secret_key": "ab" * 24}, SECRET_REASON),
        ({"secret_key": "0123456789abcd" * 4}, SECRET_REASON),
        # 18 distinct Unicode whitespace characters, twice: enough distinct, no entropy.
        ({"secret_key": WHITESPACE * 2}, SECRET_REASON),
        ({"argon2_memory_cost": 19_455}, ARGON2_REASON),
        ({"argon2_time_cost": 1}, ARGON2_REASON),
    ],
    ids=[
        "http-issuer",
        "default-secret",
        "short-secret",
        "spaces-secret",
        "two-character-secret",
        "fourteen-character-secret",
        "whitespace-secret",
        "low-memory",
        "low-time",
    ],
)
def test_production_guard_names_the_one_insecure_setting(
    keys_dir: Path, overrides: dict[str, Any], reason: str
) -> None:
    settings = production(keys_dir, **overrides)
    assert len(settings.insecure_reasons()) == 1
    assert settings.insecure_reasons()[0].startswith(reason)
    with pytest.raises(InsecureSettingsError, match=r"^refusing to start in production:\n  - "):
        settings.check_production()


@pytest.mark.feature("production-guard")
def test_production_guard_wants_pem_files_in_the_keys_dir(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    settings = production(missing)
    assert settings.insecure_reasons() == [keys_reason(missing)]
    (tmp_path / "manifest-only").mkdir()
    (tmp_path / "manifest-only" / "keys.json").write_text('{"keys": []}')
    assert production(tmp_path / "manifest-only").insecure_reasons() == [
        keys_reason(tmp_path / "manifest-only")
    ]


@pytest.mark.feature("production-guard")
def test_production_guard_passes_secure_settings(keys_dir: Path) -> None:
    settings = production(keys_dir)
    assert settings.insecure_reasons() == []
    settings.check_production()  # does not raise


@pytest.mark.feature("production-guard")
@pytest.mark.parametrize("env", ["development", "testing"])
def test_guard_only_applies_to_production(tmp_path: Path, env: str) -> None:
    settings = Settings(_env_file=None, env=Env(env), keys_dir=tmp_path)  # type: ignore[call-arg]
    assert len(settings.insecure_reasons()) == 3  # http issuer, dev secret, no keys
    settings.check_production()  # does not raise


@pytest.mark.feature("production-guard", "app-factory")
def test_create_app_refuses_insecure_production_settings(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, env=Env.production, keys_dir=tmp_path)  # type: ignore[call-arg]
    with pytest.raises(InsecureSettingsError) as caught:
        create_app(settings)
    message = str(caught.value)
    assert ISSUER_REASON in message
    assert SECRET_REASON in message
    assert keys_reason(tmp_path) in message


@pytest.mark.feature("production-guard", "app-factory")
async def test_create_app_accepts_secure_production_settings(keys_dir: Path) -> None:
    app = create_app(production(keys_dir))
    assert isinstance(app, FastAPI)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as http:
        response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
