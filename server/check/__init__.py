"""``python -m server check URL``: a self-test of a running server (SPEC.md, "Operator contract").

Each check is an async function registered with ``@check(name)``, run in registration order
against the server at ``URL`` over HTTP only (it needs no database, no keys, no settings).
It returns to pass, raises ``CheckFailed`` to fail or ``CheckSkipped`` when the credentials it
needs were not given (or the client is not allowed the grant). Anything else it raises is a
failure with a one-line reason, never a traceback. Checks share a ``Context``: tokens obtained
by one check are reused by later ones, which name the check they depend on (``ctx.need``).

Output is one line per check, ``PASS name`` / ``FAIL name: why`` / ``SKIP name: why``, then
``summary: P passed, F failed, S skipped``. Reasons carry status codes and OAuth error codes,
never a body, a secret, a password or a token (``Context.redact`` is the last safety net).

The checks live in groups (``metadata``, ``grants``, ``dpop``, ``refresh``,
``introspection``, ``revocation``, ``last``) built on ``context`` (``Context``, ``@check``),
``parse``, ``outcome``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TextIO

import httpx

# Importing a group registers its checks: this order is the order they run in.
from . import metadata, grants, dpop, par, refresh, introspection, revocation, last  # isort: skip  # noqa: F401
from .context import CHECKS, Check, Context
from .outcome import CheckFailed, CheckSkipped, Status
from .parse import b64url_encode as b64url_encode
from .parse import short

REASON_LENGTH = 200


# -- running them ----------------------------------------------------------------------


async def run_one(ctx: Context, entry: Check) -> tuple[Status, str]:
    if ctx.unreachable is not None:
        return "FAIL", f"server unreachable ({ctx.unreachable})"
    try:
        await entry.run(ctx)
    except CheckSkipped as skip:
        return "SKIP", str(skip)
    except CheckFailed as failure:
        return "FAIL", str(failure)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        ctx.unreachable = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return "FAIL", f"cannot connect to {ctx.base_url}: {ctx.unreachable}"
    except httpx.TimeoutException as exc:
        return "FAIL", f"timed out ({type(exc).__name__})"
    except httpx.HTTPError as exc:
        return "FAIL", f"HTTP error {type(exc).__name__}: {exc}"
    except Exception as exc:  # any surprise is a failure with a reason, never a traceback
        return "FAIL", f"unexpected {type(exc).__name__}: {exc}"
    return "PASS", ""


def one_line(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= REASON_LENGTH else text[: REASON_LENGTH - 3] + "..."


async def run_checks(
    http: httpx.AsyncClient,
    base_url: str,
    *,
    client_id: str | None,
    client_secret: str | None,
    username: str | None,
    password: str | None,
    out: TextIO,
) -> int:
    """Run every check against ``base_url`` with ``http``; write the lines; return failures."""
    ctx = Context(http, base_url.rstrip("/"), client_id, client_secret, username, password)
    ctx.sensitive.update(value for value in (client_secret, password) if value)
    for entry in CHECKS:
        status, reason = await run_one(ctx, entry)
        if status != "PASS":
            reason = one_line(ctx.redact(reason)) or "no reason given"
        ctx.outcomes[entry.name] = (status, reason)
        line = f"PASS {entry.name}" if status == "PASS" else f"{status} {entry.name}: {reason}"
        print(line, file=out, flush=True)
    counts = {status: count(ctx.outcomes.values(), status) for status in ("PASS", "FAIL", "SKIP")}
    print(
        f"summary: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped",
        file=out,
        flush=True,
    )
    return counts["FAIL"]


def count(outcomes: Iterable[tuple[Status, str]], status: Status) -> int:
    return sum(1 for seen, _ in outcomes if seen == status)


# -- command line ----------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "check",
        help="self-test a running server",
        description=(
            "Self-test the server at URL: one PASS/FAIL/SKIP line per check, then a summary; "
            "exit status 1 on any failure. Credentials may also come from AUTH_CHECK_CLIENT_ID, "
            "AUTH_CHECK_CLIENT_SECRET, AUTH_CHECK_USERNAME and AUTH_CHECK_PASSWORD."
        ),
    )
    parser.add_argument("url", help="the server's base URL (its issuer), e.g. https://auth.example")
    parser.add_argument("--client-id", help="a client to test with (confidential: give its secret)")
    parser.add_argument("--client-secret", help="prefer AUTH_CHECK_CLIENT_SECRET: argv is visible")
    parser.add_argument("--username", help="a user for the password and refresh checks")
    parser.add_argument(
        "--password-stdin", action="store_true", help="read the user's password from stdin"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")


class UsageError(Exception):
    """Ends ``check`` with ``error: <message>`` on stderr and exit status 1."""


def _option(value: str | None, env: str) -> str | None:
    return value if value else (os.environ.get(env) or None)


def _stdin_password() -> str:
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        raise UsageError("no password on standard input")
    return password


@dataclass(frozen=True)
class Credentials:
    client_id: str | None
    client_secret: str | None
    username: str | None
    password: str | None


def _resolve(args: argparse.Namespace) -> Credentials:
    url = str(args.url)
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"URL must start with http:// or https:// (got {short(url)})")
    if not args.timeout > 0:
        raise UsageError("--timeout must be a positive number of seconds")
    client_id = _option(args.client_id, "AUTH_CHECK_CLIENT_ID")
    client_secret = _option(args.client_secret, "AUTH_CHECK_CLIENT_SECRET")
    username = _option(args.username, "AUTH_CHECK_USERNAME")
    if args.password_stdin and username is None:
        raise UsageError("--password-stdin needs --username (or AUTH_CHECK_USERNAME)")
    password = _stdin_password() if args.password_stdin else _option(None, "AUTH_CHECK_PASSWORD")
    if client_secret is not None and client_id is None:
        raise UsageError("a client secret needs --client-id (or AUTH_CHECK_CLIENT_ID)")
    if username is not None and password is None:
        raise UsageError("--username needs --password-stdin (or AUTH_CHECK_PASSWORD)")
    if password is not None and username is None:
        raise UsageError("AUTH_CHECK_PASSWORD needs --username (or AUTH_CHECK_USERNAME)")
    if username is not None and client_id is None:
        raise UsageError("the user checks need a client: give --client-id")
    return Credentials(client_id, client_secret, username, password)


def cmd_check(args: argparse.Namespace) -> int:
    """``python -m server check URL …``: 0 when every check passed or skipped, else 1."""
    try:
        creds = _resolve(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    async def main() -> int:
        async with httpx.AsyncClient(timeout=float(args.timeout)) as http:
            return await run_checks(
                http,
                str(args.url),
                client_id=creds.client_id,
                client_secret=creds.client_secret,
                username=creds.username,
                password=creds.password,
                out=sys.stdout,
            )

    return 1 if asyncio.run(main()) else 0
