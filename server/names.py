"""The grant types and client authentication methods this server supports, named once.

Discovery, the token endpoint, the grants, the CLI, the admin API, metrics and ``check`` read
them here (this module imports nothing, so every layer may).
"""

from __future__ import annotations

from typing import Literal, get_args

GrantType = Literal["authorization_code", "password", "refresh_token", "client_credentials"]
#: RFC 8414 ``grant_types_supported``, in the order discovery lists them.
GRANT_TYPES: tuple[str, ...] = get_args(GrantType)

#: RFC 7591 §2 ``token_endpoint_auth_method`` values. A confidential client uses one of the
#: secret methods; a public client ``none`` (it identifies itself by ``client_id`` only).
CONFIDENTIAL_AUTH_METHODS: tuple[str, ...] = ("client_secret_basic", "client_secret_post")
USER_AUTH_METHODS: tuple[str, ...] = (*CONFIDENTIAL_AUTH_METHODS, "none")
