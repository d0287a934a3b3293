"""RFC 6749 §4.3, kept for first-party clients although RFC 9700 §2.4 deprecates it.

A bad username *or* password is ``invalid_grant`` (Authlib: ``invalid_request``), and an
unknown user costs a dummy hash, so neither the answer nor its time tells which accounts exist.

A password is one factor: a person who must give a second one (``AUTH_MFA=required``, or
``optional`` with a one-time code app: ``mfa.second_step_needed``) cannot sign in here, since
this grant has no second step. Their right password gets ``invalid_grant`` saying so (RFC 6749
§5.2), not counted as a failed password; a wrong one gets the usual answer, so this tells nobody
more than the browser's sign-in page does (which asks for the second factor after a right
password).
"""

from __future__ import annotations

from typing import Any

from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import InvalidGrantError

from ... import mfa
from ...models import User
from ...names import USER_AUTH_METHODS
from ...observability import audit
from .. import store
from .base import BAD_CREDENTIALS, SECOND_FACTOR_NEEDED, Grant, resolve_scope


class PasswordGrant(Grant, grants.ResourceOwnerPasswordCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = USER_AUTH_METHODS

    def check_parameters(self) -> None:
        self.request.username = self.required("username")
        self.request.password = self.required("password")

    def check_scope(self) -> None:
        # No consent page here: the account scope only for a first-party client.
        allowed = self.request.client.scope_list_without_consent
        self.request.scope = resolve_scope(self.request.payload.scope, allowed)

    def check_user(self) -> None:
        self.request.user = self.authenticate_user(self.request.username, self.request.password)

    CHECKS = (
        Grant.check_client,
        check_parameters,
        check_scope,
        Grant.check_resources,
        check_user,
    )

    def authenticate_user(self, username: str, password: str) -> User:
        server, request = self.server, self.request
        user = server.find_user(request, username)
        result = server.verify_password(request, user, password)
        if user is None or not result.ok or user.disabled:
            # One error for unknown user, wrong password and disabled account.
            raise InvalidGrantError(BAD_CREDENTIALS)
        settings = server.settings
        if settings.mfa != "off":
            # ``required`` refuses everyone: the person's factors need no query then.
            totp = settings.mfa == "optional" and store.totp_confirmed(request.db, user.id)
            have = mfa.Factors(totp=totp)
            if mfa.second_step_needed(settings, have):
                audit(
                    "token.second_factor_needed",
                    client_id=request.client.client_id,
                    user_id=user.id,
                    policy=settings.mfa,
                )
                raise InvalidGrantError(SECOND_FACTOR_NEEDED)
        if result.needs_rehash:
            server.rehash(request, user, password)
        return user

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        request = self.request
        self.server.start_family(
            request,
            scope=request.scope,
            resources=" ".join(request.resources),
            auth_time=request.issued_at,
            amr=mfa.amr_of(mfa.PWD),
        )
        token = self.server.issue(request, scope=request.scope)
        self.server.save_token(token, request)
        return 200, token, self.TOKEN_RESPONSE_HEADER
