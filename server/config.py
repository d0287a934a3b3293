"""Settings: one class, read from the environment (prefix ``AUTH_``) or ``.env``.

Every default is documented here, where it is defined; README.md lists them for operators.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from limits import parse_many
from pydantic import (
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationInfo,
    computed_field,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .keycrypt import EncryptionKey, KeyEncryptionError, parse_encryption_key

DEV_SECRET_KEY = "dev-insecure-secret-key-change-me-before-production"  # noqa: S105


class Env(StrEnum):
    development = "development"
    testing = "testing"
    production = "production"


class InsecureSettingsError(ValueError):
    """Raised when ``AUTH_ENV=production`` meets a setting that is not safe to serve with."""


#: The longest refresh retry window, seconds: a retry is a matter of seconds, not a session.
MAX_REFRESH_RETRY_WINDOW = 300


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AUTH_", env_file=".env", extra="ignore", frozen=True
    )

    env: Env = Env.development
    #: SQLite (aiosqlite) by default; ``postgresql+asyncpg://…`` in production.
    database_url: str = "sqlite+aiosqlite:///./data/auth.db"
    #: ``iss`` of every token and the base of every URL in the discovery documents.
    issuer: str = "http://127.0.0.1:8000"
    keys_dir: Path = Path("keys")
    #: Signs sessions and CSRF tokens of the hosted pages; production refuses the default.
    secret_key: str = DEV_SECRET_KEY

    access_token_ttl: int = Field(default=900, ge=30, le=86_400)
    refresh_token_ttl: int = Field(default=7 * 86_400, ge=60)
    #: Seconds after a rotation during which the same client presenting the token it just
    #: rotated gets the same successor again (a retry whose answer was lost), instead of the
    #: family being revoked as reuse. 0: strict, every reuse revokes. Per client: the client's
    #: ``refresh_retry_window``.
    refresh_retry_window: int = Field(default=0, ge=0, le=MAX_REFRESH_RETRY_WINDOW)
    #: Absolute cap of a refresh-token family (one sign-in), however often it rotates.
    refresh_token_max_lifetime: int = Field(default=30 * 86_400, ge=60)
    #: ``aud`` of access tokens when no RFC 8707 ``resource`` is asked for; empty = issuer.
    default_audience: str = ""
    #: RFC 8707 resource indicators clients may ask for (``resource=…``), each becoming the
    #: ``aud`` of the token; comma-separated absolute URIs. The default audience always may be.
    #: Or a JSON array whose entries are URIs or objects that also give the resource's name
    #: (shown on the consent page) and its RFC 9728 metadata URL (``resource_entries``):
    #: ``[{"resource": "https://api.example.com", "name": "Orders API", "metadata":
    #: "https://api.example.com/.well-known/oauth-protected-resource"}, "urn:example:x"]``.
    #: Read as ``resources`` (the URIs), ``resource_names`` and ``resource_metadata``.
    resources: Annotated[list[str], NoDecode] = []
    #: How often operators are expected to run ``keys rotate`` (or the servers rotate, with
    #: ``key_auto_rotate``); bounds the JWKS max-age.
    key_rotation_interval: int = Field(default=30 * 86_400, ge=60)
    #: How often a running server looks at ``keys_dir`` for a rotation (seconds).
    key_reload_interval: float = Field(default=2.0, gt=0)
    #: Where signing keys live: PEM files in ``keys_dir`` (the default), or the database
    #: (``signing_keys``), private keys sealed under ``key_encryption_key``.
    key_store: Literal["files", "database"] = "files"
    #: 32 random bytes, base64url: seals the private keys of the database store.
    key_encryption_key: str | None = Field(default=None, repr=False)
    #: The encryption key being replaced, while ``keys rewrap`` moves the rows off it: opens
    #: keys, never seals one (so replicas given the new key start before the rewrap).
    key_encryption_key_previous: str | None = Field(default=None, repr=False)
    #: The servers rotate every ``key_rotation_interval`` and prune retired keys themselves
    #: (database store; one replica at a time).
    key_auto_rotate: bool = False

    #: Dynamic client registration (RFC 7591) at ``POST /oauth2/register``: ``off``; ``token``
    #: (an initial access token from ``clients registration-token`` is required, RFC 7591 §3);
    #: ``open`` (anyone may register; rate-limited per IP).
    client_registration: Literal["off", "token", "open"] = "token"
    #: Registrations per client IP (``limits`` notation).
    rate_limit_registration_ip: str = "10/minute;100/hour"
    #: Clients whose ``client_id`` is the https URL of their metadata document
    #: (draft-ietf-oauth-client-id-metadata-document): fetched, validated and cached.
    client_metadata_documents: bool = True
    #: Fetches of client metadata documents and ``jwks_uri``: seconds for the whole fetch,
    #: largest body, and how long a document is kept when its ``Cache-Control`` does not say
    #: (its ``max-age`` is honoured between ``client_fetch_min_ttl`` and this).
    client_fetch_timeout: float = Field(default=3.0, gt=0, le=30)
    client_fetch_max_bytes: int = Field(default=65_536, ge=1024, le=1_048_576)
    client_fetch_ttl: int = Field(default=300, ge=0, le=86_400)
    client_fetch_min_ttl: int = Field(default=30, ge=0, le=3600)
    #: Development and tests only: let those fetches reach loopback addresses over http.
    #: Production refuses it (private, loopback and link-local addresses are never fetched).
    client_fetch_allow_loopback: bool = False
    #: DPoP proofs (RFC 9449 §4.3 check 11, §11.1): how many seconds old a proof's ``iat`` may
    #: be, and how far ahead of this server's clock. A proof is built just before its request,
    #: so a minute covers a slow network and a client clock somewhat behind; each ``jti`` is
    #: remembered (``AUTH_RATE_LIMIT_STORAGE``) for as long as its proof could be accepted. A
    #: few seconds ahead allows for clocks that differ a little; a proof dated further ahead
    #: would stay usable for longer than the window.
    dpop_iat_leeway: int = Field(default=60, ge=5, le=300)
    dpop_iat_future_leeway: int = Field(default=5, ge=0, le=60)
    #: RFC 9449 §8: every proof must carry a nonce this server issued (``DPoP-Nonce``), so a
    #: proof cannot be built ahead of its use. Nonces need no shared state: each is an HMAC of
    #: the current time slot under a key derived from ``AUTH_SECRET_KEY``, and a new one is
    #: issued every ``dpop_nonce_lifetime`` seconds; the previous slot's stays accepted (and
    #: the next one's, for replicas whose clocks differ a little), so a nonce lives one to two
    #: slots, and every replica with the same secret agrees.
    dpop_require_nonce: bool = False
    dpop_nonce_lifetime: int = Field(default=300, ge=30, le=3600)
    #: RFC 9126 §5: /oauth2/authorize accepts only requests pushed to /oauth2/par (a
    #: ``request_uri``), for every client; per client: ``require_pushed_authorization_requests``.
    require_par: bool = False
    #: The FAPI 2.0 Security Profile at once (README, "FAPI 2.0"): PAR, PKCE and DPoP-bound
    #: tokens for every request, ``private_key_jwt`` for every client, no password grant.
    #: Refuses to start when another setting contradicts it (``profile_problems``).
    fapi2: bool = False

    #: Lifetime of a browser sign-in on the hosted pages (the session cookie), in seconds.
    session_ttl: int = Field(default=86_400, ge=60)
    #: Whether /register lets people create their own accounts.
    registration_enabled: bool = True
    #: Second factors on the hosted pages (README, "Passkeys and second factors"): ``off``
    #: (passwords only; passkeys still sign in), ``optional`` (each person chooses), ``required``
    #: (everyone needs a one-time code app or a passkey: sent to enrol after signing in; the
    #: password grant is refused).
    mfa: Literal["off", "optional", "required"] = "optional"
    #: Lifetime of an authorization code (RFC 6749 §4.1.2: short; SPEC.md: 60 s).
    authorization_code_ttl: int = Field(default=60, ge=10, le=600)

    rate_limit_storage: str = "memory://"
    #: Redis key prefix of the counts: deployments sharing one Redis set different ones.
    rate_limit_prefix: str = Field(default="token-server", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    rate_limits_enabled: bool = True
    #: Request limits (``limits`` notation, ``;`` between tiers) on /oauth2/token and /login
    #: (``login_ip`` also counts sign-ups per address, on /register and the account API).
    rate_limit_token_ip: str = "300/minute"  # noqa: S105 (a limit, not a secret)
    rate_limit_token_client: str = "600/minute"  # noqa: S105
    rate_limit_token_account: str = "30/minute"  # noqa: S105
    rate_limit_login_ip: str = "60/minute"
    rate_limit_login_account: str = "20/minute"
    #: Authorization codes one browser session may be issued at /oauth2/authorize.
    rate_limit_authorize: str = "30/minute"
    #: Failed passwords tolerated before every attempt is refused unchecked: per (account, IP)
    #: and per account. Longer windows make the delay grow with persistence.
    throttle_account_ip: str = "5/minute;20/hour"
    throttle_account: str = "20/minute;100/hour"
    #: Wrong second factors (one-time codes, recovery codes, passkeys at the second step)
    #: tolerated per account, on top of the above: a six-digit code is guessed far sooner than
    #: a password, so the cap is absolute (NIST SP 800-63B §5.2.2: at most 100 in a row).
    throttle_second_factor: str = "10/hour;30/day"
    trusted_proxies: Annotated[list[str], NoDecode] = []

    #: argon2id parameters: OWASP's recommendation (m = 19 MiB, t = 2, p = 1).
    argon2_memory_cost: int = Field(default=19_456, ge=8)
    argon2_time_cost: int = Field(default=2, ge=1)
    argon2_parallelism: int = Field(default=1, ge=1)
    #: Password hashes computed at once per process (default: the number of cores; ``serve
    #: --workers N`` divides them among its workers).
    argon2_concurrency: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=64)
    #: Passwords longer than this are refused before hashing (hashing cost stays bounded).
    password_max_length: int = Field(default=256, ge=16, le=4096)
    password_min_length: int = Field(default=8, ge=1)

    #: Largest request body the OAuth endpoints read, in bytes.
    max_body_bytes: int = Field(default=16_384, ge=1024)
    #: PostgreSQL connections a worker keeps, and how many more it may open for a burst. No
    #: overflow by default: SQLAlchemy closes an overflow connection as soon as it is returned,
    #: so a worker serving more concurrent requests than its pool opened and dropped
    #: connections inside requests (TCP, authentication and SSL set-up each time). A burst past
    #: the pool waits up to ``db_pool_timeout`` for a pooled connection instead.
    db_pool_size: int = Field(default=20, ge=1)
    #: Seconds a process serves a client it read without reading it again (server/clients.py).
    #: On PostgreSQL a change made through the CLI or the admin API reaches every process at
    #: once (NOTIFY); the TTL bounds a lost notification and, on SQLite, a change made by
    #: another process. 0 reads the client on every request.
    client_cache_ttl: float = Field(default=5.0, ge=0, le=300)
    db_max_overflow: int = Field(default=0, ge=0)
    #: Seconds: to open a connection, to wait for a free pooled one, for one statement.
    #: A database that stops answering costs a request at most about these, never a hang.
    db_connect_timeout: float = Field(default=5.0, gt=0)
    db_pool_timeout: float = Field(default=5.0, gt=0)
    db_statement_timeout: float = Field(default=10.0, gt=0)
    #: Seconds after which a pooled PostgreSQL connection is replaced (load balancers and
    #: proxies such as PgBouncer drop idle connections on their own schedule).
    db_pool_recycle: int = Field(default=1800, ge=30)
    #: Attempts for a unit of work that lost its connection before committing (1 = no retry).
    db_retry_attempts: int = Field(default=3, ge=1, le=10)
    #: Consecutive transient failures that open the circuit breaker, and how long it stays open.
    db_breaker_threshold: int = Field(default=5, ge=1)
    db_breaker_cooldown: float = Field(default=5.0, gt=0)
    #: Seconds a SQLite writer waits for the database lock before the request gets a 503.
    sqlite_busy_timeout: float = Field(default=10.0, gt=0)
    log_level: str = "info"
    #: ``/openapi.json`` and ``/docs``: on by default except in production.
    api_docs: bool | None = None
    #: Exact origins (``https://app.example.com``) whose browser apps may call the token,
    #: revocation and userinfo endpoints, the JWKS, discovery and the account API; comma-
    #: separated. Empty (the default): no CORS at all.
    cors_origins: Annotated[list[str], NoDecode] = []

    # What AUTH_RESOURCES says of its resources besides their URIs (``_resource_details``).
    _resource_names: dict[str, str] = PrivateAttr(default_factory=dict)
    _resource_metadata: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("trusted_proxies", "cors_origins", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().startswith("["):
            return json.loads(value)
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator(
        "rate_limit_token_ip",
        "rate_limit_token_client",
        "rate_limit_token_account",
        "rate_limit_login_ip",
        "rate_limit_login_account",
        "rate_limit_authorize",
        "throttle_account_ip",
        "throttle_account",
        "throttle_second_factor",
        "rate_limit_registration_ip",
    )
    @classmethod
    def _valid_limits(cls, value: str) -> str:
        try:
            parse_many(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a rate limit like '5/minute;20/hour'") from None
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_proxies(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
        return value

    @field_validator("cors_origins")
    @classmethod
    def _exact_origins(cls, value: list[str]) -> list[str]:
        """Origins as browsers send them (Fetch §3.2: scheme, host, port; lower case): an
        entry that could never equal an ``Origin`` header is a mistake, said at start-up."""
        origins: list[str] = []
        for entry in value:
            parts = urlsplit(entry)
            if (
                parts.scheme not in ("http", "https")
                or not parts.hostname
                or "*" in entry
                or entry.endswith("/")
                or parts.path
                or parts.query
                or parts.fragment
                or parts.username is not None
            ):
                raise ValueError(
                    f"AUTH_CORS_ORIGINS: {entry!r} is not an origin such as https://app.example.com"
                )
            origins.append(entry.lower())
        return list(dict.fromkeys(origins))

    @field_validator("resources", mode="before")
    @classmethod
    def _resource_uris(cls, value: object) -> list[str]:
        return [entry.resource for entry in resource_entries(value)]

    @model_validator(mode="wrap")
    @classmethod
    def _resource_details(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        """The names and metadata URLs of ``AUTH_RESOURCES``, kept beside ``resources`` (a
        list of URIs, as everything else reads it). The field's validator has refused a bad
        value (naming the field) before they are read here."""
        settings = handler(data)
        raw = data.get("resources") if isinstance(data, dict) else None
        if raw is not None:
            entries = resource_entries(raw)
            settings._resource_names = {e.resource: e.name for e in entries if e.name}
            settings._resource_metadata = {e.resource: e.metadata for e in entries if e.metadata}
        return settings

    @field_validator("key_auto_rotate")
    @classmethod
    def _auto_rotate_needs_database(cls, value: bool, info: ValidationInfo) -> bool:
        """The files store's servers cannot agree on who rotates (nor write a read-only mounted
        directory): refused in every environment, at start-up and by every command."""
        if value and info.data.get("key_store") == "files":
            raise ValueError(
                "AUTH_KEY_AUTO_ROTATE=true needs AUTH_KEY_STORE=database (one replica at a "
                "time rotates the keys in the database): set AUTH_KEY_STORE=database and "
                "AUTH_KEY_ENCRYPTION_KEY, and move the keys there with `python -m server keys "
                "import`; or remove AUTH_KEY_AUTO_ROTATE and schedule `python -m server keys "
                "rotate` and `keys prune` yourself"
            )
        return value

    @field_validator("issuer")
    @classmethod
    def _strip_issuer(cls, value: str) -> str:
        return value.rstrip("/")

    # Computed fields: part of ``model_dump``, so two settings that name a resource differently
    # are different settings (the test suite keys its apps by the dump).
    @computed_field  # type: ignore[prop-decorator]
    @property
    def resource_names(self) -> dict[str, str]:
        """AUTH_RESOURCES' names, by resource URI: those the operator gave."""
        return dict(self._resource_names)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def resource_metadata(self) -> dict[str, str]:
        """AUTH_RESOURCES' RFC 9728 metadata URLs, by resource URI."""
        return dict(self._resource_metadata)

    @property
    def docs_enabled(self) -> bool:
        return self.env is not Env.production if self.api_docs is None else self.api_docs

    @property
    def audience(self) -> str:
        return self.default_audience or self.issuer

    @property
    def audiences(self) -> frozenset[str]:
        """Every ``aud`` we issue tokens for: introspection and revocation accept them all."""
        return frozenset([self.audience, *self.resources])

    @property
    def secure_cookies(self) -> bool:
        """Cookies get ``Secure`` and the ``__Host-`` prefix when the issuer is https."""
        return self.issuer.startswith("https://")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def jwks_max_age(self) -> int:
        """A cached JWKS must never outlive the *next* key's time as next.

        The next key is published one full rotation interval before it signs, so any max-age
        shorter than the interval guarantees a cached JWKS holds the signing key; a tenth of
        it (capped at one hour) leaves a wide margin for late or manual rotations.
        """
        return max(1, min(3600, self.key_rotation_interval // 10))

    def insecure_reasons(self) -> list[str]:
        """Every reason this configuration must not serve production traffic, with its fix."""
        reasons: list[str] = []
        if not self.issuer.startswith("https://"):
            reasons.append(
                f"AUTH_ISSUER={self.issuer!r} is not https: set it to the public https URL"
            )
        if _weak_secret(self.secret_key):
            reasons.append(
                "AUTH_SECRET_KEY is the development default, shorter than 32 characters or not "
                "random (fewer than 16 distinct characters, or only whitespace): "
                "set it to a random value, e.g. the output of "
                '`python -c "import secrets; print(secrets.token_urlsafe(48))"`'
            )
        if self.key_store == "database":
            problem = self.key_encryption_problem()
            if problem:
                reasons.append(problem)
        elif not any(self.keys_dir.glob("*.pem")):
            reasons.append(
                f"no signing keys in AUTH_KEYS_DIR={str(self.keys_dir)!r}: "
                "run `python -m server keys rotate` to create them"
            )
        plain = [origin for origin in self.cors_origins if origin.startswith("http://")]
        if plain:
            reasons.append(
                f"AUTH_CORS_ORIGINS has http origins ({', '.join(plain)}): a network attacker "
                "could serve a page there; list https origins only"
            )
        plain = [url for url in self._resource_metadata.values() if url.startswith("http://")]
        if plain:
            reasons.append(
                f"AUTH_RESOURCES has http metadata URLs ({', '.join(plain)}): a network attacker "
                "could change the names shown on the consent page; use https URLs only"
            )
        if self.client_fetch_allow_loopback:
            reasons.append(
                "AUTH_CLIENT_FETCH_ALLOW_LOOPBACK is on: client metadata documents and jwks_uri "
                "could be fetched from this host's own services; remove it"
            )
        if self.argon2_memory_cost < 19_456 or self.argon2_time_cost < 2:
            reasons.append(
                "AUTH_ARGON2_MEMORY_COST/AUTH_ARGON2_TIME_COST are below OWASP's minimum "
                "(19456 KiB, 2): remove them to use the defaults"
            )
        return reasons

    def key_encryption_problem(self) -> str | None:
        """Why the database key store cannot seal or open keys with these settings."""
        try:
            self.key_encryption()
        except KeyEncryptionError as exc:
            return f"AUTH_KEY_STORE=database: {exc}"
        return None

    def key_encryption(self) -> tuple[EncryptionKey, EncryptionKey | None]:
        """``AUTH_KEY_ENCRYPTION_KEY`` and ``AUTH_KEY_ENCRYPTION_KEY_PREVIOUS`` (if set), or
        ``KeyEncryptionError`` naming the setting and the fix."""
        current = parse_encryption_key(self.key_encryption_key)
        previous = None
        if self.key_encryption_key_previous:
            previous = parse_encryption_key(
                self.key_encryption_key_previous, setting="AUTH_KEY_ENCRYPTION_KEY_PREVIOUS"
            )
        return current, previous

    @property
    def signing_alg(self) -> str:
        """The algorithm of access and ID tokens: RS256, or PS256 (same RSA keys) under
        ``AUTH_FAPI2`` (FAPI 2.0 Security Profile §5.4.1 allows PS256, ES256, EdDSA)."""
        return "PS256" if self.fapi2 else "RS256"

    def profile_problems(self) -> list[str]:
        """Why ``AUTH_FAPI2`` cannot hold with the other settings, each with its fix."""
        if not self.fapi2:
            return []
        problems: list[str] = []
        if self.authorization_code_ttl > 60:
            # FAPI 2.0 Security Profile §5.3.2.1 item 11.
            problems.append(
                f"AUTH_AUTHORIZATION_CODE_TTL={self.authorization_code_ttl} is over the 60 s "
                "FAPI 2.0 allows: remove it to use the default"
            )
        if self.env is Env.production and not self.issuer.startswith("https://"):
            problems.append(
                "AUTH_ISSUER is not https, which FAPI 2.0 requires: set it to the public https URL"
            )
        if self.env is Env.production and self.rate_limit_storage.startswith("memory"):
            # DPoP proofs' and client assertions' jti must be refused across replicas.
            problems.append(
                "AUTH_RATE_LIMIT_STORAGE is memory://: a DPoP proof or client assertion "
                "replayed to another replica would be accepted; set it to a redis:// URL"
            )
        return problems

    def check_profile(self) -> None:
        problems = self.profile_problems()
        if problems:
            raise InsecureSettingsError(
                "refusing to start with AUTH_FAPI2:\n  - " + "\n  - ".join(problems)
            )

    def check_production(self) -> None:
        if self.env is Env.production:
            reasons = self.insecure_reasons()
            if reasons:
                raise InsecureSettingsError(
                    "refusing to start in production:\n  - " + "\n  - ".join(reasons)
                )


#: The longest name of a resource (AUTH_RESOURCES, or an RFC 9728 ``resource_name``).
MAX_RESOURCE_NAME = 100
MAX_METADATA_URL = 2048
RESOURCE_MEMBERS = ("resource", "name", "metadata")
RESOURCES_FORM = (
    "comma-separated URIs, or a JSON array of URIs and objects with the members "
    "resource, name and metadata"
)


@dataclass(frozen=True)
class ResourceEntry:
    """One entry of ``AUTH_RESOURCES``."""

    resource: str
    #: What the consent page calls it; None: its metadata's ``resource_name``, else its URI.
    name: str | None = None
    #: RFC 9728: the URL of its protected-resource metadata document.
    metadata: str | None = None


def resource_entries(value: object) -> list[ResourceEntry]:
    """``AUTH_RESOURCES``, in order: comma-separated URIs, or a JSON array of URIs and objects
    (``{"resource": …, "name": …, "metadata": …}``); a list of the same, given directly.
    A URI listed twice counts once; listed twice when one of them is an object (which of
    its details would hold?), it is refused. Raises ``ValueError`` naming the setting."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"AUTH_RESOURCES: not valid JSON; give {RESOURCES_FORM}") from None
    elif isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        raise ValueError(f"AUTH_RESOURCES: give {RESOURCES_FORM}")
    entries: dict[str, ResourceEntry] = {}
    detailed: set[str] = set()
    for item in value:
        if isinstance(item, str):
            entry = ResourceEntry(_resource_uri(item))
        elif isinstance(item, dict):
            entry = _resource_object(item)
        else:
            raise ValueError(
                f"AUTH_RESOURCES: an entry is not a URI or an object; give {RESOURCES_FORM}"
            )
        if entry.resource in entries:
            if isinstance(item, dict) or entry.resource in detailed:
                raise ValueError(f"AUTH_RESOURCES: {entry.resource!r} is listed more than once")
            continue
        if isinstance(item, dict):
            detailed.add(entry.resource)
        entries[entry.resource] = entry
    return list(entries.values())


def _resource_uri(entry: str) -> str:
    """RFC 8707 §2: a resource is an absolute URI (RFC 3986 §4.3: a scheme, so URNs too)
    without a fragment. Compared as exact strings, as ``aud`` is (RFC 7519 §4.1.3)."""
    if not urlsplit(entry).scheme or "#" in entry or any(c.isspace() for c in entry):
        raise ValueError(
            f"AUTH_RESOURCES: {entry!r} is not an absolute URI such as "
            "https://api.example.com (RFC 8707 §2: no fragment)"
        )
    return entry


def _resource_object(item: dict[Any, Any]) -> ResourceEntry:
    unknown = sorted(str(key) for key in item if key not in RESOURCE_MEMBERS)
    if unknown:
        raise ValueError(
            f"AUTH_RESOURCES: unknown member {unknown[0]!r}; an object has only "
            + ", ".join(RESOURCE_MEMBERS)
        )
    resource = item.get("resource")
    if not isinstance(resource, str):
        raise ValueError("AUTH_RESOURCES: each object needs a 'resource', its URI as a string")
    resource = _resource_uri(resource)
    name, metadata = item.get("name"), item.get("metadata")
    if name is not None:
        name = resource_name(name)
        if name is None:
            raise ValueError(
                f"AUTH_RESOURCES: the name of {resource!r} must be text of 1 to "
                f"{MAX_RESOURCE_NAME} printable characters"
            )
    if metadata is not None and not _metadata_url(metadata):
        raise ValueError(
            f"AUTH_RESOURCES: the metadata of {resource!r} must be an absolute https URL "
            "without a fragment, such as "
            "https://api.example.com/.well-known/oauth-protected-resource"
        )
    return ResourceEntry(resource, name, metadata)


def resource_name(value: object) -> str | None:
    """``value`` as a name to show for a resource (spaces at either end dropped), or None
    when it is not one: text of 1 to ``MAX_RESOURCE_NAME`` printable characters (no
    control, format or unassigned characters, no lone surrogates, no line breaks)."""
    if not isinstance(value, str):
        return None
    name = value.strip()
    if not 0 < len(name) <= MAX_RESOURCE_NAME or not name.isprintable():
        return None
    return name


def _metadata_url(url: object) -> bool:
    """An absolute http(s) URL with a host and no fragment or user information (plain http
    is refused in production by ``insecure_reasons``, as the fetcher refuses it there)."""
    if not isinstance(url, str) or len(url) > MAX_METADATA_URL or not url.isprintable():
        return False
    if any(c.isspace() for c in url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a port out of range)
    except ValueError:
        return False
    return (
        parts.scheme in ("https", "http")
        and bool(parts.hostname)
        and "@" not in parts.netloc
        and "#" not in url
    )


# A random secret of 32+ characters from a 64-symbol alphabet (token_urlsafe) has far more than
# 16 distinct characters; fewer means a pattern a person typed ("aaaa…", "abab…", spaces), whose
# entropy is a few bits whatever its length. A heuristic floor, not an entropy estimate
# (OWASP ASVS 4.0 V6.2/V6.4 ask for secrets from a CSPRNG, which this cannot prove).
SECRET_MIN_LENGTH = 32
SECRET_MIN_DISTINCT = 16


def _weak_secret(secret: str) -> bool:
    return (
        secret == DEV_SECRET_KEY
        or len(secret) < SECRET_MIN_LENGTH
        or not secret.strip()
        or len(set(secret)) < SECRET_MIN_DISTINCT
    )
