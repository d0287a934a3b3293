"""Clients whose ``client_id`` is the https URL of their metadata document
(draft-ietf-oauth-client-id-metadata-document): nobody registers them; the document says what
they are, and this server fetches it (``server/fetch.py``: SSRF-safe, cached per RFC 9111)
whenever the client cache (``server/clients.py``) reads the client.

Each one still has a ``clients`` row (``origin = "document"``), written from the document when
it is first seen and rewritten when it changes, because codes, consents and refresh-token
families reference clients by foreign key. The row is not the truth, the document is: when the
document cannot be fetched or is no longer valid, the client does not exist (``None``: the
ordinary unknown-client error), even though its row stays for the tokens that reference it.
A row an operator or a registration created is never overwritten; a URL-shaped id of one is
served as that client, without a fetch.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Table, insert, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request

from . import clients, manage
from .boundary import text_problem
from .client_metadata import ClientMetadata, MetadataError, parse_client_metadata
from .config import Env, Settings
from .deps import AppState
from .fetch import FetchError
from .models import Client
from .observability import audit, log
from .ratelimit import Verdict

DOCUMENT = "document"
#: Members a document must not have (draft §4.1: its client has no shared secret).
SECRET_MEMBERS = ("client_secret", "client_secret_expires_at")
#: A dot segment, also percent-encoded (RFC 3986 §2.3: ``%2E`` is an unreserved ``.``).
DOT_SEGMENT = re.compile(r"(?i)(\.|%2e){1,2}")
TABLE: Table = Client.__table__  # type: ignore[assignment]


def document_url_problem(url: str, settings: Settings) -> str | None:
    """Why ``url`` cannot be a client identifier URL (draft §3), or None.

    https (plain http only outside production, for test servers), a host, a path, no
    fragment, no user information, no ``.``/``..`` segment; and, here, at most as long as the
    ``clients.client_id`` column (100 characters): a longer URL is not a client of this server.
    """
    limit = clients.CLIENT_ID_LENGTH
    if text_problem(url, limit) is not None or any(c.isspace() for c in url):
        return f"a client_id URL is text of at most {limit} characters, without spaces"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        return "the client_id is not a valid URL"
    schemes = ("https",) if settings.env is Env.production else ("https", "http")
    if parts.scheme not in schemes:
        return "a client_id URL must be https"
    if not parts.hostname or "@" in parts.netloc:
        return "a client_id URL names a host, without user information"
    if "#" in url:
        return "a client_id URL has no fragment"
    if parts.path in ("", "/"):
        return "a client_id URL has a path"
    if any(DOT_SEGMENT.fullmatch(segment) for segment in parts.path.split("/")):
        return "a client_id URL has no . or .. path segments"
    return None


def _columns(url: str, metadata: ClientMetadata) -> dict[str, Any]:
    """The row's columns the document decides."""
    return {
        # The consent page names the client: without a client_name, by its URL.
        "name": metadata.name or url,
        "redirect_uris": " ".join(metadata.redirect_uris),
        "post_logout_redirect_uris": " ".join(metadata.post_logout_redirect_uris),
        "grant_types": " ".join(metadata.grant_types),
        "scope": metadata.scope,
        "auth_method": metadata.auth_method,
        "jwks": metadata.jwks_json,
        "jwks_uri": metadata.jwks_uri,
        "resources": None if metadata.resources is None else " ".join(metadata.resources),
        "dpop_bound": metadata.dpop_bound,
        "require_par": metadata.require_par,
    }


def _unchanged(row: Client, columns: dict[str, Any]) -> bool:
    return all(getattr(row, name) == value for name, value in columns.items())


async def _metadata(state: AppState, url: str) -> ClientMetadata:
    """The document at ``url``, validated; raises ``FetchError`` or ``MetadataError``."""
    document = await state.fetcher.get_json(url)
    if not isinstance(document, dict):
        raise MetadataError("the document is not a JSON object")
    if document.get("client_id") != url:
        # Draft §4.1: the document names itself, exactly (no normalisation either way).
        raise MetadataError("the document's client_id is not its URL")
    if any(member in document for member in SECRET_MEMBERS):
        raise MetadataError("the document has a client_secret: its client has no shared secret")
    return parse_client_metadata(document, state.settings, document=True)


async def load_document_client(state: AppState, url: str) -> Client | None:
    """The client whose id is ``url``: its row, written from its document when that changed;
    ``None`` when the document cannot be had or is not valid (logged, with the reason)."""
    settings = state.settings
    row = await clients.load(state.db, url)
    if row is not None and row.origin != DOCUMENT:
        return row  # an operator's or a registration's: never a document's to change
    if not settings.client_metadata_documents:
        return None
    problem = document_url_problem(url, settings)
    if problem is None:
        try:
            metadata = await _metadata(state, url)
        except FetchError as error:
            problem = f"the document could not be fetched: {error.reason}"
        except MetadataError as error:
            problem = f"the document is not valid: {error.description}"
    if problem is not None:
        log.warning("client_document.refused", client_id=url[:200], reason=problem)
        return None
    columns = _columns(url, metadata)
    if row is not None and _unchanged(row, columns):
        return row
    if row is None or row.auth_method != metadata.auth_method:
        credentials = manage.credentials_for(metadata.auth_method, url, settings.secret_key)
        columns["secret_hash"] = credentials.secret_hash
        columns["secret_sealed"] = credentials.secret_sealed

    async def write(connection: AsyncConnection) -> Client | None:
        if row is None:
            await connection.execute(
                insert(TABLE).values(client_id=url, origin=DOCUMENT, **columns)
            )
        else:
            await connection.execute(
                update(TABLE)
                .where(TABLE.c.client_id == url, TABLE.c.origin == DOCUMENT)
                .values(**columns)
            )
        found = (await connection.execute(clients.CLIENT_BY_ID, {"p_client_id": url})).first()
        return Client(**found._mapping) if found is not None else None

    try:
        written = await state.db.run_core(write)
    except IntegrityError:
        # Another process inserted it first (both saw no row): theirs, from the same document.
        written = await clients.load(state.db, url)
    if written is not None and written.origin == DOCUMENT:
        log.info("client_document.stored", client_id=url[:200], new=row is None)
    return written


async def admit(state: AppState, request: Request, client_id: str | None) -> Verdict:
    """Whether this request may make the server fetch a metadata document now: a URL client
    id whose document is not in the fetcher's cache counts against the requesting address's
    ``AUTH_RATE_LIMIT_REGISTRATION_IP`` (in a bucket of its own). Anyone can send any URL to
    the authorization or token endpoint, and each new one is a fetch (and, when valid, a
    row): unlimited, that would let one address make this server request a third party's
    host at will. A cached document costs nothing, so a popular app's users never count."""
    if (
        not client_id
        or not clients.is_document_id(client_id)
        or not state.settings.client_metadata_documents
        or state.fetcher.answers_from_cache(client_id)
    ):
        return Verdict(allowed=True)
    limiter = state.limiter
    verdict = await limiter.hit(
        [(limiter.registration_ip, "client-document-ip", limiter.client_ip(request))]
    )
    if not verdict.allowed:
        audit("rate_limit.exceeded", endpoint="client_document", scope=verdict.scope)
    return verdict
