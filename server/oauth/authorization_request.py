"""The checks of an authorization request that need no signed-in person, shared by
/oauth2/authorize (``authorize.py``) and /oauth2/par (``par.py``, RFC 9126 §2.1: a pushed
request is refused when /oauth2/authorize would refuse it)."""

from __future__ import annotations

import re

from authlib.oauth2.rfc6749.errors import InvalidRequestError, OAuth2Error

from ..boundary import column_length, text_problem
from ..models import AuthorizationCode
from . import resources as rfc8707
from .grants import CodeGrant
from .requests import FormRequest
from .server import TokenServer

#: Request values the code row stores verbatim, and their column lengths. The others it
#: stores (client, redirect URI, scope, resources) are matched against registered values.
STORED_LENGTHS = {
    "nonce": column_length(AuthorizationCode.nonce),
    "code_challenge": column_length(AuthorizationCode.code_challenge),
    "code_challenge_method": column_length(AuthorizationCode.code_challenge_method),
}
#: RFC 9449 §10 ``dpop_jkt``: an RFC 7638 SHA-256 thumbprint, base64url without padding.
JKT = re.compile(r"[A-Za-z0-9_-]{43}")


def check_request(server: TokenServer, request: FormRequest) -> CodeGrant:
    """Authlib's checks (client, exact redirect URI, response type, scope, PKCE), then ours;
    sets ``request.scope`` and ``request.resources``. Raises the ``OAuth2Error``, whose
    ``redirect_uri`` is set only once the redirect URI is known to be the client's (Authlib
    sets it then; RFC 6749 §4.1.2.1)."""
    grant: CodeGrant = server.get_consent_grant(request, end_user=None)
    form = request.form
    try:
        for name, length in STORED_LENGTHS.items():
            value = form.get(name)
            # The code row keeps these as the client sent them: each must fit its column.
            if value is not None and text_problem(value, length) is not None:
                raise InvalidRequestError(f"{name} must be at most {length} characters.")
        prompts = set(form.get("prompt", "").split())
        if "none" in prompts and len(prompts) > 1:
            # OpenID Connect Core §3.1.2.1.
            raise InvalidRequestError("prompt=none cannot be combined with other values.")
        max_age = form.get("max_age")
        # ASCII digits only: str.isdigit() also accepts "²" and "①", which int() refuses.
        if max_age is not None and not re.fullmatch(r"[0-9]{1,9}", max_age):
            raise InvalidRequestError("max_age must be a number of seconds.")
        jkt = form.get("dpop_jkt")
        if jkt is not None and not JKT.fullmatch(jkt):
            raise InvalidRequestError("dpop_jkt must be a base64url SHA-256 JWK thumbprint.")
        # RFC 8707 §2: the resources the grant is for (each one the client may have); the
        # token requests may narrow them.
        request.resources = rfc8707.allowed(
            rfc8707.requested(form), server.settings, request.client
        )
    except OAuth2Error as error:
        error.redirect_uri, error.state = grant.redirect_uri, form.get("state")
        raise
    return grant
