"""RFC 6749 §6 with rotation and reuse detection (RFC 9700 §4.14.2).

Authlib's refresh grant is overridden where it falls short of SPEC.md: it always rotates
(Authlib: ``INCLUDE_NEW_REFRESH_TOKEN = False``); the old token is claimed and its successor
inserted by one atomic write (``store.rotate``), so exactly one of simultaneous requests wins
(Authlib revokes in a separate, racy step); reuse is treated as theft: the family dies; scope
and resources may narrow, never widen.

Two statements: ``store.find_refresh`` (token, family and user together) and ``store.rotate``.
"""

from __future__ import annotations

import hmac
from typing import Any

from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import InvalidGrantError, OAuth2Error

from ...db import CommitUncertain
from ...models import sha256_hex
from ...names import USER_AUTH_METHODS
from ...observability import audit
from .. import resources as rfc8707
from .. import store
from .base import BAD_REFRESH_TOKEN, Grant, resolve_scope

BOUND_TO_ANOTHER_KEY = "The refresh token is bound to another key."


class RefreshTokenGrant(Grant, grants.RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = USER_AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True

    def check_token(self) -> None:
        """The token exists, belongs to this client, and its family is not revoked; a token
        already rotated is reuse, which revokes the family, unless it was rotated within the
        client's retry window."""
        request = self.request
        request.presented_token = self.required("refresh_token")
        presented = store.find_refresh(request.db, sha256_hex(request.presented_token))
        if presented is None:
            raise InvalidGrantError(BAD_REFRESH_TOKEN)
        family = presented.family
        if family.client_id != request.client.client_id:
            # Issued to another client: refuse, but leave the owner's family alone.
            raise InvalidGrantError(BAD_REFRESH_TOKEN)
        if family.dpop_jkt is not None and not self.proves(family.dpop_jkt):
            # RFC 9449 §5: a public client's bound refresh token needs a proof with its key.
            # Checked before reuse detection: without the key the token is nobody's to use,
            # so presenting it ends nothing (SPEC, DPoP).
            raise InvalidGrantError(BOUND_TO_ANOTHER_KEY)
        if presented.family_revoked:
            raise InvalidGrantError(BAD_REFRESH_TOKEN)
        now = request.issued_at
        if presented.rotated_at is not None:
            window = self.retry_window()
            if not window or now - presented.rotated_at > window:
                self.revoke_family(family)
                raise InvalidGrantError(BAD_REFRESH_TOKEN)
            # Rotated within the client's retry window: a retry if it asks for what the
            # rotation did and its successor is still the live token (``serve_retry``, once
            # scope and resources are known); anything else is reuse (``validate_token_request``).
            request.retrying = True
        request.family = family
        if presented.expires_at <= now or family.expires_at <= now or not presented.user_live:
            raise InvalidGrantError(BAD_REFRESH_TOKEN)
        request.presented = presented
        request.user = store.Subject(family.user_id)

    def proves(self, jkt: str) -> bool:
        """The request's DPoP proof (verified in ``routes._run``) is signed with key ``jkt``."""
        proof = self.request.dpop
        return proof is not None and hmac.compare_digest(proof.jkt, jkt)

    def check_scope(self) -> None:
        # RFC 6749 §6: never wider than the sign-in's grant, nor than what the client is
        # registered for now (the admin API may have withdrawn a scope since).
        request = self.request
        registered = set(request.client.scope_list)
        granted = [s for s in request.family.scope.split() if s in registered]
        request.scope = resolve_scope(request.payload.scope, granted)

    def check_resources(self) -> None:
        # RFC 8707 §2.2: a token for any of the sign-in's resources the client may still
        # have, never another.
        request = self.request
        request.resources = rfc8707.within(
            rfc8707.requested(request.form),
            request.family.resources,
            self.server.settings,
            request.client,
        )

    CHECKS = (Grant.check_client, check_token, check_scope, check_resources)

    def validate_token_request(self) -> None:
        try:
            super().validate_token_request()
        except OAuth2Error:
            if self.request.retrying:
                # A presentation of a rotated token that is not a retry of its rotation.
                self.revoke_family(self.request.family)
            raise

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        request = self.request
        window = self.retry_window()
        successor = (
            self.server.successor(request.presented_token, request.scope, request.resources)
            if window
            else None
        )
        token = self.server.issue(request, scope=request.scope, refresh_token=successor)
        if request.retrying:
            if self.serve_retry(window, token["refresh_token"]):
                return 200, token, self.TOKEN_RESPONSE_HEADER
            self.revoke_family(request.family)
            raise InvalidGrantError(BAD_REFRESH_TOKEN)
        try:
            rotated = self.server.save_rotation(request, token["refresh_token"])
        except CommitUncertain as uncertain:
            # The answer to a rotation sent without a transaction was lost: if it landed,
            # these are the client's tokens (the token endpoint's ``landed`` asks).
            raise uncertain.with_result((200, token, self.TOKEN_RESPONSE_HEADER)) from None
        if not rotated:
            # Another request rotated this token first, or the family was revoked since it
            # was read: a replay or a race. Within a retry window, a simultaneous presentation
            # of the same token gets the successor the winner stored; otherwise it is reuse.
            if window and self.serve_retry(window, token["refresh_token"]):
                return 200, token, self.TOKEN_RESPONSE_HEADER
            self.revoke_family(request.family)
            raise InvalidGrantError(BAD_REFRESH_TOKEN)
        return 200, token, self.TOKEN_RESPONSE_HEADER

    def retry_window(self) -> int:
        """The client's refresh retry window, seconds (0: strict)."""
        client = self.request.client
        return int(client.retry_window(self.server.settings.refresh_retry_window))

    def serve_retry(self, window: int, successor: str) -> bool:
        """SPEC, refresh retries: the token presented was rotated at most ``window`` seconds
        ago and ``successor`` (recomputed from this request) is still the family's live token.
        Then this answer carries that same successor and a fresh access token, and nothing is
        written: one rotation, never a branch. A token two rotations back, a successor already
        used, another scope or other resources, or a late retry find nothing: reuse."""
        request = self.request
        rotated_at = store.retry_successor(
            request.db,
            token_id=request.presented.token_id,
            successor_hash=sha256_hex(successor),
            now=request.issued_at,
        )
        if rotated_at is None or request.issued_at - rotated_at > window:
            return False
        family = request.family
        audit(
            "refresh.retry_served",
            family_id=family.id,
            client_id=family.client_id,
            user_id=family.user_id,
            seconds_after_rotation=request.issued_at - rotated_at,
        )
        return True

    def revoke_family(self, family: store.Family) -> None:
        audit(
            "refresh.reuse_detected",
            family_id=family.id,
            client_id=family.client_id,
            user_id=family.user_id,
        )
        store.revoke_family(self.request.db, family.id, now=self.request.issued_at, reason="reuse")
