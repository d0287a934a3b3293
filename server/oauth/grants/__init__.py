"""The token grants, one module each: ``CHECKS`` in order, then one issue step (``base.py``)."""

from .authorization_code import CodeGrant, Pkce
from .base import (
    BAD_CODE,
    BAD_CREDENTIALS,
    BAD_REFRESH_TOKEN,
    SECOND_FACTOR_NEEDED,
    InvalidDpopProofError,
    resolve_scope,
)
from .client_credentials import ClientCredentialsGrant
from .password import PasswordGrant
from .refresh_token import RefreshTokenGrant

__all__ = [
    "BAD_CODE",
    "BAD_CREDENTIALS",
    "BAD_REFRESH_TOKEN",
    "SECOND_FACTOR_NEEDED",
    "ClientCredentialsGrant",
    "CodeGrant",
    "InvalidDpopProofError",
    "PasswordGrant",
    "Pkce",
    "RefreshTokenGrant",
    "resolve_scope",
]
