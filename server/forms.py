"""Reading ``application/x-www-form-urlencoded`` bodies strictly, for every endpoint.

Malformed input is a ``FormError`` with the HTTP status to answer (400, or 413 for an
oversized body); each layer turns it into its own error format (RFC 6749 §5.2 JSON at the
OAuth endpoints, an error page on the hosted pages). Refused: a wrong content type or
charset, bodies over the limit, invalid UTF-8 (also in %-escapes, so lone surrogates), NUL
bytes, more than ``MAX_FIELDS`` fields and repeated parameters (RFC 6749 §3.1, §3.2).
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.requests import Request

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
MAX_FIELDS = 50
#: Parameter names of our endpoints and pages: safe to name in an error message.
KNOWN_PARAMETERS = frozenset(
    [
        "grant_type",
        "scope",
        "client_id",
        "client_secret",
        "username",
        "password",
        "refresh_token",
        "code",
        "redirect_uri",
        "code_verifier",
        "token",
        "token_type_hint",
        "response_type",
        "state",
        "nonce",
        "code_challenge",
        "code_challenge_method",
        "prompt",
        "max_age",
        "id_token_hint",
        "post_logout_redirect_uri",
        "csrf_token",
        "next",
        "decision",
        "email",
        "name",
        "password_confirm",
        "resource",
    ]
)
#: Parameters that may be sent more than once (RFC 8707 §2: ``resource``). Their values are
#: URIs, which hold no whitespace, so the form keeps them space-separated in one string.
REPEATABLE = frozenset(["resource"])


class FormError(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def check_content_type(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    media_type, _, params = content_type.partition(";")
    if media_type.strip().lower() != FORM_CONTENT_TYPE:
        raise FormError(f"Content-Type must be {FORM_CONTENT_TYPE}.")
    charset = params.strip().lower()
    if charset and charset.replace(" ", "") not in ("charset=utf-8", 'charset="utf-8"'):
        raise FormError("Only the UTF-8 charset is accepted.")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        # ASCII digits only: str.isdigit() also accepts "²" (latin-1 0xB2), which int() refuses.
        if not (declared.isascii() and declared.isdigit()):
            raise FormError("Invalid Content-Length header.")
        if int(declared) > limit:
            raise FormError(f"Request body larger than {limit} bytes.", 413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise FormError(f"Request body larger than {limit} bytes.", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_form(body: bytes | str) -> dict[str, str]:
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=MAX_FIELDS)
    except UnicodeError:
        # Strict decoding of the body and of every %-escape also refuses lone surrogates.
        raise FormError("Request body is not valid UTF-8.") from None
    except ValueError:
        raise FormError(f"Too many parameters (at most {MAX_FIELDS}).") from None
    form: dict[str, str] = {}
    seen: set[str] = set()
    for key, value in pairs:
        if "\x00" in key or "\x00" in value:
            raise FormError("Parameters must not contain NUL characters.")
        if key in REPEATABLE:
            if any(c.isspace() for c in value):
                raise FormError(f"Parameter '{key}' must be an absolute URI.")
            if value:
                form[key] = f"{form[key]} {value}" if key in form else value
            continue
        if key in seen:
            # RFC 6749 §3.1/§3.2: parameters MUST NOT be included more than once. Only names we
            # define are repeated back; anything else a client sent never is.
            if key in KNOWN_PARAMETERS:
                raise FormError(f"Parameter '{key}' sent more than once.")
            raise FormError("A parameter was sent more than once.")
        seen.add(key)
        # RFC 6749 §3.1: a parameter sent without a value is treated as omitted.
        if value:
            form[key] = value
    return form


def repeated(params: dict[str, str]) -> list[tuple[str, str]]:
    """``params`` as pairs to send on, each repeatable parameter's values one pair each."""
    return [
        (key, item)
        for key, value in params.items()
        for item in (value.split() if key in REPEATABLE else [value])
    ]


async def read_form(request: Request, limit: int) -> dict[str, str]:
    check_content_type(request)
    return parse_form(await read_body(request, limit))
