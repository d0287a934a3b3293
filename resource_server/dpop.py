"""DPoP proofs at a resource (RFC 9449 §4.3, §7.1), checked by the API that receives them.

A token bound to a key (``cnf.jkt``) comes with ``Authorization: DPoP <token>`` and a
``DPoP`` header: a JWT the client signed, for this one request, with the key whose public half
is in the proof's ``jwk``. ``verify_proof`` makes RFC 9449 §4.3's checks:

- one ``DPoP`` header (check 1), a compact JWS of bounded length (check 2);
- ``typ`` exactly ``dpop+jwt`` (check 4), ``alg`` on the allow-list, asymmetric (check 5);
  the key in ``jwk`` only, public, RSA of 2048 bits or more, EC or OKP (check 7); the
  signature (check 6);
- ``jti`` a string, ``htm`` the method (check 8), ``htu`` the request's URI, compared after
  RFC 3986 normalisation and without query or fragment (check 9), ``iat`` within the leeways
  (check 11), ``ath`` the hash of the access token (§4.3 check 10, §7.1);
- the proof's key is the one the token is bound to (§7.1: ``invalid_token`` otherwise);
- the ``jti`` not seen before for that key while the proof could be accepted (§11.1), in a
  bounded in-process ``ReplayCache`` (one per API process: behind a load balancer a proof
  replayed to another replica within ``dpop_iat_leeway`` is not caught; §11.1 accepts
  per-server tracking).

The API issues no nonces (§9): a proof carrying one is accepted without checking it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import string
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from joserfc import jws
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import JWKRegistry, Key
from joserfc.jws import JWSRegistry

from . import errors
from .config import ResourceServerConfig
from .errors import DPOP
from .tokens import is_numeric_date

PROOF_TYPE = "dpop+jwt"
MAX_PROOF_LENGTH = 8192
MAX_JTI_LENGTH = 256
MIN_RSA_BITS = 2048
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "x5c", "x5t", "x5t#S256", "crit", "b64", "kid"})
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
DEFAULT_PORTS = {"http": 80, "https": 443}
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")


class ReplayCache:
    """``jti`` values seen, each until its proof could no longer be accepted. Bounded: past
    ``max_entries`` live entries, the oldest are forgotten first (they are the closest to
    expiring; a client needs a valid bound token to fill the cache at all)."""

    def __init__(self, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self.clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def first_use(self, key: str, ttl: float) -> bool:
        now = self.clock()
        seen = self._seen
        expiry = seen.get(key)
        if expiry is not None and expiry > now:
            return False
        while seen:  # expired entries first (insertion order is close to expiry order)
            oldest_expiry = next(iter(seen.values()))
            if oldest_expiry > now and len(seen) < self.max_entries:
                break
            seen.popitem(last=False)
        seen[key] = now + max(ttl, 0.0)
        seen.move_to_end(key)
        return True


def b64url_sha256(value: str) -> str:
    digest = hashlib.sha256(value.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def normalised_uri(value: str) -> str | None:
    """RFC 9449 §4.3 check 9 with RFC 3986 §6.2.2-§6.2.3: scheme and host lower-cased, the
    default port dropped, percent-escapes upper-cased (unreserved ones decoded), dot segments
    removed, an empty path ``/``; query and fragment dropped. ``None`` for anything else than
    an absolute http(s) URI of printable ASCII without user information."""
    if not value or any(not "!" <= char <= "~" for char in value):
        return None
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in DEFAULT_PORTS or not host or "@" in parts.netloc:
        return None
    host = f"[{host}]" if ":" in host else host
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path = _ESCAPE.sub(_escape, parts.path)
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if len(segments) > 1:
                segments.pop()
        elif segment != ".":
            segments.append(segment)
    if path.endswith(("/.", "/..")):
        segments.append("")
    return f"{scheme}://{netloc}{'/'.join(segments) or '/'}"


def _escape(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def verify_proof(
    proofs: Sequence[str],
    *,
    method: str,
    url: str,
    access_token: str,
    jkt: str,
    config: ResourceServerConfig,
    replay: ReplayCache,
    now: float | None = None,
) -> None:
    """Accept the request's proof for ``access_token`` (bound to ``jkt``), or raise
    ``TokenError``: ``invalid_dpop_proof``, or ``invalid_token`` for a proof of another key.
    ``proofs``: every ``DPoP`` header value; ``url``: the URL the client addressed (from the
    configured resource, not the ``Host`` header)."""
    if isinstance(proofs, str):
        raise TypeError("proofs is the list of DPoP header values")
    if not proofs:
        raise errors.invalid_dpop_proof("A DPoP proof is required with the DPoP scheme.")
    if len(proofs) > 1:
        raise errors.invalid_dpop_proof("Send exactly one DPoP header.")
    header, claims = _signed(proofs[0], config)
    current = time.time() if now is None else now
    jti = claims.get("jti")
    if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_LENGTH:
        raise errors.invalid_dpop_proof(
            f"The DPoP proof jti must be a string of 1 to {MAX_JTI_LENGTH}."
        )
    if claims.get("htm") != method:
        raise errors.invalid_dpop_proof("The DPoP proof htm is not the method of this request.")
    htu = claims.get("htu")
    target = normalised_uri(htu) if isinstance(htu, str) else None
    if target is None or target != normalised_uri(url):
        raise errors.invalid_dpop_proof("The DPoP proof htu is not the URI of this request.")
    iat = claims.get("iat")
    if not is_numeric_date(iat):  # 10**400 too: an int past float's range is a number
        raise errors.invalid_dpop_proof("The DPoP proof iat must be a number.")
    if iat < current - config.dpop_iat_leeway:
        raise errors.invalid_dpop_proof("The DPoP proof is too old (iat): send a new one.")
    if iat > current + config.dpop_iat_future_leeway:
        raise errors.invalid_dpop_proof("The DPoP proof iat is in the future.")
    ath = claims.get("ath")
    if not isinstance(ath, str) or not hmac.compare_digest(
        ath.encode("utf-8", "surrogatepass"), b64url_sha256(access_token).encode()
    ):
        raise errors.invalid_dpop_proof("The DPoP proof ath is not the hash of this access token.")
    thumbprint = header["jwk"].thumbprint()
    if not hmac.compare_digest(thumbprint.encode(), jkt.encode("utf-8", "surrogatepass")):
        # §7.1: the token is not the presenter's (the proof itself may be sound).
        raise errors.invalid_token("The DPoP proof key is not the one the token is bound to.", DPOP)
    ttl = iat + config.dpop_iat_leeway - current + 1
    if not replay.first_use(f"{thumbprint}\x00{jti}", ttl):
        raise errors.invalid_dpop_proof("This DPoP proof was already used: send a new one.")


def _signed(proof: str, config: ResourceServerConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header (with ``jwk`` imported) and claims of a proof whose signature is good."""
    if len(proof) > MAX_PROOF_LENGTH or not _COMPACT.fullmatch(proof):
        raise errors.invalid_dpop_proof(
            "The DPoP proof must be a signed JWT of at most 8192 characters."
        )
    segment = proof.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):
        raise errors.invalid_dpop_proof("The DPoP proof header is not JSON.") from None
    if not isinstance(header, dict):
        raise errors.invalid_dpop_proof("The DPoP proof header is not a JSON object.")
    if header.get("typ") != PROOF_TYPE:
        raise errors.invalid_dpop_proof(f"The DPoP proof typ must be {PROOF_TYPE}.")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in config.dpop_algorithms:
        raise errors.invalid_dpop_proof("The DPoP proof alg is not allowed.")
    if FORBIDDEN_HEADERS & set(header):
        raise errors.invalid_dpop_proof("The DPoP proof key must be its jwk, and only that.")
    key = _public_key(header.get("jwk"))
    try:
        with warnings.catch_warnings():
            # joserfc calls EdDSA deprecated (RFC 9864); RFC 9449 proofs still use it, and a
            # warning must not become an error where warnings are errors.
            warnings.simplefilter("ignore", SecurityWarning)
            signed = jws.deserialize_compact(
                proof, key, registry=_ProofRegistry(algorithms=[alg], strict_check_header=False)
            )
        claims = json.loads(signed.payload)
    except (JoseError, ValueError, TypeError, KeyError, RecursionError):
        raise errors.invalid_dpop_proof(
            "The DPoP proof signature does not verify with its jwk."
        ) from None
    if not isinstance(claims, dict):
        raise errors.invalid_dpop_proof("The DPoP proof claims are not a JSON object.")
    return {**header, "jwk": key}, claims


class _ProofRegistry(JWSRegistry):
    max_header_length = MAX_PROOF_LENGTH  # a header with an RSA-4096 jwk exceeds 512


def _public_key(jwk: Any) -> Key:
    if not isinstance(jwk, dict) or jwk.get("kty") not in ("RSA", "EC", "OKP"):
        raise errors.invalid_dpop_proof("The DPoP proof jwk must be a public RSA, EC or OKP key.")
    if PRIVATE_MEMBERS & set(jwk):
        raise errors.invalid_dpop_proof("The DPoP proof jwk must not carry private members.")
    if jwk["kty"] == "RSA" and _modulus_bits(jwk.get("n")) < MIN_RSA_BITS:
        # Checked before the import: joserfc warns (SecurityWarning) on importing a short RSA
        # key, an exception where warnings are errors, and log noise any client could cause.
        raise errors.invalid_dpop_proof(
            f"The DPoP proof RSA key must have {MIN_RSA_BITS} bits or more."
        )
    try:
        key = JWKRegistry.import_key(jwk)
    except (JoseError, ValueError, TypeError, KeyError):
        raise errors.invalid_dpop_proof("The DPoP proof jwk is not a valid key.") from None
    return key


def _modulus_bits(n: Any) -> int:
    """The size of an RSA JWK's modulus (RFC 7518 §6.3.1.1, base64url); 0 if unreadable."""
    if not isinstance(n, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", n):
        return 0
    try:
        raw = base64.urlsafe_b64decode(n + "=" * (-len(n) % 4))
    except ValueError:
        return 0
    return int.from_bytes(raw, "big").bit_length()
