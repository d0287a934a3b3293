"""The grant types and client authentication methods this server supports, named once.

Discovery, the token endpoint, the grants, the CLI, the admin API, metrics and ``check`` read
them here (this module imports nothing, so every layer may).
"""

from __future__ import annotations

from typing import Literal, get_args

GrantType = Literal["authorization_code", "password", "refresh_token", "client_credentials"]
#: RFC 8414 ``grant_types_supported``, in the order discovery lists them.
GRANT_TYPES: tuple[str, ...] = get_args(GrantType)

#: RFC 7591 §2 ``token_endpoint_auth_method`` values.
AuthMethod = Literal[
    "client_secret_basic", "client_secret_post", "private_key_jwt", "client_secret_jwt", "none"
]
#: The shared-secret methods. A client with a secret may use either (as it always could): they
#: differ only in where the secret travels.
SECRET_AUTH_METHODS: tuple[str, ...] = ("client_secret_basic", "client_secret_post")
#: RFC 7523 §2.2 / OpenID Connect Core §9: a signed JWT (``client_assertion``) instead of a
#: secret: signed with the client's private key, or HMAC'd with its secret.
JWT_AUTH_METHODS: tuple[str, ...] = ("private_key_jwt", "client_secret_jwt")
#: Every method a client may be registered with: a confidential client one of the first four,
#: a public client ``none`` (it identifies itself by ``client_id`` only).
CLIENT_AUTH_METHODS: tuple[str, ...] = get_args(AuthMethod)
KEYED_AUTH_METHODS: tuple[str, ...] = (*SECRET_AUTH_METHODS, *JWT_AUTH_METHODS)
#: What the token, revocation and introspection endpoints accept from a confidential client.
CONFIDENTIAL_AUTH_METHODS: tuple[str, ...] = KEYED_AUTH_METHODS
USER_AUTH_METHODS: tuple[str, ...] = (*CONFIDENTIAL_AUTH_METHODS, "none")

#: ``token_endpoint_auth_signing_alg_values_supported`` (RFC 8414 §2): asymmetric algorithms
#: for ``private_key_jwt``, HMAC for ``client_secret_jwt``. Never ``none``; an HMAC alg is
#: accepted only from a ``client_secret_jwt`` client, keyed with its secret, so a public key
#: can never be used as an HMAC secret.
PRIVATE_KEY_ALGS: tuple[str, ...] = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
SECRET_ALGS: tuple[str, ...] = ("HS256", "HS384", "HS512")

#: ``dpop_signing_alg_values_supported`` (RFC 9449 §5.1): the algorithms a DPoP proof may be
#: signed with. Asymmetric only (RFC 9449 §4.2: a MAC-based algorithm must not be used, and
#: ``none`` never): the proof carries the public key it is checked with.
DPOP_ALGS: tuple[str, ...] = PRIVATE_KEY_ALGS
#: FAPI 2.0 Security Profile §5.4.1 (``AUTH_FAPI2``): the only algorithms of client assertions
#: and DPoP proofs.
FAPI2_ALGS: tuple[str, ...] = ("PS256", "ES256", "EdDSA")
