"""A refusal as an HTTP answer: status, JSON body, challenges (shared by both integrations)."""

from __future__ import annotations

import json

from .challenges import error_body, www_authenticate
from .errors import TokenError
from .verifier import RETRY_AFTER, TokenVerifier


def refusal(verifier: TokenVerifier, error: TokenError) -> tuple[int, bytes, list[tuple[str, str]]]:
    """RFC 6750 §3 / RFC 9449 §7.1: the challenge(s) naming ``resource_metadata`` (RFC 9728
    §5.1), never cached; a 503 carries ``Retry-After`` instead of a challenge."""
    headers = [("cache-control", "no-store")]
    if error.status == 503:
        headers.append(("retry-after", str(RETRY_AFTER)))
    else:
        for value in www_authenticate(error, verifier.config, verifier.metadata_url):
            headers.append(("www-authenticate", value))
    body = json.dumps(error_body(error), separators=(",", ":")).encode()
    return error.status, body, headers
