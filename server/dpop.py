"""DPoP proofs (RFC 9449): checking the ``DPoP`` header of a request, and the nonces the server
issues for them (§8, §9).

A DPoP proof is a JWT the client signs, for one request, with a key whose public half travels
in the proof's header (``jwk``). A token bound to that key (``cnf.jkt``: the key's RFC 7638
thumbprint) is worth nothing without a fresh proof, so a stolen token alone is useless.
``DpopVerifier.verify`` makes every check of RFC 9449 §4.3, in its order:

1. one ``DPoP`` header (§4.3 check 1), a compact JWS (check 2) of bounded length;
2. ``typ`` exactly ``dpop+jwt`` (check 4), ``alg`` one of ``names.DPOP_ALGS``: asymmetric,
   never ``none`` or an HMAC (check 5); the key in ``jwk`` only (no ``jku``, ``x5u``, ``x5c``:
   the proof is checked with the key it carries, nothing is fetched), a public RSA (2048 bits
   or more), EC or OKP key without private members (check 7); the signature with that key
   (check 6);
3. the claims (check 3): ``jti`` (a string, remembered once per key until the proof expires,
   check 12 and §11.1, across replicas through ``replay.ReplayGuard``), ``htm`` equal to the
   method (check 8), ``htu`` equal to the request's URI after normalisation (check 9),
   ``iat`` within ``AUTH_DPOP_IAT_LEEWAY`` seconds past / ``AUTH_DPOP_IAT_FUTURE_LEEWAY``
   ahead (check 11), ``ath`` the hash of the access token where one is presented (check 10);
4. ``nonce``, one this server issued (check 10), when ``AUTH_DPOP_REQUIRE_NONCE`` is on or
   the proof carries one;
5. the key, when the token, code or refresh token is bound to one (``required_jkt``).

Errors are ``DpopError`` (``invalid_dpop_proof``), ``DpopNonceError`` (``use_dpop_nonce``,
with the nonce to send in ``DPoP-Nonce``) and ``DpopBindingError`` (a proof with another key,
or none, for a bound credential: the caller answers ``invalid_grant`` at the token endpoint
and ``invalid_token`` at a resource, RFC 9449 §5 and §7.1). Descriptions are in the character
set of RFC 6749 §5.2 and never quote the proof.

Nonces (§8, §9) need no shared state: the nonce of a time slot (``AUTH_DPOP_NONCE_LIFETIME``
seconds) is an HMAC of the slot number under a key derived from ``AUTH_SECRET_KEY``. Every
replica with the same secret computes the same nonce, and accepts the current slot's, the
previous one's (a nonce handed out at the end of a slot stays good for a whole slot more) and
the next one's (a replica whose clock is a little ahead may already hand it out). A nonce
thus rotates every slot by itself, and changing ``AUTH_SECRET_KEY`` invalidates all of them
(a client then gets ``use_dpop_nonce`` with a new one and retries).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import string
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from joserfc import jws
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import JWKRegistry, Key
from joserfc.jws import JWSRegistry

from .boundary import text_problem
from .config import Settings
from .models import now
from .names import DPOP_ALGS, FAPI2_ALGS
from .replay import ReplayGuard

INVALID_DPOP_PROOF = "invalid_dpop_proof"
USE_DPOP_NONCE = "use_dpop_nonce"
#: RFC 9449 §4.2: the ``typ`` header of a proof, compared exactly.
PROOF_TYPE = "dpop+jwt"
#: A proof longer than this is refused before it is parsed: a header with an RSA-4096 key,
#: four claims and its signature take about 2,000 characters.
MAX_PROOF_LENGTH = 8192
MAX_JTI_LENGTH = 256
MAX_NONCE_LENGTH = 256
MIN_RSA_BITS = 2048
#: The ``ReplayGuard`` namespace of proof ``jti`` values (per key).
REPLAY_NAMESPACE = "dpop"
#: Key references a proof must not carry: its key is the ``jwk`` it holds, nothing else is
#: fetched or believed. ``crit`` and ``b64`` (RFC 7797) change how the JWS is read.
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "x5c", "x5t", "x5t#S256", "crit", "b64"})
#: RFC 7517 §4 private members of RSA, EC and OKP keys, and the symmetric ``k``.
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
PUBLIC_KEY_TYPES = ("RSA", "EC", "OKP")
DEFAULT_PORTS = {"http": 80, "https": 443}
#: Base64url characters and two dots: a compact JWS (RFC 7515 §7.1), nothing else (a comma
#: would be two header fields folded into one).
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
#: Label of the nonce key derived from ``AUTH_SECRET_KEY`` (so the secret itself signs
#: nothing a client sees).
_NONCE_LABEL = b"token-server/dpop-nonce/v1"


class DpopError(Exception):
    """A proof that cannot be accepted. ``error`` is the RFC 9449 §12.2 error code."""

    error: str = INVALID_DPOP_PROOF

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class DpopNonceError(DpopError):
    """RFC 9449 §8: the proof needs a nonce from this server. The caller answers 400 at the
    token endpoint, 401 at a resource, with ``DPoP-Nonce: <nonce>``."""

    error = USE_DPOP_NONCE

    def __init__(self, description: str, nonce: str) -> None:
        super().__init__(description)
        self.nonce = nonce


class DpopBindingError(DpopError):
    """A bound credential was presented with a proof of another key, or with none. The proof
    may be sound; the credential is not the client's to use: the caller answers
    ``invalid_grant`` (token endpoint) or ``invalid_token`` (resources)."""


@dataclass(frozen=True)
class Proof:
    """A verified proof. ``jkt`` binds tokens to its key (``cnf.jkt``, RFC 9449 §6.1)."""

    jkt: str
    jti: str
    iat: float
    htm: str
    htu: str
    jwk: dict[str, Any] = field(hash=False)


def b64url_sha256(value: str) -> str:
    """BASE64URL(SHA-256(ASCII(value))), unpadded: ``ath`` of an access token (RFC 9449
    §4.2) and the form of every thumbprint."""
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def normalise_uri(value: str) -> str | None:
    """RFC 9449 §4.3 check 9: ``value`` (an absolute http or https URI) without its query and
    fragment, normalised as RFC 3986 §6.2.2 and §6.2.3 say: scheme and host in lower case, the
    default port dropped, an empty path ``/``, percent-encodings in upper case (unreserved
    characters decoded), dot segments removed. The path stays case-sensitive. ``None`` when
    ``value`` is not such a URI (characters outside printable ASCII, user information, another
    scheme, no host, a bad port)."""
    if not value or any(not "\x21" <= char <= "\x7e" for char in value):
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
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None or port == DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = _remove_dot_segments(_PERCENT.sub(_normalise_escape, parts.path)) or "/"
    return f"{scheme}://{netloc}{path}"


def _normalise_escape(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 on an absolute path."""
    segments = path.split("/")
    output: list[str] = []
    for segment in segments:
        if segment == ".":
            continue
        if segment == "..":
            if len(output) > 1:
                output.pop()
            continue
        output.append(segment)
    if segments[-1] in (".", ".."):
        output.append("")
    return "/".join(output)


class DpopVerifier:
    """Checks DPoP proofs and issues nonces; one per app (``AppState``), sharing the app's
    ``ReplayGuard`` so a ``jti`` used on one replica is refused on all."""

    def __init__(
        self, settings: Settings, replay: ReplayGuard, clock: Callable[[], float] = now
    ) -> None:
        self.replay = replay
        self.clock = clock
        #: ``dpop_signing_alg_values_supported``: fewer under ``AUTH_FAPI2``.
        self.algs = FAPI2_ALGS if settings.fapi2 else DPOP_ALGS
        self.past = settings.dpop_iat_leeway
        self.future = settings.dpop_iat_future_leeway
        self.require_nonce = settings.dpop_require_nonce
        self.nonce_lifetime = settings.dpop_nonce_lifetime
        self._nonce_key = hmac.new(
            settings.secret_key.encode("utf-8"), _NONCE_LABEL, hashlib.sha256
        ).digest()

    # -- nonces (RFC 9449 §8, §9) --------------------------------------------------------

    def current_nonce(self) -> str:
        """The nonce to send in ``DPoP-Nonce`` now (any response may carry it, §8.2)."""
        return self._nonce(self._slot())

    def nonce_valid(self, nonce: str) -> bool:
        if len(nonce) > MAX_NONCE_LENGTH or not nonce.isascii():
            return False
        slot = self._slot()
        # Every candidate is compared (no early exit): the time taken says nothing.
        matches = [hmac.compare_digest(nonce, self._nonce(slot + d)) for d in (-1, 0, 1)]
        return any(matches)

    def _slot(self) -> int:
        return math.floor(self.clock() / self.nonce_lifetime)

    def _nonce(self, slot: int) -> str:
        digest = hmac.new(self._nonce_key, slot.to_bytes(8, "big", signed=True), "sha256")
        return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")

    # -- proofs (RFC 9449 §4.3) ----------------------------------------------------------

    async def verify(
        self,
        values: Sequence[str],
        *,
        method: str,
        url: str,
        access_token: str | None = None,
        required_jkt: str | None = None,
    ) -> Proof | None:
        """Check the proof of one request; ``None`` when it carries none (and nothing
        requires one).

        ``values``: every ``DPoP`` header of the request (Starlette's
        ``request.headers.getlist("dpop")``). ``method`` and ``url``: the request's method and
        its URI as the client addressed it: build it from ``AUTH_ISSUER`` and the path, not
        from the ``Host`` header or the scheme a proxy forwarded over (its query is ignored).
        ``access_token``: the token presented with the proof at a resource (its hash must be
        the proof's ``ath``). ``required_jkt``: the thumbprint a presented credential is bound
        to (a code's ``dpop_jkt``, a refresh token's or access token's ``cnf.jkt``); without
        a proof, or with another key, ``DpopBindingError``.

        The ``jti`` is recorded last, once every other check has passed: a refused proof does
        not use it up.
        """
        if isinstance(values, str):
            raise TypeError("values is the list of DPoP header values, not one string")
        if not values:
            if required_jkt is not None:
                raise DpopBindingError("This credential is bound to a key: send a DPoP proof.")
            return None
        if len(values) > 1:
            raise DpopError("Send exactly one DPoP header.")
        payload, key = self._verified_jws(values[0])
        claims = self._claims(payload, method=method, url=url, access_token=access_token)
        self._check_nonce(claims)
        jkt = key.thumbprint()
        if required_jkt is not None and not hmac.compare_digest(
            jkt.encode("ascii"), required_jkt.encode("utf-8", "surrogatepass")
        ):
            raise DpopBindingError("The DPoP proof is signed with another key than the one bound.")
        # §11.1: once per key, remembered for as long as the proof could be accepted.
        ttl = claims["iat"] + self.past - self.clock() + 1
        if not await self.replay.first_use(REPLAY_NAMESPACE, f"{jkt}\x00{claims['jti']}", ttl):
            raise DpopError("This DPoP proof was already used: send a new one.")
        return Proof(
            jkt=jkt,
            jti=claims["jti"],
            iat=claims["iat"],
            htm=claims["htm"],
            htu=claims["htu"],
            jwk=dict(key.as_dict(private=False)),
        )

    def _verified_jws(self, proof: str) -> tuple[dict[str, Any], Key]:
        """The claims and key of a proof whose signature is good."""
        if len(proof) > MAX_PROOF_LENGTH:
            raise DpopError(f"The DPoP proof must be at most {MAX_PROOF_LENGTH} characters.")
        if not _COMPACT.fullmatch(proof):
            raise DpopError("The DPoP proof must be a signed JWT (JWS compact serialization).")
        try:
            header = json.loads(_b64decode(proof.split(".", 1)[0]))
        except (ValueError, RecursionError):
            raise DpopError("The DPoP proof header is not base64url-encoded JSON.") from None
        if not isinstance(header, dict):
            raise DpopError("The DPoP proof header is not a JSON object.")
        if header.get("typ") != PROOF_TYPE:
            raise DpopError(f"The DPoP proof typ must be {PROOF_TYPE}.")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algs:
            raise DpopError(f"The DPoP proof alg must be one of {' '.join(self.algs)}.")
        forbidden = FORBIDDEN_HEADERS & set(header)
        if forbidden:
            raise DpopError(
                f"The DPoP proof header must not carry {', '.join(sorted(forbidden))}: "
                "its key is the jwk it holds."
            )
        key = _public_key(header.get("jwk"))
        try:
            with warnings.catch_warnings():
                # joserfc calls EdDSA deprecated (RFC 9864); RFC 9449 proofs still use it.
                warnings.simplefilter("ignore", SecurityWarning)
                signed = jws.deserialize_compact(proof, key, registry=_registry(alg))
        except (JoseError, ValueError, TypeError, KeyError, RecursionError):
            raise DpopError("The DPoP proof signature does not verify with its jwk.") from None
        try:
            claims = json.loads(signed.payload)
        except (ValueError, RecursionError):
            raise DpopError("The DPoP proof claims are not JSON.") from None
        if not isinstance(claims, dict):
            raise DpopError("The DPoP proof claims are not a JSON object.")
        return claims, key

    def _claims(
        self, claims: dict[str, Any], *, method: str, url: str, access_token: str | None
    ) -> dict[str, Any]:
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or text_problem(jti, MAX_JTI_LENGTH) is not None:
            raise DpopError(f"The DPoP proof jti must be a string of 1 to {MAX_JTI_LENGTH}.")
        htm = claims.get("htm")
        if not isinstance(htm, str):
            raise DpopError("The DPoP proof htm must be a string.")
        if htm != method:
            raise DpopError("The DPoP proof htm is not the method of this request.")
        htu = claims.get("htu")
        if not isinstance(htu, str):
            raise DpopError("The DPoP proof htu must be a string.")
        target = normalise_uri(htu)
        if target is None or target != normalise_uri(url):
            raise DpopError("The DPoP proof htu is not the URI of this request.")
        iat = claims.get("iat")
        if isinstance(iat, bool) or not isinstance(iat, int | float) or not math.isfinite(iat):
            raise DpopError("The DPoP proof iat must be a number (seconds since the epoch).")
        current = self.clock()
        if iat < current - self.past:
            raise DpopError("The DPoP proof is too old (iat): send a new one.")
        if iat > current + self.future:
            raise DpopError("The DPoP proof iat is in the future: check the client clock.")
        if access_token is not None:
            ath = claims.get("ath")
            if ath is None:
                raise DpopError("The DPoP proof must carry ath, the hash of the access token.")
            if not isinstance(ath, str) or not hmac.compare_digest(
                ath.encode("utf-8", "surrogatepass"), b64url_sha256(access_token).encode()
            ):
                raise DpopError("The DPoP proof ath is not the hash of this access token.")
        return claims

    def _check_nonce(self, claims: dict[str, Any]) -> None:
        """§8: a required nonce must be present; any nonce sent must be one of ours, current
        (a stale one gets the current one to retry with)."""
        nonce = claims.get("nonce")
        if nonce is None:
            if self.require_nonce:
                raise DpopNonceError(
                    "A DPoP nonce is required: use the one in the DPoP-Nonce header.",
                    self.current_nonce(),
                )
            return
        if not isinstance(nonce, str):
            raise DpopError("The DPoP proof nonce must be a string.")
        if not self.nonce_valid(nonce):
            raise DpopNonceError(
                "The DPoP nonce is stale or unknown: use the one in the DPoP-Nonce header.",
                self.current_nonce(),
            )


class _ProofRegistry(JWSRegistry):
    #: joserfc's default (512 bytes) is shorter than the header of a proof with an RSA key
    #: of 3072 bits or more; the whole proof is bounded by ``MAX_PROOF_LENGTH`` already.
    max_header_length = MAX_PROOF_LENGTH


def _registry(alg: str) -> JWSRegistry:
    """The one algorithm the header names (checked against ``DPOP_ALGS``); header members
    joserfc does not know are allowed (RFC 7515 §4: ignored unless listed in ``crit``, which
    a proof may not carry), those it knows are type-checked."""
    return _ProofRegistry(algorithms=[alg], strict_check_header=False)


def _b64decode(segment: Any) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _public_key(jwk: Any) -> Key:
    """RFC 9449 §4.3 check 7: the proof's ``jwk``, a public asymmetric signing key."""
    if not isinstance(jwk, dict):
        raise DpopError("The DPoP proof header must carry its public key as jwk.")
    if jwk.get("kty") not in PUBLIC_KEY_TYPES:
        raise DpopError("The DPoP proof jwk must be a public RSA, EC or OKP key.")
    if PRIVATE_MEMBERS & set(jwk):
        raise DpopError("The DPoP proof jwk must be a public key: a private member was sent.")
    if jwk.get("use", "sig") != "sig":
        raise DpopError("The DPoP proof jwk must be a signing key.")
    if jwk["kty"] == "RSA":
        # Measured before import: joserfc would only warn of a small key.
        modulus = jwk.get("n")
        try:
            bits = int.from_bytes(_b64decode(modulus), "big").bit_length()
        except (TypeError, ValueError):  # not a string, or not base64url
            bits = 0
        if bits < MIN_RSA_BITS:
            raise DpopError(f"The DPoP proof RSA key must be at least {MIN_RSA_BITS} bits.")
    try:
        key = JWKRegistry.import_key(jwk)
    except (JoseError, ValueError, TypeError, KeyError):
        raise DpopError("The DPoP proof jwk cannot be read.") from None
    if key.is_private:
        raise DpopError("The DPoP proof jwk must be a public key.")
    return key
