"""Starlette request → Authlib ``OAuth2Request``, with the input rules of the token endpoint.

The body is read and checked here, before Authlib sees it, so every malformed request gets
an RFC 6749 §5.2 ``invalid_request`` instead of a 500: wrong content type, oversized body,
invalid UTF-8, NUL bytes, too many fields and repeated parameters (§3.1, §3.2).
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import Any
from urllib.parse import parse_qsl, unquote

from authlib.oauth2.rfc6749 import OAuth2Request
from authlib.oauth2.rfc6749.errors import InvalidClientError, InvalidRequestError
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from starlette.requests import Request

from ..models import RefreshFamily

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
MAX_FIELDS = 50


class PayloadTooLargeError(InvalidRequestError):  # type: ignore[misc]
    status_code = 413


class FormRequest(OAuth2Request):  # type: ignore[misc]
    """An ``OAuth2Request`` whose form was parsed and checked by ``read_form``."""

    def __init__(self, method: str, uri: str, headers: Any, form: dict[str, str]) -> None:
        super().__init__(method, uri, headers=headers)
        # Duplicates were refused by parse_form, so one value per name is the whole truth.
        self.payload = BasicOAuth2Payload(form)
        self._form = form
        #: One clock reading per request, so every row and claim it writes agrees.
        self.issued_at = int(time.time())
        #: The refresh-token family this request starts or continues, if any.
        self.family: RefreshFamily | None = None

    @property
    def form(self) -> dict[str, str]:
        return self._form


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequestError("Invalid Content-Length header.")
        if int(declared) > limit:
            raise PayloadTooLargeError(f"Request body larger than {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"Request body larger than {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_form(body: bytes) -> dict[str, str]:
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=MAX_FIELDS)
    except UnicodeDecodeError:
        # Strict decoding of the body and of every %-escape also refuses lone surrogates.
        raise InvalidRequestError("Request body is not valid UTF-8.") from None
    except ValueError:
        raise InvalidRequestError(f"Too many parameters (at most {MAX_FIELDS}).") from None
    form: dict[str, str] = {}
    seen: set[str] = set()
    for key, value in pairs:
        if "\x00" in key or "\x00" in value:
            raise InvalidRequestError("Parameters must not contain NUL characters.")
        if key in seen:
            # RFC 6749 §3.1/§3.2: parameters MUST NOT be included more than once.
            raise InvalidRequestError(f"Parameter {_printable(key)!r} sent more than once.")
        seen.add(key)
        # RFC 6749 §3.1: a parameter sent without a value is treated as omitted.
        if value:
            form[key] = value
    return form


def _printable(text: str) -> str:
    cleaned = "".join(c for c in text if 0x20 <= ord(c) <= 0x7E and c not in '"\\')
    return cleaned[:40]


def check_basic_auth(headers: Any) -> str | None:
    """Validate an ``Authorization: Basic`` header before Authlib decodes it.

    Returns the client id it carries, ``None`` if there is no Basic header.
    """
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, credentials = value.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidClientError(
            status_code=401, description="Malformed HTTP Basic credentials."
        ) from None
    client_id, sep, secret = decoded.partition(":")
    if not sep or not client_id or not secret or "\x00" in decoded:
        raise InvalidClientError(status_code=401, description="Malformed HTTP Basic credentials.")
    return unquote(client_id)


async def form_request(request: Request, *, uri: str, limit: int) -> FormRequest:
    content_type = request.headers.get("content-type", "")
    media_type, _, params = content_type.partition(";")
    if media_type.strip().lower() != FORM_CONTENT_TYPE:
        raise InvalidRequestError(f"Content-Type must be {FORM_CONTENT_TYPE}.")
    charset = params.strip().lower()
    if charset and charset.replace(" ", "") not in ("charset=utf-8", 'charset="utf-8"'):
        raise InvalidRequestError("Only the UTF-8 charset is accepted.")
    form = parse_form(await read_body(request, limit))
    basic_client_id = check_basic_auth(request.headers)
    if basic_client_id is not None and "client_secret" in form:
        # RFC 6749 §2.3: a client MUST NOT use more than one authentication method.
        raise InvalidRequestError("Use one client authentication method, not several.")
    if basic_client_id is not None and form.get("client_id", basic_client_id) != basic_client_id:
        raise InvalidRequestError("client_id does not match the HTTP Basic credentials.")
    return FormRequest(request.method, uri, request.headers, form)
