"""Reading responses and tokens without trusting them: bounded text, error codes, JWT parts."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import httpx

from .outcome import CheckFailed


def printable(text: str, limit: int) -> str:
    """``text`` on one line, without control characters, at most ``limit`` characters."""
    text = "".join(ch if ch.isprintable() else "?" for ch in re.sub(r"\s+", " ", text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value: object, limit: int = 60) -> str:
    """A bounded rendering of a value taken from a response (``repr``: types stay visible)."""
    return printable(repr(value), limit)


def parse_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError):
        return None


def error_code(response: httpx.Response) -> str | None:
    body = parse_json(response)
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return None


def describe(response: httpx.Response) -> str:
    """Status and OAuth error code: never the body, which may hold tokens."""
    text = f"HTTP {response.status_code}"
    error = error_code(response)
    if error is not None:
        text += " " + printable(error, 40)
    if response.status_code == 429:
        retry = printable(response.headers.get("retry-after", "?"), 20)
        text += f" (rate limited, Retry-After {retry}; run the check again later)"
    return text


def json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    body = parse_json(response)
    if not isinstance(body, dict):
        raise CheckFailed(f"{what}: HTTP {response.status_code} body is not a JSON object")
    return body


def expect_error(response: httpx.Response, status: int, error: str, what: str) -> dict[str, Any]:
    if response.status_code != status or error_code(response) != error:
        raise CheckFailed(f"{what}: expected HTTP {status} {error}, got {describe(response)}")
    return json_object(response, what)


def cache_directives(value: str) -> dict[str, str]:
    directives: dict[str, str] = {}
    for part in value.split(","):
        name, _, argument = part.strip().partition("=")
        if name:
            directives[name.lower()] = argument.strip().strip('"')
    return directives


def b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(data: dict[str, Any]) -> str:
    return b64url_encode(json.dumps(data, separators=(",", ":")).encode())


def unverified_part(token: str, index: int, what: str) -> dict[str, Any]:
    """The JSON header (0) or payload (1) of a compact JWS, without verifying it."""
    parts = token.split(".")
    if len(parts) != 3:
        raise CheckFailed(f"{what} is not a compact JWT (expected 3 parts, got {len(parts)})")
    try:
        value = json.loads(b64url_decode(parts[index]))
    except ValueError as exc:
        raise CheckFailed(f"{what}: part {index + 1} is not base64url JSON") from exc
    if not isinstance(value, dict):
        raise CheckFailed(f"{what}: part {index + 1} is not a JSON object")
    return value


def int_claim(claims: dict[str, Any], name: str, what: str) -> int:
    value = claims.get(name)
    if type(value) is not int:  # bool is an int subclass; true is not a time
        raise CheckFailed(f"{what}: claim {name} is {short(value)}, expected an integer")
    return value


def str_claim(claims: dict[str, Any], name: str, what: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise CheckFailed(f"{what}: claim {name} is {short(value)}, expected a string")
    return value


def scope_of(body: dict[str, Any]) -> str:
    """The granted scope: the response's ``scope``, else the access token's claim."""
    scope = body.get("scope")
    if isinstance(scope, str):
        return scope
    claimed = unverified_part(str(body["access_token"]), 1, "the access token").get("scope")
    return claimed if isinstance(claimed, str) else ""
