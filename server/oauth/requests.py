"""Starlette request → Authlib ``OAuth2Request``, with the input rules of the token endpoint.

The body is read and checked (``server.forms``) before Authlib sees it, so every malformed
request gets an RFC 6749 §5.2 ``invalid_request`` (413 when oversized) instead of a 500.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import unquote

from authlib.oauth2.rfc6749 import OAuth2Request
from authlib.oauth2.rfc6749.errors import InvalidClientError, InvalidRequestError
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from starlette.requests import Request

from ..dpop import Proof
from ..forms import FormError, read_form
from ..models import Client, now
from .assertion import Presented, read_assertion
from .store import Db, Family, PresentedRefresh


class PayloadTooLargeError(InvalidRequestError):  # type: ignore[misc]
    status_code = 413


class FormRequest(OAuth2Request):  # type: ignore[misc]
    """An ``OAuth2Request`` whose form was parsed and checked by ``read_form``."""

    def __init__(self, method: str, uri: str, headers: Any, form: dict[str, str]) -> None:
        super().__init__(method, uri, headers=headers)
        # Duplicates were refused by parse_form, so one value per name is the whole truth.
        self.payload = BasicOAuth2Payload(form)
        self._form = form
        #: One clock reading per request, so every row and claim it writes agrees.
        self.issued_at = now()
        #: The request's transaction (``server.py``); ``None`` while it needs none.
        self.db: Db | None = None
        #: The refresh-token family this request starts or continues, if any.
        self.family: Family | None = None
        #: The refresh token presented to the refresh grant: as sent, and its row once found.
        self.presented_token: str | None = None
        self.presented: PresentedRefresh | None = None
        #: The presented token was already rotated, and its client has a retry window.
        self.retrying = False
        #: Authorization requests: the browser session and when its person signed in.
        self.browser_session_id: str | None = None
        self.auth_time: int | None = None
        #: ... and the methods they signed in with (``server/mfa.py``).
        self.amr = ""
        #: RFC 8707: the audiences of the token this request gets (empty: the default one).
        self.resources: list[str] = []
        #: The client this request says it is (Basic user, else ``client_id``), unverified.
        self.claimed_client_id: str | None = form.get("client_id")
        #: A ``client_assertion`` (RFC 7523 §2.2) as sent, and the client it authenticated
        #: (``assertion.ClientAssertion.verify``, before Authlib runs).
        self.assertion: Presented | None = None
        self.asserted_client: Client | None = None
        #: The request's DPoP proof (RFC 9449 §5), verified before Authlib runs
        #: (``routes._run``); the access token is bound to its key.
        self.dpop: Proof | None = None

    @property
    def form(self) -> dict[str, str]:
        return self._form


def check_basic_auth(headers: Any) -> str | None:
    """Validate an ``Authorization: Basic`` header before Authlib decodes it.

    Returns the client id it carries, ``None`` if there is no Basic header.
    """
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, credentials = value.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidClientError(
            status_code=401, description="Malformed HTTP Basic credentials."
        ) from None
    client_id, sep, secret = decoded.partition(":")
    if not sep or not client_id or not secret or "\x00" in decoded:
        raise InvalidClientError(status_code=401, description="Malformed HTTP Basic credentials.")
    return unquote(client_id)


async def form_request(request: Request, *, uri: str, limit: int) -> FormRequest:
    try:
        form = await read_form(request, limit)
    except FormError as error:
        raise (PayloadTooLargeError if error.status == 413 else InvalidRequestError)(
            str(error)
        ) from None
    basic_client_id = check_basic_auth(request.headers)
    assertion = read_assertion(form, other_credentials=basic_client_id is not None)
    if basic_client_id is not None and "client_secret" in form:
        # RFC 6749 §2.3: a client MUST NOT use more than one authentication method.
        raise InvalidRequestError("Use one client authentication method, not several.")
    if basic_client_id is not None and form.get("client_id", basic_client_id) != basic_client_id:
        raise InvalidRequestError("client_id does not match the HTTP Basic credentials.")
    oauth_request = FormRequest(request.method, uri, request.headers, form)
    oauth_request.claimed_client_id = basic_client_id or oauth_request.claimed_client_id
    if assertion is not None:
        oauth_request.assertion = assertion
        oauth_request.claimed_client_id = assertion.client_id
    return oauth_request
