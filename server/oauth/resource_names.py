"""What the consent page calls the resources (APIs) a client asks for (RFC 8707 ``resource``).

An ``AUTH_RESOURCES`` entry may name its resource (``name``). One that gives only the URL of
its protected-resource metadata (RFC 9728, ``metadata``) is named by that document's
``resource_name``, fetched through the app's fetcher (``server/fetch.py``: SSRF-safe, cached
per RFC 9111, a failure remembered) and used only when the document's ``resource`` is the
entry's URI exactly (RFC 9728 §3.3: otherwise the document is about another resource and must
not be used). A document that cannot be had or used leaves the resource shown by its URI, with
a log line saying why: a name is a courtesy, never a reason to refuse a sign-in.
"""

from __future__ import annotations

import asyncio

from ..config import MAX_RESOURCE_NAME, resource_name
from ..deps import AppState
from ..fetch import QUOTED, FetchError
from ..observability import log


async def named(state: AppState, resources: list[str]) -> list[dict[str, str | None]]:
    """Each of ``resources`` in order, as ``{"uri": …, "name": … or None}``."""
    settings = state.settings
    names, documents = settings.resource_names, settings.resource_metadata

    async def one(resource: str) -> dict[str, str | None]:
        name = names.get(resource)
        if name is None and resource in documents:
            name = await _document_name(state, resource, documents[resource])
        return {"uri": resource, "name": name}

    return list(await asyncio.gather(*(one(resource) for resource in resources)))


async def _document_name(state: AppState, resource: str, url: str) -> str | None:
    """The ``resource_name`` of the RFC 9728 document at ``url`` about ``resource``, or None
    (logged, with the reason)."""
    try:
        document = await state.fetcher.get_json(url)
    except FetchError as error:
        problem: str | None = f"the document could not be fetched: {error.reason}"
    else:
        problem = _problem(document, resource)
        if problem is None:
            return resource_name(document["resource_name"])
    log.warning(
        "resource_metadata.unused", resource=resource[:QUOTED], url=url[:QUOTED], reason=problem
    )
    return None


def _problem(document: object, resource: str) -> str | None:
    """Why ``document`` gives no name for ``resource``, or None when it does."""
    if not isinstance(document, dict):
        return "the document is not a JSON object"
    if document.get("resource") != resource:
        # RFC 9728 §3.3: the metadata of another resource (or of none) is not used.
        return "the document's resource is not this resource"
    if "resource_name" not in document:
        return "the document has no resource_name"
    if resource_name(document["resource_name"]) is None:
        return (
            "the document's resource_name is not text of 1 to "
            f"{MAX_RESOURCE_NAME} printable characters"
        )
    return None
