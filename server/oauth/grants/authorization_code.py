"""RFC 6749 §4.1 with PKCE (RFC 7636, S256 only, required of public clients, RFC 9700 §2.1.1).

The authorization endpoint (``authorize.py``) saves the code; the token endpoint claims it with
one conditional UPDATE, so a second exchange of one code loses and revokes what the first one
issued (§4.1.2). Authlib's own checks run first: client, code, redirect URI, PKCE.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import InvalidGrantError, InvalidRequestError
from authlib.oauth2.rfc7636 import CodeChallenge

from ...models import AuthorizationCode, Client, User, sha256_hex
from ...names import USER_AUTH_METHODS
from ...observability import audit
from .. import resources as rfc8707
from .. import store
from .base import BAD_CODE, Grant, InvalidDpopProofError

#: RFC 7636 §4.2: base64url of a SHA-256 digest is 43 characters; 43-128 unreserved ones.
CODE_CHALLENGE = re.compile(r"[A-Za-z0-9._~-]{43,128}")


class Pkce(CodeChallenge):  # type: ignore[misc]
    """RFC 7636 with the rules of RFC 9700 §2.1.1: public clients must send a challenge, and
    only S256 is accepted (``plain`` would let a leaked code be redeemed)."""

    SUPPORTED_CODE_CHALLENGE_METHOD: ClassVar[list[str]] = ["S256"]
    DEFAULT_CODE_CHALLENGE_METHOD = "S256"

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge") and not data.get("code_challenge_method"):
            # FAPI 2.0 Security Profile §5.3.2.2 item 5: every client, confidential too.
            if grant.request.client.is_public or grant.server.settings.fapi2:
                raise InvalidRequestError(
                    "PKCE is required: send code_challenge and code_challenge_method=S256."
                )
            return
        super().validate_code_challenge(grant, redirect_uri)
        # Authlib matches ``^…{43,128}$``, and ``$`` also matches before a final newline.
        if not CODE_CHALLENGE.fullmatch(data.get("code_challenge") or ""):
            raise InvalidRequestError("Invalid 'code_challenge'.")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256.")


def _replayed(code: AuthorizationCode) -> bool:
    """Whether a used code was claimed by an exchange (so using it again is a replay), not
    spent when its browser session ended. An exchange claims a code only before it expires
    (``used_at < expires_at``); ending a session stamps both with the same time."""
    return code.used_at is not None and code.used_at < code.expires_at


class CodeGrant(Grant, grants.AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = USER_AUTH_METHODS

    def check_code(self) -> None:
        """Authlib's checks of the token request: the client (and that it may use this
        grant), the code (``query_authorization_code``), the redirect URI, PKCE."""
        grants.AuthorizationCodeGrant.validate_token_request(self)

    def check_resources(self) -> None:
        # RFC 8707 §2.2: within the authorization request's resources; checked before the
        # code is spent, so a client can correct the request.
        request = self.request
        request.resources = rfc8707.within(
            rfc8707.requested(request.form),
            request.authorization_code.resources,
            self.server.settings,
            request.client,
        )

    def check_dpop_binding(self) -> None:
        """RFC 9449 §10: a code bound to a key (``dpop_jkt`` at /oauth2/authorize or the key
        of the proof sent to /oauth2/par) is redeemed only with a proof made with that key.
        Checked before the code is spent: a refusal ends nothing (SPEC.md)."""
        bound: str | None = self.request.authorization_code.dpop_jkt
        if bound is None:
            return
        proof = self.request.dpop
        if proof is None:
            raise InvalidDpopProofError("This code is bound to a DPoP key: send a proof.")
        if proof.jkt != bound:
            raise InvalidGrantError("The code is bound to another DPoP key.")

    CHECKS = (check_code, check_dpop_binding, check_resources)

    @staticmethod
    def validate_authorization_redirect_uri(request: Any, client: Client) -> str:
        """Authlib's check with a fixed description: its own quotes the URI, and refuses to
        build the error (``ValueError``, a 500) when the URI holds ``"``, ``\\`` or non-ASCII
        text, which RFC 6749 §4.1.2.1 bars from ``error_description``. Never redirected to
        (§4.1.2.1: the URI is not known to be the client's)."""
        uri: str | None = request.payload.redirect_uri
        if uri:
            if not client.check_redirect_uri(uri):
                raise InvalidRequestError("The redirect_uri is not registered for this client.")
            return uri
        default: str | None = client.get_default_redirect_uri()
        if not default:
            raise InvalidRequestError("Missing 'redirect_uri' in request.")
        return default

    def save_authorization_code(self, code: str, request: Any) -> None:
        data = request.payload.data
        issued = request.issued_at
        store.insert_code(
            request.db,
            AuthorizationCode(
                code_hash=sha256_hex(code),
                client_id=request.client.client_id,
                user_id=request.user.id,
                browser_session_id=request.browser_session_id,
                redirect_uri=data.get("redirect_uri") or request.client.get_default_redirect_uri(),
                redirect_uri_given=bool(data.get("redirect_uri")),
                scope=request.scope,
                resources=" ".join(request.resources),
                nonce=data.get("nonce"),
                code_challenge=data.get("code_challenge"),
                code_challenge_method=data.get("code_challenge_method"),
                dpop_jkt=data.get("dpop_jkt"),
                auth_time=request.auth_time,
                amr=request.amr,
                created_at=issued,
                expires_at=issued + self.server.settings.authorization_code_ttl,
                used_at=None,
                family_id=None,
            ),
        )

    def query_authorization_code(self, code: str, client: Client) -> AuthorizationCode | None:
        row = store.get_code(self.request.db, sha256_hex(code))
        if row is None or row.client_id != client.client_id:
            return None  # another client's code is refused and left alone
        if row.used_at is not None:
            if _replayed(row):
                self._revoke_what_it_issued(row)
            return None
        if row.expires_at <= self.request.issued_at:
            return None
        return row

    def authenticate_user(self, authorization_code: AuthorizationCode) -> User | None:
        user = store.get_user(self.request.db, authorization_code.user_id)
        return None if user is None or user.disabled else user

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        request = self.request
        db = request.db
        code: AuthorizationCode = request.authorization_code
        # The browser session is read back from the claimed row, not from the row loaded
        # before: signing in again may have moved the code to the browser's new session
        # meanwhile, and the family must follow it there (a later sign-out ends it).
        claimed, session_id = store.claim_code(db, code.code_hash, now=request.issued_at)
        if not claimed:
            # Another exchange of this code won (a replay, RFC 6749 §4.1.2), or the browser
            # session it was issued through ended (``manage.end_browser_sessions``).
            current = store.get_code(db, code.code_hash)
            if current is not None and _replayed(current):
                self._revoke_what_it_issued(current)
            raise InvalidGrantError(BAD_CODE)
        if session_id is not None and not store.browser_session_live(db, session_id):
            # Issued while the browser was signing out (after the sign-out spent the
            # session's codes): the sign-in it would start would outlive the sign-out.
            raise InvalidGrantError(BAD_CODE)
        user = self.authenticate_user(code)
        if user is None:
            raise InvalidGrantError(BAD_CODE)
        request.user = user
        request.scope = code.scope
        family = self.server.start_family(
            request,
            scope=code.scope,
            resources=code.resources,
            auth_time=code.auth_time,
            amr=code.amr,
            browser_session_id=session_id,
        )
        token = self.server.issue(request, scope=code.scope, nonce=code.nonce)
        self.server.save_token(token, request)
        store.record_code_family(db, code.code_hash, family.id)
        return 200, token, self.TOKEN_RESPONSE_HEADER

    def _revoke_what_it_issued(self, code: AuthorizationCode) -> None:
        audit("code.reuse_detected", client_id=code.client_id, family_id=code.family_id)
        if code.family_id is None:
            return
        store.revoke_family(
            self.request.db, code.family_id, now=self.request.issued_at, reason="code_reuse"
        )
