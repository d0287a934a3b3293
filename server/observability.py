"""Structured JSON logs with a request id on every line, and audit events.

Two layers keep secrets out of the logs: nothing logs request bodies or headers, and the
``redact`` processor (plus a wrapper on standard ``logging`` records, which uvicorn and
libraries use) scrubs whatever still carries one: secret-named keys, JWTs, Basic/Bearer
credentials, cookies, form-encoded secrets and PEM blocks, also inside tracebacks.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import uuid
from collections.abc import Callable
from typing import Any, TextIO

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

log = structlog.get_logger("auth")


# -- redaction -----------------------------------------------------------------------------
# Every log line passes through ``redact`` (structlog) or ``redact_record`` (the standard
# library: uvicorn, SQLAlchemy, Authlib), so a credential that slips into a field, a message or
# a traceback is replaced before it is written. Credentials here are always strings; numbers
# and booleans are never touched (``revoked_access_tokens=3`` is a count, not a token).

REDACTED = "[redacted]"

#: A key (or form field, or cookie) whose lower-cased name contains one of these is a secret.
_SECRET_KEY_PARTS = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "cookie",
    "authorization",
    "private_key",
    "api_key",
    "apikey",
)
#: Names that are secrets although they contain none of the parts above.
_SECRET_KEYS = frozenset({"code", "code_verifier", "session", "csrf", "assertion", "jwt"})
#: Names that contain a part above but only describe a token (RFC 7009 §2.1, RFC 6749 §5.1).
_HARMLESS_KEYS = frozenset({"token_type", "token_type_hint", "token_endpoint_auth_method"})
_COOKIE_PREFIXES = ("__host_", "__secure_")
_MAX_DEPTH = 32

#: Cheap pre-check on the lower-cased text (faster than IGNORECASE): a string with none of
#: these cannot match any pattern below, and comes back as it is.
_TRIGGER = re.compile(
    r"=|:[ \t\"']|://|eyj|bearer|basic|digest|dpop|authorization|cookie|-----begin"
)
_PEM = re.compile(
    r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY-----[\s\S]*?(?:-----END \1PRIVATE KEY-----|\Z)"
)
#: ``Authorization: Basic …``, ``Cookie: a=b; c=d``, ``'set-cookie': '…'``,
#: ``(b'authorization', b'Bearer …')``: everything to the end of the value.
_HEADER = re.compile(
    r"\b((?:proxy-)?authorization|(?:set-)?cookie)"
    r"((?:[ \t]*[:=][ \t]*|[\"'][ \t]*[:=,][ \t]*b?[\"'])(?:b?[\"'])?)"
    r"[^\"'\r\n]*",
    re.IGNORECASE,
)
#: A JWS (three segments, the signature may be empty) or JWE (five segments).
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){0,2}")
#: ``scheme://user:password@host`` (database URLs).
_URL_PASSWORD = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)[^\s@/]+@")
#: ``"name": "value"`` and ``'name': 'value'`` (JSON, Python reprs).
_QUOTED_PAIR = re.compile(r"([\"'])([\w.-]+)\1([ \t]*:[ \t]*)([\"'])((?:\\.|(?!\4)[^\\\r\n])*)\4")
#: ``name=`` (form bodies, query strings, cookies) or ``name: ``, then its value. Only the name
#: is matched at first, so ``ValueError: client_secret=…`` still finds the second name.
_PAIR_NAME = re.compile(r"(?<![\w.-])([\w.-]+)(?:=|[ \t]*:[ \t]+)")
_PAIR_VALUE = re.compile(r"[^&\s\"';,]+")
#: A credential after an HTTP authentication scheme, outside any ``Authorization`` header.
_SCHEME = re.compile(
    r"\b(bearer|basic|digest|dpop)([ \t]+)([A-Za-z0-9._~+/-]+=*)(?![\w.~+/=-])", re.IGNORECASE
)
#: After a scheme, a short lower-case word is prose ("basic auth"), not a credential.
_PROSE = re.compile(r"[a-z]{1,20}")


def is_secret_key(key: object) -> bool:
    """Whether a field of this name holds a credential (case and ``-``/``_`` insensitive)."""
    return _is_secret_name(key if isinstance(key, str) else str(key))


@functools.lru_cache(maxsize=4096)
def _is_secret_name(key: str) -> bool:
    name = key.lower().replace("-", "_")
    if name in _HARMLESS_KEYS:
        return False
    for prefix in _COOKIE_PREFIXES:
        name = name.removeprefix(prefix)
    return name in _SECRET_KEYS or any(part in name for part in _SECRET_KEY_PARTS)


def _redact_pair(match: re.Match[str]) -> str:
    if not is_secret_key(match.group(2)):
        return match.group(0)
    quote, name, colon, value_quote = match.group(1, 2, 3, 4)
    return f"{quote}{name}{quote}{colon}{value_quote}{REDACTED}{value_quote}"


def _redact_pairs(text: str) -> str:
    parts: list[str] = []
    done = 0
    for name in _PAIR_NAME.finditer(text):
        if name.start() < done or not is_secret_key(name.group(1)):
            continue
        value = _PAIR_VALUE.match(text, name.end())
        if value is None or value.group() == REDACTED:
            continue
        parts += [text[done : name.end()], REDACTED]
        done = value.end()
    if not parts:
        return text
    parts.append(text[done:])
    return "".join(parts)


def _redact_scheme(match: re.Match[str]) -> str:
    if _PROSE.fullmatch(match.group(3)):
        return match.group(0)
    return f"{match.group(1)}{match.group(2)}{REDACTED}"


def redact_text(text: str) -> str:
    """``text`` with every credential-shaped part replaced by ``[redacted]``."""
    if not _TRIGGER.search(text.lower()):
        return text
    text = _PEM.sub(rf"-----BEGIN \1PRIVATE KEY-----{REDACTED}-----END \1PRIVATE KEY-----", text)
    text = _HEADER.sub(rf"\1\2{REDACTED}", text)
    text = _JWT.sub(REDACTED, text)
    text = _URL_PASSWORD.sub(rf"\1{REDACTED}@", text)
    text = _QUOTED_PAIR.sub(_redact_pair, text)
    text = _redact_pairs(text)
    return _SCHEME.sub(_redact_scheme, text)


def _conceal(value: Any) -> Any:
    """The value of a secret-named field: gone, unless it cannot be a credential."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return REDACTED


def _scrub(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth >= _MAX_DEPTH:
        return redact_text(repr(value))
    if isinstance(value, dict):
        return {
            key: _conceal(item) if is_secret_key(key) else _scrub(item, depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_scrub(item, depth + 1) for item in value]
    if isinstance(value, tuple):
        return tuple(_scrub(item, depth + 1) for item in value)
    # What JSONRenderer would write for any other object: __structlog__() or repr().
    structlog_form = getattr(value, "__structlog__", None)
    if callable(structlog_form):
        return _scrub(structlog_form(), depth + 1)
    return redact_text(repr(value))


def redact(
    logger: structlog.typing.WrappedLogger,
    method_name: str,
    event_dict: structlog.typing.EventDict,
) -> structlog.typing.EventDict:
    """structlog processor: no password, secret, token, cookie or Authorization value survives,
    by field name (at any depth) or by shape in any string (messages and tracebacks too)."""
    return {
        key: _conceal(value) if is_secret_key(key) else _scrub(value)
        for key, value in event_dict.items()
    }


_EXCEPTION_FORMATTER = logging.Formatter()


def redact_record(record: logging.LogRecord) -> None:
    """The same for a standard-library record, in place: its message, arguments, traceback
    (formatted now, redacted, kept as ``exc_text``) and stack."""
    try:
        message = record.getMessage()
    except Exception:  # a malformed call; logging reports it when the record is formatted
        return
    record.msg, record.args = redact_text(message), ()
    if record.exc_info and record.exc_info[0] is not None:
        record.exc_text = redact_text(_EXCEPTION_FORMATTER.formatException(record.exc_info))
        record.exc_info = None
    elif record.exc_text:
        record.exc_text = redact_text(record.exc_text)
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info)


class _RedactingRecordFactory:
    """Wraps the log record factory, so every standard-library record is redacted at birth,
    whichever handler (uvicorn's, pytest's, the root one) writes it."""

    def __init__(self, wrapped: Callable[..., logging.LogRecord]) -> None:
        self.wrapped = wrapped

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.wrapped(*args, **kwargs)
        try:
            redact_record(record)
        except Exception:  # never let logging break the caller, nor let the text through
            record.msg, record.args = f"{REDACTED} (the record could not be redacted)", ()
            record.exc_info = record.exc_text = record.stack_info = None
        return record


def configure_logging(level: str = "info", stream: TextIO = sys.stdout) -> None:
    logging.basicConfig(format="%(message)s", stream=stream, level=level.upper())
    # uvicorn logs an unhandled exception's traceback itself (after our 500 handler), through
    # the standard library: that path must be redacted too.
    if not isinstance(logging.getLogRecordFactory(), _RedactingRecordFactory):
        logging.setLogRecordFactory(_RedactingRecordFactory(logging.getLogRecordFactory()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,  # last before rendering: tracebacks are text by now
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


#: Called with every audit event (metrics count them); each must be cheap and never raise.
AUDIT_LISTENERS: list[Callable[[str, dict[str, Any]], None]] = []


def audit(event: str, **fields: Any) -> None:
    """An audit event: who did what, never with a credential in ``fields``."""
    log.info(event, audit=True, **fields)
    for listener in AUDIT_LISTENERS:
        listener(event, fields)


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _VALID_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Accept a well-formed ``X-Request-ID`` or make one; bind it to logs; echo it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope["headers"])
        raw_id = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", raw_id)]
            await send(message)

        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            structlog.contextvars.clear_contextvars()
