"""RFC 9728: where the API's protected-resource metadata lives (§3.1) and what it says (§2)."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest

from resource_server.config import DPOP_ALGORITHMS
from resource_server.metadata import metadata_path, metadata_url, protected_resource_metadata
from resource_server.verifier import TokenVerifier
from tests.resource_server.kit_helpers import ISSUER, FakeTokenServer, config

pytestmark = pytest.mark.feature("rs-kit-metadata")

WELL_KNOWN = "/.well-known/oauth-protected-resource"


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ("https://api.example", f"https://api.example{WELL_KNOWN}"),
        # §3.1: the terminating slash after the host is removed.
        ("https://api.example/", f"https://api.example{WELL_KNOWN}"),
        # §3.1: the suffix goes between the host and the path.
        ("https://api.example/orders", f"https://api.example{WELL_KNOWN}/orders"),
        ("https://api.example/v1/orders", f"https://api.example{WELL_KNOWN}/v1/orders"),
        ("https://api.example:8443/v1", f"https://api.example:8443{WELL_KNOWN}/v1"),
        ("http://127.0.0.1:8001", f"http://127.0.0.1:8001{WELL_KNOWN}"),
        # The kit's reading: a path's own terminating slash goes too.
        ("https://api.example/orders/", f"https://api.example{WELL_KNOWN}/orders"),
    ],
)
def test_the_metadata_url_is_derived_from_the_resource(resource: str, expected: str) -> None:
    settings = config(resource=resource)
    assert metadata_url(settings) == expected
    assert metadata_path(settings) == urlsplit(expected).path


def test_a_configured_metadata_url_is_used_as_is() -> None:
    settings = config(
        resource="https://api.example/orders",
        metadata_url="https://api.example/meta/orders.json",
    )
    assert metadata_url(settings) == "https://api.example/meta/orders.json"
    assert metadata_path(settings) == "/meta/orders.json"


async def test_the_verifier_names_the_same_url() -> None:
    settings = config(resource="https://api.example/orders")
    async with FakeTokenServer().client() as http:
        verifier = TokenVerifier(settings, http)
        assert verifier.metadata_url == f"https://api.example{WELL_KNOWN}/orders"


def test_the_minimal_document() -> None:
    document = protected_resource_metadata(config(resource="https://api.example/orders/"))
    assert document == {
        "resource": "https://api.example/orders/",  # exactly as configured (§3.3)
        "authorization_servers": [ISSUER],
        "bearer_methods_supported": ["header"],
        "dpop_signing_alg_values_supported": list(DPOP_ALGORITHMS),
        "dpop_bound_access_tokens_required": False,
    }
    json.dumps(document)


def test_dpop_required_is_said() -> None:
    document = protected_resource_metadata(config(dpop_required=True))
    assert document["dpop_bound_access_tokens_required"] is True


def test_without_dpop_nothing_is_said_of_it() -> None:
    document = protected_resource_metadata(config(dpop=False))
    assert "dpop_signing_alg_values_supported" not in document
    assert "dpop_bound_access_tokens_required" not in document


def test_the_configured_proof_algorithms_are_listed() -> None:
    document = protected_resource_metadata(config(dpop_algorithms=("ES256", "PS256")))
    assert document["dpop_signing_alg_values_supported"] == ["ES256", "PS256"]


def test_the_optional_fields() -> None:
    document = protected_resource_metadata(
        config(
            resource_name="Orders API",
            scopes_supported=("orders:read", "orders:write"),
            resource_documentation="https://api.example/docs",
        )
    )
    assert document["resource_name"] == "Orders API"
    assert document["scopes_supported"] == ["orders:read", "orders:write"]
    assert document["resource_documentation"] == "https://api.example/docs"


def test_empty_optional_fields_are_left_out() -> None:
    document = protected_resource_metadata(config(resource_name="", scopes_supported=()))
    assert {"resource_name", "scopes_supported", "resource_documentation"}.isdisjoint(document)
