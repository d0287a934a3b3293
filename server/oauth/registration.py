"""Dynamic client registration (RFC 7591) and client configuration (RFC 7592).

``POST /oauth2/register`` registers a client; ``GET``/``PUT``/``DELETE`` on the
``registration_client_uri`` it answers (``/oauth2/register/{client_id}``) read, replace and
delete it with the ``registration_access_token`` it answers. Authlib's
``ClientRegistrationEndpoint`` and ``ClientConfigurationEndpoint`` do the protocol (what a
request must and must not carry, the response shapes and statuses); the metadata is checked by
``server.client_metadata`` (our rules: redirect URIs, grants, keys, scopes), not by Authlib's
claims class, whose checks are looser (it accepts any URL and any grant).

Credentials are looked up before Authlib runs, in the same transaction:
- ``AUTH_CLIENT_REGISTRATION=token``: an initial access token (RFC 7591 §3) from
  ``clients registration-token``, good for any number of registrations until it expires;
  ``open``: none; ``off``: the endpoint answers 404 and discovery does not name it.
- RFC 7592: the client's registration access token, stored as its SHA-256 and replaced on
  every update (the new one is in the update's answer). A read cannot repeat it (only its
  hash is kept), so a read's answer carries none.
Both are bearer tokens (RFC 6750): missing or wrong is 401 with a ``WWW-Authenticate``
challenge, and a deleted client's token is such a wrong one.

Registered clients are never admin, first-party (consent is always asked) or resource servers,
and never get the password grant or the ``admin`` scope (``client_metadata``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from authlib.oauth2.rfc6749.requests import JsonPayload, JsonRequest
from authlib.oauth2.rfc7591 import ClientRegistrationEndpoint
from authlib.oauth2.rfc7591.errors import InvalidClientMetadataError, InvalidRedirectURIError
from authlib.oauth2.rfc7592 import ClientConfigurationEndpoint
from sqlalchemy.orm import Session
from starlette.requests import Request

from ..client_metadata import ClientMetadata, MetadataError, metadata_view, parse_client_metadata
from ..manage import Credentials, credentials_for
from ..models import Client, now, sha256_hex
from .context import OAuthServer

REGISTRATION_PATH = "/oauth2/register"
TOKEN_BYTES = 32  # 256 bits, as every token we issue


class _Payload(JsonPayload):  # type: ignore[misc]
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    @property
    def data(self) -> dict[str, Any]:
        return self._data


@dataclass
class Credential:
    """What authenticated the request: an initial access token, or (RFC 7592) the client's
    registration access token."""

    client: Client | None = None

    def check_client(self, client: Client) -> bool:
        return self.client is not None and self.client.client_id == client.client_id


class RegistrationRequest(JsonRequest):  # type: ignore[misc]
    def __init__(
        self, request: Request, data: dict[str, Any], credential: Credential | None
    ) -> None:
        super().__init__(request.method, str(request.url), request.headers)
        self.payload = _Payload(data)
        self.prepared = credential
        self.issued_at = now()
        #: The synchronous ORM session of this request's unit of work (set in ``run_sync``).
        self.session: Session | None = None
        self.metadata: ClientMetadata | None = None
        self.new_client_id: str | None = None
        self.credentials: Credentials | None = None
        #: A registration access token issued by this request (shown once).
        self.new_token: str | None = None
        #: A client whose row this request changed or deleted (announced after the commit).
        self.changed: list[str] = []


def _metadata(request: RegistrationRequest, settings: Any) -> dict[str, Any]:
    try:
        meta = parse_client_metadata(request.payload.data, settings)
    except MetadataError as error:
        kind = (
            InvalidRedirectURIError
            if error.error == "invalid_redirect_uri"
            else InvalidClientMetadataError
        )
        raise kind(description=error.description) from None
    request.metadata = meta
    body: dict[str, Any] = {
        "client_name": meta.name,
        "redirect_uris": meta.redirect_uris,
        "grant_types": meta.grant_types,
        "response_types": meta.response_types,
        "token_endpoint_auth_method": meta.auth_method,
        "scope": meta.scope,
        # Always answered, as ``metadata_view`` does (RFC 9449 §5.2; false by default).
        "dpop_bound_access_tokens": meta.dpop_bound,
        # Likewise (RFC 9126 §6; false by default).
        "require_pushed_authorization_requests": meta.require_par,
    }
    if meta.post_logout_redirect_uris:
        body["post_logout_redirect_uris"] = meta.post_logout_redirect_uris
    if meta.jwks is not None:
        body["jwks"] = meta.jwks
    if meta.jwks_uri is not None:
        body["jwks_uri"] = meta.jwks_uri
    if meta.resources is not None:
        body["resources"] = meta.resources
    return body


def _apply(client: Client, meta: ClientMetadata) -> None:
    """The registered metadata onto the row (RFC 7592 §2.2: an update replaces all of it)."""
    client.name = meta.name or client.client_id
    client.redirect_uris = " ".join(meta.redirect_uris)
    client.post_logout_redirect_uris = " ".join(meta.post_logout_redirect_uris)
    client.grant_types = " ".join(meta.grant_types)
    client.scope = meta.scope
    client.jwks = meta.jwks_json
    client.jwks_uri = meta.jwks_uri
    client.resources = None if meta.resources is None else " ".join(meta.resources)
    client.dpop_bound = meta.dpop_bound
    client.require_par = meta.require_par


def _uri(server: OAuthServer, client_id: str) -> str:
    return f"{server.settings.issuer}{REGISTRATION_PATH}/{client_id}"


class Registration(ClientRegistrationEndpoint):  # type: ignore[misc]
    server: OAuthServer

    def authenticate_token(self, request: RegistrationRequest) -> Credential | None:
        return request.prepared  # checked before Authlib ran (``register``)

    def extract_client_metadata(self, request: RegistrationRequest) -> dict[str, Any]:
        return _metadata(request, self.server.settings)

    def get_server_metadata(self) -> dict[str, Any]:
        return {}  # only Authlib's claims classes read it; ours is ``client_metadata``

    def generate_client_id(self, request: RegistrationRequest) -> str:
        request.new_client_id = secrets.token_urlsafe(24)
        return request.new_client_id

    def generate_client_secret(self, request: RegistrationRequest) -> str | None:
        assert request.metadata is not None and request.new_client_id is not None
        request.credentials = credentials_for(
            request.metadata.auth_method, request.new_client_id, self.server.settings.secret_key
        )
        return request.credentials.secret

    def save_client(
        self, client_info: dict[str, Any], client_metadata: dict[str, Any], request: Any
    ) -> Client:
        assert request.metadata is not None and request.credentials is not None
        assert request.session is not None
        request.new_token = secrets.token_urlsafe(TOKEN_BYTES)
        client = Client(
            client_id=client_info["client_id"],
            secret_hash=request.credentials.secret_hash,
            secret_sealed=request.credentials.secret_sealed,
            auth_method=request.metadata.auth_method,
            origin="registration",
            registration_token_hash=sha256_hex(request.new_token),
            created_at=client_info["client_id_issued_at"],
        )
        _apply(client, request.metadata)
        request.session.add(client)
        request.session.flush()
        return client

    def generate_client_registration_info(
        self, client: Client, request: RegistrationRequest
    ) -> dict[str, Any]:
        return {
            "registration_client_uri": _uri(self.server, client.client_id),
            "registration_access_token": request.new_token,
            "client_id_issued_at": client.created_at,
        }


class Configuration(ClientConfigurationEndpoint):  # type: ignore[misc]
    server: OAuthServer

    def authenticate_token(self, request: RegistrationRequest) -> Credential | None:
        return request.prepared  # checked before Authlib ran (``configure``)

    def authenticate_client(self, request: RegistrationRequest) -> Client | None:
        return request.prepared.client if request.prepared is not None else None

    def revoke_access_token(self, token: Credential, request: RegistrationRequest) -> None:
        """Never reached: a token is found through its client's row, so no client, no token."""

    def check_permission(self, client: Client, request: RegistrationRequest) -> bool:
        # Only what registered itself manages itself: an operator's client has no token.
        return client.origin == "registration"

    def extract_client_metadata(self, request: RegistrationRequest) -> dict[str, Any]:
        return _metadata(request, self.server.settings)

    def get_server_metadata(self) -> dict[str, Any]:
        return {}

    def introspect_client(self, client: Client) -> dict[str, Any]:
        return metadata_view(client)

    def generate_client_registration_info(
        self, client: Client, request: RegistrationRequest
    ) -> dict[str, Any]:
        info: dict[str, Any] = {"registration_client_uri": _uri(self.server, client.client_id)}
        if request.new_token is not None:
            info["registration_access_token"] = request.new_token
        return info

    def update_client(
        self, client: Client, client_metadata: dict[str, Any], request: RegistrationRequest
    ) -> Client:
        meta = request.metadata
        assert meta is not None and request.session is not None
        if meta.auth_method != client.token_endpoint_auth_method:
            # Another method means other credentials: register a new client instead.
            raise InvalidClientMetadataError(
                description="token_endpoint_auth_method cannot be changed; register a new client"
            )
        _apply(client, meta)
        # RFC 7592 §3: a new registration access token with every update.
        request.new_token = secrets.token_urlsafe(TOKEN_BYTES)
        client.registration_token_hash = sha256_hex(request.new_token)
        request.changed.append(client.client_id)
        request.session.flush()
        return client

    def delete_client(self, client: Client, request: RegistrationRequest) -> None:
        assert request.session is not None
        request.session.delete(client)
        request.session.flush()
        request.changed.append(client.client_id)
