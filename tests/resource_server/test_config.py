"""resource_server/config.py: a careless configuration is refused when the API starts."""

from __future__ import annotations

from typing import Any

import pytest

from resource_server import Introspection, ResourceServerConfig

pytestmark = pytest.mark.feature("rs-kit-tokens")

GOOD: dict[str, Any] = {"issuer": "https://id.example", "resource": "https://api.example"}


def test_a_sound_configuration_is_taken() -> None:
    assert ResourceServerConfig(**GOOD).algorithms == ("RS256", "PS256")
    assert ResourceServerConfig(issuer="http://127.0.0.1:8000", resource="urn:example:api")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"issuer": ""}, "issuer"),
        ({"issuer": "id.example"}, "issuer"),
        ({"issuer": "ftp://id.example"}, "issuer"),
        ({"resource": ""}, "resource"),
        ({"resource": "/orders"}, "resource"),
        ({"algorithms": ("RS256", "HS256")}, "algorithms"),
        ({"algorithms": ("none",)}, "algorithms"),
        ({"algorithms": ()}, "algorithms"),
        ({"algorithms": "RS256"}, "algorithms"),  # a string, not a tuple of names
        ({"dpop_algorithms": ("ES256", "HS512")}, "dpop_algorithms"),
        ({"leeway": -1}, "leeway"),
        ({"jwks_max_stale": -5}, "jwks_max_stale"),
        ({"dpop_iat_leeway": -1}, "dpop_iat_leeway"),
        ({"jwks_refetch_interval": 0}, "jwks_refetch_interval"),
        ({"http_timeout": 0}, "http_timeout"),
        ({"dpop": False, "dpop_required": True}, "dpop_required"),
        ({"introspection": Introspection("api", "s", cache_ttl=-1)}, "cache_ttl"),
    ],
)
def test_a_careless_configuration_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ResourceServerConfig(**{**GOOD, **changes})
