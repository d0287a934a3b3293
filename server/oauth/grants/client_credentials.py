"""RFC 6749 §4.4: confidential clients only, never a refresh token, no database statement
(the client comes from the cache, ``server/clients.py``)."""

from __future__ import annotations

from typing import Any

from authlib.oauth2.rfc6749 import grants

from ...names import CONFIDENTIAL_AUTH_METHODS
from .base import Grant, resolve_scope


class ClientCredentialsGrant(Grant, grants.ClientCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = CONFIDENTIAL_AUTH_METHODS
    #: The token endpoint runs this grant without opening a transaction.
    NEEDS_DATABASE = False

    def check_scope(self) -> None:
        self.request.scope = resolve_scope(
            self.request.payload.scope, self.request.client.scope_list
        )

    CHECKS = (Grant.check_client, check_scope, Grant.check_resources)

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        token = self.server.issue(self.request, scope=self.request.scope)
        return 200, token, self.TOKEN_RESPONSE_HEADER
