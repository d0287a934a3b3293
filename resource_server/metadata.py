"""RFC 9728: this API's protected-resource metadata, generated from its configuration."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from .config import ResourceServerConfig

WELL_KNOWN = "/.well-known/oauth-protected-resource"


def metadata_url(config: ResourceServerConfig) -> str:
    """Where the document is served: the configured URL, else RFC 9728 §3.1's: the well-known
    suffix inserted between the resource's host and its path (``https://api.example/orders``
    → ``https://api.example/.well-known/oauth-protected-resource/orders``)."""
    if config.metadata_url:
        return config.metadata_url
    split = urlsplit(config.resource)
    path = split.path.rstrip("/")
    return f"{split.scheme}://{split.netloc}{WELL_KNOWN}{path}"


def metadata_path(config: ResourceServerConfig) -> str:
    return urlsplit(metadata_url(config)).path


def protected_resource_metadata(config: ResourceServerConfig) -> dict[str, Any]:
    """RFC 9728 §2. ``resource`` is exactly the configured identifier (§3.3: a client checks
    it against the URL it derived the document's from); the token server is the only
    authorization server; tokens travel in the ``Authorization`` header only."""
    document: dict[str, Any] = {
        "resource": config.resource,
        "authorization_servers": [config.issuer],
        "bearer_methods_supported": ["header"],
    }
    if config.scopes_supported:
        document["scopes_supported"] = list(config.scopes_supported)
    if config.resource_name:
        document["resource_name"] = config.resource_name
    if config.resource_documentation:
        document["resource_documentation"] = config.resource_documentation
    if config.dpop:
        document["dpop_signing_alg_values_supported"] = list(config.dpop_algorithms)
        document["dpop_bound_access_tokens_required"] = config.dpop_required
    return document
