"""``python -m server …``: the operator's command line (SPEC.md, "Operator contract").

Every failure is one line on stderr starting with ``error:`` and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import ipaddress
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from . import check, factors, manage
from .client_metadata import MAX_JWKS_BYTES
from .config import Env, InsecureSettingsError, Settings
from .db import (
    InsecureDatabaseFileError,
    SchemaNotAtHeadError,
    SchemaState,
    alembic_config,
    assert_schema_compatible,
    create_engine,
    schema_state,
    session_factory,
)
from .keycrypt import EncryptionKey, KeyEncryptionError, parse_encryption_key
from .keys import KeyInfo, KeyStore, KeysUnavailableError, PruneResult, RotationTooSoonError
from .keys_db import DatabaseKeyStore, KeyStoreConflictError
from .names import CLIENT_AUTH_METHODS
from .observability import audit, configure_logging
from .passwords import Passwords

T = TypeVar("T")
#: A ``--jwks-file`` read at most this far (its JWK Set is then limited to ``MAX_JWKS_BYTES``
#: serialised; whitespace of a pretty-printed file is allowed for).
MAX_JWKS_FILE_BYTES = 4 * MAX_JWKS_BYTES


class CommandError(Exception):
    """Ends the command with ``error: <message>`` and exit status 1."""


def _database_problem(database_url: str, exc: BaseException) -> str:
    """One line on a database that cannot be opened or reached: which one (never its
    password), why, and what to check."""
    url = make_url(database_url)
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        reason = str(exc.orig) or type(exc.orig).__name__
    else:
        reason = str(exc) or type(exc).__name__
    reason = reason.strip().splitlines()[0] if reason.strip() else type(exc).__name__
    if url.password:
        reason = reason.replace(str(url.password), "***")
    if url.get_backend_name() == "sqlite":
        return (
            f"cannot open the SQLite database {url.database}: {reason}; check that its "
            "directory exists or can be created, and that this user may write there"
        )
    where = f"{url.host or 'localhost'}:{url.port or 5432}"
    return (
        f"cannot use the {url.get_backend_name()} database {url.database} on {where} "
        f"as {url.username}: {reason}; check that the server runs and accepts connections "
        "there, and the host, port, database, user and password in AUTH_DATABASE_URL"
    )


@contextlib.contextmanager
def _opening_database(settings: Settings) -> Iterator[None]:
    """Turn a database that cannot be opened or reached into one ``error:`` line."""
    try:
        yield
    except (DBAPIError, OSError) as exc:
        raise CommandError(_database_problem(settings.database_url, exc)) from None


def _run_db(settings: Settings, action: Callable[[AsyncSession], Awaitable[T]]) -> T:
    async def runner() -> T:
        with _opening_database(settings):
            engine = create_engine(settings)
        try:
            with _opening_database(settings):
                await assert_schema_compatible(engine)  # the first connection
            async with session_factory(engine)() as db:
                result = await action(db)
                await db.commit()
                return result
        finally:
            await engine.dispose()

    return asyncio.run(runner())


def _read_jwks(path: str) -> Any:
    """The JSON of a ``--jwks-file`` (checked as a JWK Set by ``manage``)."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_JWKS_FILE_BYTES + 1)
    except OSError as exc:
        raise CommandError(f"cannot read --jwks-file: {exc.strerror or exc}") from None
    if len(data) > MAX_JWKS_FILE_BYTES:
        raise CommandError(f"--jwks-file is larger than {MAX_JWKS_FILE_BYTES} bytes")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise CommandError('--jwks-file is not JSON (a JWK Set: {"keys": [...]})') from None


def _read_password() -> str:
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
    else:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
    if not password:
        raise CommandError("no password on standard input (use --password-stdin with a pipe)")
    return password


def _when(stamp: int | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(stamp))


# -- commands ------------------------------------------------------------------------


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or a wildcard: reachable from elsewhere


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    if settings.env is Env.production and not _loopback(args.host) and not settings.trusted_proxies:
        # uvicorn bounds neither the size of request headers nor the time a client may take
        # to send them: on an address others can reach, production serves behind a proxy that
        # does (deploy/nginx/token-server.conf), and AUTH_TRUSTED_PROXIES names that proxy.
        raise CommandError(
            f"refusing to listen on {args.host} in production without a proxy in front: "
            "put deploy/nginx/token-server.conf (or another proxy that limits request headers "
            "and their timing) in front and name it in AUTH_TRUSTED_PROXIES, or serve on "
            "127.0.0.1 behind a proxy on the same host"
        )
    if settings.env is not Env.production and settings.key_store == "files":
        KeyStore(settings.keys_dir).ensure()
    _preflight(settings)
    # The workers share the cores: unless told otherwise, each hashes on its share of them.
    cores = os.cpu_count() or 1
    os.environ.setdefault("AUTH_ARGON2_CONCURRENCY", str(max(1, cores // max(1, args.workers))))
    uvicorn.run(
        "server.main:app_factory",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=30,
    )
    return 0


def _preflight(settings: Settings) -> None:
    async def check() -> None:
        engine = create_engine(settings)
        try:
            await assert_schema_compatible(engine)
        finally:
            await engine.dispose()

    with _opening_database(settings):
        asyncio.run(check())
    if settings.key_store == "database":

        async def load(store: DatabaseKeyStore) -> None:
            if settings.env is not Env.production:
                await store.ensure()
            await store.areload()  # the current key opens with this encryption key

        _run_keys(settings, load)
    else:
        KeyStore(settings.keys_dir).load()


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from alembic import command

    async def current() -> SchemaState:
        engine = create_engine(settings)  # creates the SQLite directory if needed
        try:
            return await schema_state(engine)
        finally:
            await engine.dispose()

    with _opening_database(settings):
        state = asyncio.run(current())
        if state.ahead:
            # Migrated by a newer release: nothing this one can do (Alembic would not find the
            # revision). A rollback's migrate job succeeds if this release runs on it.
            if not state.runs:
                raise SchemaNotAtHeadError(state.problem())
            print(
                f"database schema is at {state.revision}, ahead of this release ({state.head}) "
                "and compatible with it: nothing to migrate"
            )
            return 0
        # On PostgreSQL, migrations/env.py holds an advisory lock: a concurrent run waits for
        # it, then finds the schema at head.
        command.upgrade(alembic_config(settings.database_url), "head")
    print("database schema is at head")
    return 0


def cmd_copy_from(settings: Settings, args: argparse.Namespace) -> int:
    """Copy a whole database (the SQLite default, say) into AUTH_DATABASE_URL's, empty one."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from .dbcopy import CopyRefusedError, copy_database

    async def run() -> dict[str, int]:
        source = create_async_engine(args.source_url)
        target = create_engine(settings)
        try:
            return await copy_database(source, target)
        finally:
            await source.dispose()
            await target.dispose()

    try:
        copied = asyncio.run(run())
    except CopyRefusedError as exc:
        raise CommandError(str(exc)) from None
    for table, count in copied.items():
        print(f"{table}: {count}")
    audit("database.copied", rows=sum(copied.values()))
    return 0


def _run_keys(settings: Settings, action: Callable[[DatabaseKeyStore], Awaitable[T]]) -> T:
    """``action`` on the database key store (``AUTH_KEY_STORE=database``)."""
    encryption, previous = settings.key_encryption()

    async def runner() -> T:
        with _opening_database(settings):
            engine = create_engine(settings)
        try:
            with _opening_database(settings):
                await assert_schema_compatible(engine)
            store = DatabaseKeyStore(engine, encryption, settings.signing_alg, previous=previous)
            try:
                return await action(store)
            except (DBAPIError, TimeoutError) as exc:
                # Never the statement and its parameters (sealed keys): what failed, and why.
                cause = exc.orig if isinstance(exc, DBAPIError) else exc
                detail = str(cause).splitlines()[0] if str(cause) else "timed out"
                raise CommandError(
                    f"the database refused the key operation ({type(cause).__name__}: "
                    f"{detail}); another key write may hold the keys' lock (a hung `keys` "
                    "command or session): retry, or end that session"
                ) from None
        finally:
            await engine.dispose()

    return asyncio.run(runner())


def _read_old_key(path: str) -> EncryptionKey:
    """The encryption key being replaced, given once: from a file, or ``-`` for stdin."""
    try:
        value = sys.stdin.read(1024) if path == "-" else Path(path).read_text()[:1024]
    except OSError as exc:
        raise CommandError(f"cannot read --old-key-file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CommandError("--old-key-file is not text: it holds the key in base64url") from None
    return parse_encryption_key(value, setting="--old-key-file")


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    database = settings.key_store == "database"
    if args.keys_command in ("import", "rewrap") and not database:
        raise CommandError(
            f"`keys {args.keys_command}` works on the database store: set "
            "AUTH_KEY_STORE=database and AUTH_KEY_ENCRYPTION_KEY"
        )
    if args.keys_command == "import":
        files = KeyStore(settings.keys_dir)
        imported, present = _run_keys(settings, lambda db: db.import_files(files))
        for kid in imported:
            print(f"imported {kid}")
        for kid in present:
            print(f"already there: {kid}")
        audit("key.imported", kids=imported, source=str(settings.keys_dir))
        print(f"the files in {settings.keys_dir} are no longer used: delete them when you wish")
        return 0
    if args.keys_command == "rewrap":
        old = _read_old_key(args.old_key_file)
        done, left = _run_keys(settings, lambda db: db.rewrap(old))
        for kid in done:
            print(f"rewrapped {kid}")
        new_id = parse_encryption_key(settings.key_encryption_key).id
        audit("key.rewrapped", kids=done, old_key_id=old.id, encryption_key_id=new_id)
        print(f"{len(done)} keys sealed anew, {len(left)} were already under the new key")
        return 0
    files = KeyStore(settings.keys_dir)

    def rotate(min_age: int) -> list[KeyInfo]:
        if database:
            return _run_keys(settings, lambda db: db.arotate(min_next_age=min_age))
        return files.rotate(min_next_age=min_age)

    def prune(ttl: int) -> PruneResult:
        if database:
            return _run_keys(settings, lambda db: db.aprune(max_token_lifetime=ttl))
        return files.prune(max_token_lifetime=ttl)

    if args.keys_command == "rotate":
        infos = rotate(0 if args.force else settings.jwks_max_age)
        current = next(info.kid for info in infos if info.state == "current")
        audit("key.rotated", kid=current)
        print(f"rotated: {current} now signs")
    elif args.keys_command == "prune":
        pruned = prune(settings.access_token_ttl)
        for kid in pruned.removed:
            print(f"removed {kid}")
        for reason in pruned.kept:
            print(f"kept {reason}")
        for name in pruned.orphans:
            print(f"removed {name}: keys.json does not list it (left by an interrupted rotation)")
        if not pruned.removed and not pruned.kept:
            print("no retired keys")
        return 0
    infos = _run_keys(settings, lambda db: db.alist()) if database else files.read_manifest()
    if not infos:
        where = "the database" if database else settings.keys_dir
        print(f"no keys in {where}: run `python -m server keys rotate`")
        return 0
    print(f"{'KID':<45} {'STATE':<8} {'CREATED':<21} {'ACTIVATED':<21} RETIRED")
    for info in infos:
        print(
            f"{info.kid:<45} {info.state:<8} {_when(info.created_at):<21} "
            f"{_when(info.activated_at):<21} {_when(info.retired_at)}"
        )
    return 0


def cmd_tokens(settings: Settings, args: argparse.Namespace) -> int:
    pruned = _run_db(
        settings,
        lambda db: manage.prune_tokens(
            db,
            access_token_ttl=settings.access_token_ttl,
            authorization_code_ttl=settings.authorization_code_ttl,
        ),
    )
    print(
        f"deleted {pruned.families} ended sign-ins (with their refresh tokens), "
        f"{pruned.revoked_access_tokens} expired access-token revocations, "
        f"{pruned.authorization_codes} expired authorization codes, "
        f"{pruned.browser_sessions} ended browser sessions and "
        f"{pruned.pushed_requests} expired pushed authorization requests"
    )
    return 0


def cmd_clients(settings: Settings, args: argparse.Namespace) -> int:
    sub = args.clients_command
    if sub == "create":
        jwks = _read_jwks(args.jwks_file) if args.jwks_file is not None else None
        created = _run_db(
            settings,
            lambda db: manage.create_client(
                db,
                client_id=args.client_id,
                public=args.public,
                admin=args.admin,
                resource_server=args.resource_server,
                grants=args.grant,
                scope=args.scope,
                redirect_uris=args.redirect_uri,
                name=args.name,
                first_party=args.first_party,
                post_logout_redirect_uris=args.post_logout_redirect_uri,
                refresh_retry_window=args.refresh_retry_window,
                auth_method=args.auth_method,
                jwks=jwks,
                jwks_uri=args.jwks_uri,
                resources=args.resource,
                dpop_bound=args.dpop_bound,
                require_par=args.require_par,
                settings=settings,
            ),
        )
        if args.json:
            print(
                json.dumps({**manage.client_view(created.client), "client_secret": created.secret})
            )
        else:
            print(f"created client {created.client.client_id}")
            if created.secret is not None:
                print(f"client_secret: {created.secret}")
                print("(shown once: store it now, only its hash is kept)")
        return 0
    if sub == "list":
        clients = _run_db(settings, manage.list_clients)
        if args.json:
            print(json.dumps([manage.client_view(c) for c in clients]))
        for c in [] if args.json else clients:
            kind = "public" if c.is_public else "confidential"
            print(f"{c.client_id:<30} {kind:<12} {c.grant_types:<45} {c.scope}")
        return 0
    if sub == "show":
        client = _run_db(settings, lambda db: manage.get_client(db, args.client_id))
        print(json.dumps(manage.client_view(client), indent=2))
        return 0
    if sub == "registration-token":
        issued = _run_db(settings, lambda db: manage.create_registration_token(db, ttl=args.ttl))
        if args.json:
            print(json.dumps({"token": issued.token, "expires_at": issued.expires_at}))
        else:
            print(f"initial access token: {issued.token}")
            print(f"expires: {_when(issued.expires_at)}")
            print(
                "(shown once, only its hash is kept; send it as 'Authorization: Bearer …' to "
                "POST /oauth2/register)"
            )
        return 0
    if sub == "delete":
        _run_db(settings, lambda db: manage.delete_client(db, args.client_id))
        print(f"deleted client {args.client_id} and every token family it held")
        return 0
    secret = _run_db(
        settings, lambda db: manage.rotate_client_secret(db, args.client_id, settings=settings)
    )
    if args.json:
        print(json.dumps({"client_id": args.client_id, "client_secret": secret}))
    else:
        print(f"client_secret: {secret}")
        print("(shown once; the previous secret no longer works)")
    return 0


def cmd_users(settings: Settings, args: argparse.Namespace) -> int:
    sub = args.users_command
    if sub == "create":
        password = _read_password()
        passwords = Passwords(settings)
        user = _run_db(
            settings,
            lambda db: manage.create_user(
                db,
                passwords,
                username=args.username,
                password=password,
                email=args.email,
                name=args.name,
            ),
        )
        print(
            json.dumps(manage.user_view(user))
            if args.json
            else f"created user {user.username} ({user.id})"
        )
        return 0
    if sub == "list":
        users = _run_db(settings, manage.list_users)
        if args.json:
            print(json.dumps([manage.user_view(u) for u in users]))
        for u in [] if args.json else users:
            status = "disabled" if u.disabled else "active"
            print(f"{u.username:<30} {status:<9} {u.email or '-':<30} {u.id}")
        return 0
    if sub == "disable":
        revoked = _run_db(settings, lambda db: manage.disable_user(db, args.username))
        print(f"disabled {args.username}; revoked {revoked} session(s)")
        return 0
    if sub == "reset-factors":

        async def reset(db: AsyncSession) -> tuple[str, int, int]:
            user = await manage.get_user(db, args.username)
            return (user.id, *await factors.reset_person(db, user.id))

        user_id, removed, ended = _run_db(settings, reset)
        audit(
            "factor.reset",
            via="cli",
            user_id=user_id,
            factors_removed=removed,
            sessions_ended=ended,
        )
        print(
            f"reset the second factors of {args.username}: {removed} removed, "
            f"{ended} browser session(s) ended"
        )
        return 0
    password = _read_password()
    passwords = Passwords(settings)
    revoked = _run_db(
        settings, lambda db: manage.set_password(db, passwords, args.username, password)
    )
    print(f"password changed for {args.username}; revoked {revoked} session(s)")
    return 0


def cmd_seed_demo(settings: Settings, args: argparse.Namespace) -> int:
    """Seed a demo client and user into an empty database and print how to use them."""
    record = Path("data") / "demo-credentials.json"

    async def seed(db: AsyncSession) -> dict[str, str] | None:
        if await manage.list_clients(db) or await manage.list_users(db):
            return None
        # First-party with the account scope: the README's account API calls work with its token.
        created = await manage.create_client(
            db,
            client_id="demo-client",
            scope="profile email api account",
            name="Demo client",
            first_party=True,
        )
        password = manage.new_secret()[:20]
        await manage.create_user(
            db, Passwords(settings), username="demo", password=password, email="demo@example.com"
        )
        assert created.secret is not None
        return {
            "client_id": "demo-client",
            "client_secret": created.secret,
            "username": "demo",
            "password": password,
        }

    creds = _run_db(settings, seed)
    if creds is None:
        hint = f" (saved in {record})" if record.exists() else ""
        print(f"demo data not seeded: the database already has clients or users{hint}")
        return 0
    record.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when an older file with wider permissions was there
    with os.fdopen(fd, "w") as handle:
        json.dump(creds, handle, indent=2)
    print(
        "Seeded a demo client and user (also saved in data/demo-credentials.json):\n"
        f"  client_id:     {creds['client_id']}\n"
        f"  client_secret: {creds['client_secret']}\n"
        f"  username:      {creds['username']}\n"
        f"  password:      {creds['password']}\n\n"
        "Get a token with the password grant:\n\n"
        f"  curl -s -u '{creds['client_id']}:{creds['client_secret']}' "
        f"-d grant_type=password -d username={creds['username']} "
        f"-d 'password={creds['password']}' {settings.issuer}/oauth2/token\n"
    )
    return 0


# -- parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server", description="Token server")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve HTTP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    serve.add_argument("--workers", type=int, default=1)

    commands.add_parser("migrate", help="migrate the database to head (idempotent)")
    commands.add_parser("seed-demo", help="seed a demo client and user into an empty database")
    copy = commands.add_parser(
        "copy-from", help="copy every row of another database into AUTH_DATABASE_URL (empty)"
    )
    copy.add_argument("source_url", help="e.g. sqlite+aiosqlite:///./data/auth.db")

    keys = commands.add_parser("keys", help="signing keys").add_subparsers(
        dest="keys_command", required=True
    )
    keys.add_parser("list")
    rotate_keys = keys.add_parser("rotate", help="next → current → retired, and a new next")
    rotate_keys.add_argument(
        "--force",
        action="store_true",
        help="promote the next key even if it is younger than the JWKS max-age",
    )
    keys.add_parser("prune", help="remove retired keys whose tokens have all expired")
    keys.add_parser(
        "import", help="copy the keys of AUTH_KEYS_DIR into the database store (idempotent)"
    )
    rewrap = keys.add_parser(
        "rewrap",
        help="seal every private key of the database store under AUTH_KEY_ENCRYPTION_KEY",
    )
    rewrap.add_argument(
        "--old-key-file",
        required=True,
        help="a file holding the encryption key the keys are sealed under now (- for stdin)",
    )

    tokens = commands.add_parser("tokens", help="stored token state").add_subparsers(
        dest="tokens_command", required=True
    )
    tokens.add_parser(
        "prune",
        help="delete ended sign-ins, expired revocations and codes, and ended browser sessions "
        "(safe to run any time)",
    )

    clients = commands.add_parser("clients", help="OAuth clients").add_subparsers(
        dest="clients_command", required=True
    )
    create = clients.add_parser("create")
    create.add_argument("--client-id", required=True)
    create.add_argument("--name", default="")
    create.add_argument("--public", action="store_true", help="no secret (auth method none)")
    create.add_argument(
        "--auth-method",
        choices=CLIENT_AUTH_METHODS,
        help="token_endpoint_auth_method (default client_secret_basic; --public means none)",
    )
    key_source = create.add_mutually_exclusive_group()
    key_source.add_argument(
        "--jwks-file", metavar="F", help="private_key_jwt: a file holding its public JWK Set"
    )
    key_source.add_argument(
        "--jwks-uri", metavar="U", help="private_key_jwt: where its public JWK Set is published"
    )
    create.add_argument(
        "--resource",
        action="append",
        metavar="URI",
        help="a resource of AUTH_RESOURCES it may ask for (repeatable; default: all of them)",
    )
    create.add_argument(
        "--dpop-bound",
        action="store_true",
        help="its access tokens must be DPoP-bound (RFC 9449): token requests without a DPoP "
        "proof are refused",
    )
    create.add_argument(
        "--require-par",
        action="store_true",
        help="its authorization requests must be pushed first (RFC 9126 PAR): plain requests "
        "to /oauth2/authorize are refused",
    )
    create.add_argument("--admin", action="store_true", help="may receive the admin scope")
    create.add_argument(
        "--resource-server",
        action="store_true",
        help="may introspect any token (an API that validates tokens online)",
    )
    create.add_argument("--grant", action="append", help="allowed grant type (repeatable)")
    create.add_argument("--scope", default="", help="space-separated scopes it may ask for")
    create.add_argument("--redirect-uri", action="append", help="repeatable")
    create.add_argument(
        "--first-party", action="store_true", help="your own app: people are not asked to consent"
    )
    create.add_argument(
        "--post-logout-redirect-uri",
        action="append",
        help="where sign-out may return the browser (repeatable)",
    )
    create.add_argument(
        "--refresh-retry-window",
        type=int,
        metavar="S",
        help="seconds during which presenting a just-rotated refresh token again gets the same "
        "successor (default: AUTH_REFRESH_RETRY_WINDOW)",
    )
    create.add_argument("--json", action="store_true")
    listing = clients.add_parser("list")
    listing.add_argument("--json", action="store_true")
    for name in ("show", "delete"):
        clients.add_parser(name).add_argument("client_id")
    token = clients.add_parser(
        "registration-token",
        help="print an initial access token for dynamic client registration (RFC 7591 §3)",
    )
    token.add_argument(
        "--ttl",
        type=int,
        default=manage.REGISTRATION_TOKEN_TTL,
        metavar="S",
        help="seconds it stays good for (default: one hour)",
    )
    token.add_argument("--json", action="store_true")
    rotate = clients.add_parser("rotate-secret")
    rotate.add_argument("client_id")
    rotate.add_argument("--json", action="store_true")

    users = commands.add_parser("users", help="people").add_subparsers(
        dest="users_command", required=True
    )
    ucreate = users.add_parser("create")
    ucreate.add_argument("--username", required=True)
    ucreate.add_argument("--email")
    ucreate.add_argument("--name")
    ucreate.add_argument("--password-stdin", action="store_true", required=True)
    ucreate.add_argument("--json", action="store_true")
    ulist = users.add_parser("list")
    ulist.add_argument("--json", action="store_true")
    users.add_parser("disable").add_argument("username")
    users.add_parser(
        "reset-factors", help="remove every passkey, authenticator app and recovery code"
    ).add_argument("username")
    setpw = users.add_parser("set-password")
    setpw.add_argument("username")
    setpw.add_argument("--password-stdin", action="store_true", required=True)

    check.add_parser(commands)
    return parser


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "tokens": cmd_tokens,
    "serve": cmd_serve,
    "migrate": cmd_migrate,
    "seed-demo": cmd_seed_demo,
    "copy-from": cmd_copy_from,
    "keys": cmd_keys,
    "clients": cmd_clients,
    "users": cmd_users,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        # A self-test of a server somewhere else: it needs no local settings, and a broken
        # local AUTH_* environment must not stop it.
        return check.cmd_check(args)
    try:
        settings = Settings()
        configure_logging(settings.log_level, stream=sys.stderr)
        if args.command == "serve":
            settings.check_production()
            settings.check_profile()
        return COMMANDS[args.command](settings, args)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = "AUTH_" + str(first["loc"][0]).upper() if first["loc"] else "settings"
        print(f"error: {field}: {first['msg']}", file=sys.stderr)
    except (
        CommandError,
        manage.ManageError,
        SchemaNotAtHeadError,
        InsecureDatabaseFileError,
        KeysUnavailableError,
        RotationTooSoonError,
        InsecureSettingsError,
        KeyEncryptionError,
        KeyStoreConflictError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 1
