"""Verify the token server's access tokens in a Python API (README, "For resource servers").

A package of its own: it depends on joserfc and httpx (and FastAPI for ``fastapi.py``), never
on the token server. It fetches the token server's keys through discovery (``keys.py``),
checks RFC 9068 access tokens (``tokens.py``) and DPoP proofs (``dpop.py``), asks
introspection when told to (``introspection.py``), answers RFC 6750 / RFC 9449 challenges
naming its RFC 9728 metadata (``challenges.py``, ``metadata.py``), and plugs into FastAPI or
any ASGI app.
"""

from .asgi import TokenMiddleware
from .config import Introspection, ResourceServerConfig
from .errors import TokenError
from .metadata import protected_resource_metadata
from .verifier import TokenVerifier, VerifiedToken

__all__ = [
    "Introspection",
    "ResourceServerConfig",
    "TokenError",
    "TokenMiddleware",
    "TokenVerifier",
    "VerifiedToken",
    "protected_resource_metadata",
]
