"""Client authentication with a JWT (RFC 7523 §2.2 and §3, OpenID Connect Core §9):
``private_key_jwt`` (signed with the client's private key) and ``client_secret_jwt`` (an HMAC
keyed with its secret).

Authlib's ``JWTBearerClientAssertion`` does this synchronously, inside its client
authentication; here two steps of it are async (the keys of a ``jwks_uri`` client are fetched,
the ``jti`` is checked in the shared rate-limit storage), and Authlib's core runs synchronously
(inside ``AsyncConnection.run_sync``, or with no connection at all). So the work is split:

1. ``read_assertion`` (while the form is read, ``requests.form_request``): the parameters, one
   authentication method only, the size, and the claimed client (the unverified ``sub``).
2. ``ClientAssertion.verify`` (in the async prelude of ``routes._run``): the client, its key,
   the signature with an allowed algorithm, the claims, and the ``jti`` once; the verified
   client is kept on the request.
3. ``ClientAssertion.__call__``, registered with Authlib as both methods, hands that client to
   Authlib, which checks that it is registered for the method (``Client.check_endpoint_auth_
   method``) and the endpoint allows it.

Nothing before the signature is verified tells whether a client id exists: every failure up to
there is ``CLIENT_AUTH_FAILED``, as for a wrong secret. After it, the description says what was
wrong (only the holder of the key can learn it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from authlib.oauth2.rfc6749.errors import InvalidClientError, InvalidRequestError
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from authlib.oauth2.rfc7523.client import ASSERTION_TYPE
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet, OctKey

from ..boundary import text_problem
from ..clients import CLIENT_ID_LENGTH, ClientCache
from ..config import Settings
from ..models import Client, now
from ..names import FAPI2_ALGS, JWT_AUTH_METHODS, PRIVATE_KEY_ALGS, SECRET_ALGS
from ..observability import log
from ..replay import ReplayGuard
from ..secretbox import UnsealError, unseal
from .client_keys import ClientKeys, KeysUnavailable

#: An assertion longer than this is refused before it is parsed: a few claims and a signature
#: (an RSA-4096 one is 683 characters) fit many times over.
MAX_ASSERTION_LENGTH = 8192
#: Clock skew allowed on ``exp``, ``nbf`` and ``iat`` (RFC 7519 §4.1.4: "a few minutes" at most).
LEEWAY = 30
#: RFC 7523 §3 item 4 lets the server limit how far ahead ``exp`` may be; SPEC.md: 5 minutes.
#: This bounds how long each ``jti`` must be remembered.
MAX_LIFETIME = 300
MAX_JTI_LENGTH = 256
#: The ``ReplayGuard`` namespace of assertion ``jti`` values (per client).
REPLAY_NAMESPACE = "client-assertion"
#: The one description of a failed client authentication (RFC 6749 §5.2 ``invalid_client``);
#: ``server.CLIENT_AUTH_FAILED`` is the same text.
CLIENT_AUTH_FAILED = "Client authentication failed."


def _failed(description: str = CLIENT_AUTH_FAILED) -> InvalidClientError:
    return InvalidClientError(status_code=401, description=description)


@dataclass(frozen=True)
class Presented:
    """A ``client_assertion`` as sent: parsed, not verified."""

    assertion: str
    headers: dict[str, Any]
    client_id: str


def read_assertion(form: dict[str, str], *, other_credentials: bool) -> Presented | None:
    """The assertion of a request, ``None`` without one. ``other_credentials``: the request also
    carries a secret (HTTP Basic); RFC 6749 §2.3: one method per request."""
    assertion_type = form.get("client_assertion_type")
    assertion = form.get("client_assertion")
    if assertion_type is None and assertion is None:
        return None
    if other_credentials or "client_secret" in form:
        raise InvalidRequestError("Use one client authentication method, not several.")
    if assertion_type != ASSERTION_TYPE:
        raise InvalidRequestError(f"client_assertion_type must be {ASSERTION_TYPE}.")
    if not assertion:
        raise InvalidRequestError("Missing 'client_assertion' parameter.")
    if len(assertion) > MAX_ASSERTION_LENGTH:
        raise _failed()
    try:
        headers, claims = JWTBearerClientAssertion.extract_assertion(None, assertion)
    except InvalidClientError:
        raise _failed() from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or text_problem(subject, CLIENT_ID_LENGTH) is not None:
        raise _failed()
    client_id = form.get("client_id")
    if client_id is not None and client_id != subject:
        raise InvalidRequestError("client_id does not match the client assertion's subject.")
    return Presented(assertion, dict(headers), subject)


class ClientAssertion(JWTBearerClientAssertion):  # type: ignore[misc]
    """Authlib's assertion authentication with this server's checks; built once per app and
    registered for both JWT methods (``server.TokenServer``)."""

    CLIENT_AUTH_METHOD = "client_assertion_jwt"

    def __init__(
        self, settings: Settings, clients: ClientCache, keys: ClientKeys, replay: ReplayGuard
    ) -> None:
        # ``jti`` is checked (async, in the shared storage) by ``verify``, after the claims.
        super().__init__(validate_jti=False, leeway=LEEWAY)
        self.settings = settings
        self.clients = clients
        self.keys = keys
        self.replay = replay

    def __call__(self, query_client: Any, request: Any) -> Client | None:
        """Authlib's client-authentication method: the client ``verify`` authenticated."""
        client: Client | None = getattr(request, "asserted_client", None)
        return client

    def get_audiences(self) -> list[str]:
        """RFC 7523 §3 item 3: the issuer or the token endpoint (OpenID Connect Core §9 names
        the token endpoint; RFC 7523 and FAPI 2.0 the issuer). ``verify`` adds the URL of the
        endpoint the assertion was sent to (revocation, introspection)."""
        issuer = self.settings.issuer
        if self.settings.fapi2:
            # FAPI 2.0 Security Profile §5.3.2.1: the issuer, and nothing else.
            return [issuer]
        return [issuer, issuer + "/oauth2/token"]

    def check_claims(self, claims: dict[str, Any], audiences: list[str]) -> None:
        """RFC 7523 §3 on a verified assertion; ``InvalidClientError`` saying what is wrong."""
        registry = jwt.JWTClaimsRegistry(
            now=now,
            leeway=self.leeway,
            iss={"essential": True},
            sub={"essential": True},
            aud={"essential": True, "values": audiences},
            exp={"essential": True},
            jti={"essential": True},
        )
        try:
            registry.validate(claims)
        except JoseError as error:
            raise _failed(f"Invalid client assertion: {error.description}") from None
        if claims["iss"] != claims["sub"]:
            raise _failed("Invalid client assertion: iss and sub must both be the client id.")
        if claims["exp"] > now() + MAX_LIFETIME + self.leeway:
            raise _failed(
                f"Invalid client assertion: exp is more than {MAX_LIFETIME} seconds ahead."
            )
        jti = claims["jti"]
        if not isinstance(jti, str) or text_problem(jti, MAX_JTI_LENGTH) is not None:
            raise _failed("Invalid client assertion: jti must be a string.")

    async def verify(self, request: Any, presented: Presented) -> Client:
        """Authenticate the client of ``presented`` for ``request`` (an RFC 7523 §3 check
        each), and keep it on the request for ``__call__``."""
        client = await self.clients.get(presented.client_id)
        if client is None or client.token_endpoint_auth_method not in JWT_AUTH_METHODS:
            raise _failed()
        method = client.token_endpoint_auth_method
        alg = presented.headers.get("alg")
        allowed = PRIVATE_KEY_ALGS if method == "private_key_jwt" else SECRET_ALGS
        if self.settings.fapi2:
            allowed = FAPI2_ALGS  # §5.4.1
        # An allow-list per method: never ``none``, never an HMAC keyed with a public key.
        if not isinstance(alg, str) or alg not in allowed:
            raise _failed()
        claims = self._verified_claims(presented, alg, await self._candidates(client, presented))
        audiences = self.get_audiences()
        if not self.settings.fapi2:
            audiences.append(request.uri)
        self.check_claims(claims, audiences)
        # RFC 7523 §3 item 7: once per client, remembered until the assertion has expired.
        ttl = claims["exp"] - now() + self.leeway
        first = await self.replay.first_use(
            REPLAY_NAMESPACE, f"{client.client_id}\x00{claims['jti']}", ttl
        )
        if not first:
            raise _failed("Invalid client assertion: this jti was already used.")
        request.asserted_client = client
        return client

    async def _candidates(self, client: Client, presented: Presented) -> list[Key]:
        """The keys that may have signed it: the sealed secret of a ``client_secret_jwt``
        client; the client's key named by ``kid``, else each of its keys."""
        if client.token_endpoint_auth_method == "client_secret_jwt":  # noqa: S105 (a method)
            if client.secret_sealed is None:
                raise _failed()
            try:
                secret = unseal(
                    self.settings.secret_key, client.secret_sealed, context=client.client_id
                )
            except UnsealError:
                # AUTH_SECRET_KEY changed since the secret was sealed: rotate the secret.
                log.warning("client_assertion.unseal_failed", client_id=client.client_id)
                raise _failed() from None
            return [OctKey.import_key(secret)]
        kid = presented.headers.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _failed()
        try:
            keys: KeySet = await self.keys.keyset(client, kid=kid)
        except KeysUnavailable as error:
            log.warning(
                "client_assertion.keys_unavailable", client_id=client.client_id, error=str(error)
            )
            raise _failed() from None
        alg = presented.headers["alg"]
        return [key for key in keys if (kid is None or key.kid == kid) and key.alg in (None, alg)]

    def _verified_claims(self, presented: Presented, alg: str, keys: list[Key]) -> dict[str, Any]:
        for key in keys:
            try:
                token = jwt.decode(presented.assertion, key, algorithms=[alg])
            except (JoseError, ValueError, TypeError):
                continue
            claims: dict[str, Any] = token.claims
            return claims
        raise _failed()
