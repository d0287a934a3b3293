"""Second factors and what a sign-in proved: the methods (``amr``, RFC 8176), the level
(``acr``), the deployment's policy (``AUTH_MFA``), and the signed, short-lived values the
hosted pages hand the browser between two steps of a sign-in.

**Methods** (RFC 8176 §2): ``pwd`` a password; ``otp`` a one-time code (RFC 6238) or a
recovery code (a look-up secret, NIST SP 800-63B §5.1.2); ``hwk`` a passkey bound to its
device, ``swk`` a passkey that may be synced (WebAuthn L3 §6.1.3: backup eligible); ``mfa``
whenever more than one factor was used, which a passkey with user verification is on its own
(possession of the key, and the PIN or biometric that unlocked it).

**Levels** (``acr``, OpenID Connect Core §2), weakest first: ``1`` a password; ``2`` a
password and a second factor; ``phr`` a passkey (phishing-resistant, OpenID EAP ACR Values
1.0 §2.1); ``phrh`` a device-bound passkey (§2.2). A request for one level is satisfied by
any level at or after it in that order.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import struct
from dataclasses import dataclass
from ipaddress import ip_address
from urllib.parse import urlsplit

from .config import Settings
from .models import now

PWD, OTP, HWK, SWK, MFA = "pwd", "otp", "hwk", "swk", "mfa"
#: The ``acr`` values, weakest first (``acr_values_supported`` in discovery).
ACR_VALUES = ("1", "2", "phr", "phrh")
#: How long a half-finished sign-in (password given, second factor not yet) stays open.
PENDING_TTL = 300
#: How long a WebAuthn challenge may be answered (§13.4.3: "the challenge ... short-lived").
CHALLENGE_TTL = 300
#: Adding a factor needs a sign-in at most this old (else the person signs in again).
RECENT_SIGN_IN = 600


# -- amr and acr ---------------------------------------------------------------------------


def amr_of(*methods: str) -> str:
    """The ``amr`` text of a sign-in by ``methods`` (space-separated, ``mfa`` added when
    earned): what the session, code and family rows keep."""
    found = list(dict.fromkeys(m for m in methods if m and m != MFA))
    if len(found) > 1 or HWK in found or SWK in found:
        # A passkey is used only with user verification (``passkeys.py``): two factors.
        found.append(MFA)
    return " ".join(found)


def session_amr(amr: str) -> str:
    """A live sign-in's methods: empty means one from before methods were recorded (a
    session older than migration 0011, or made by a 0010 replica during a rolling upgrade),
    which was a password: that is all those releases signed in with."""
    return amr or PWD


def amr_list(amr: str) -> list[str]:
    return amr.split()


def acr_of(amr: str) -> str | None:
    """The level a sign-in by ``amr`` reached; ``None`` for a sign-in from before methods
    were recorded (no claim is better than a wrong one)."""
    methods = set(amr.split())
    if HWK in methods:
        return "phrh"
    if SWK in methods:
        return "phr"
    if MFA in methods:
        return "2"
    if methods:
        return "1"
    return None


def satisfies(amr: str, requested: list[str]) -> bool:
    """Whether a sign-in by ``amr`` meets one of the ``requested`` levels (OpenID Connect Core
    §3.1.2.1 ``acr_values``, in order of preference; unknown values are ignored, and nothing
    known asked for is met by anything)."""
    known = [ACR_VALUES.index(v) for v in requested if v in ACR_VALUES]
    if not known:
        return True
    reached = acr_of(amr)
    return reached is not None and ACR_VALUES.index(reached) >= min(known)


def is_multi_factor(amr: str) -> bool:
    return MFA in amr.split()


# -- policy -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Factors:
    """What a person has enrolled."""

    totp: bool = False
    passkeys: int = 0
    #: Passkeys that cannot leave their device (not backup eligible): ``phrh``.
    bound_passkeys: int = 0
    recovery_codes: int = 0  # unused ones

    @property
    def any(self) -> bool:
        return self.totp or self.passkeys > 0

    def best_amr(self) -> str:
        """The methods of the strongest sign-in these factors allow."""
        if self.bound_passkeys:
            return amr_of(HWK)
        if self.passkeys:
            return amr_of(SWK)
        if self.totp:
            return amr_of(PWD, OTP)
        return amr_of(PWD)


def second_step_needed(settings: Settings, factors: Factors) -> bool:
    """After a password: ``required`` asks everyone for a second factor, ``optional`` those who
    chose one (a one-time code app turns it on; a passkey alone signs in by itself)."""
    if settings.mfa == "off":
        return False
    if settings.mfa == "required":
        return True
    return factors.totp


def target_level(requested: list[str]) -> str:
    """The level a step-up must reach to meet ``requested`` (``satisfies``: the weakest known
    one); ``2`` when nothing known is asked (``AUTH_MFA=required``: a second factor)."""
    known = [ACR_VALUES.index(v) for v in requested if v in ACR_VALUES]
    return ACR_VALUES[max(min(known), ACR_VALUES.index("2"))] if known else "2"


def step_up_helps(amr: str, factors: Factors, requested: list[str]) -> bool:
    """Whether to ask a signed-in person for another factor: the requested level is not met
    by their sign-in (``amr``) and one of their factors can meet it. ``acr_values`` is a
    voluntary claim (OpenID Connect Core §5.5.1.1): when nothing they have can meet it, the
    sign-in goes on and the ID token's ``acr`` says what it reached."""
    return not satisfies(amr, requested) and satisfies(factors.best_amr(), requested)


def may_change_factors(amr: str, factors: Factors) -> bool:
    """Whether a sign-in by ``amr`` may add or remove a factor of a person who has
    ``factors``: a person without one may (their password is all the account has), one with
    a factor only from a sign-in that used a second factor (NIST SP 800-63B §6.1.2.1: an
    authenticator is bound, and unbound, at the level it is used at). Otherwise a password
    alone would let whoever knows it add their own passkey, then claim the strongest level
    and sign in with it for ever."""
    return not factors.any or is_multi_factor(amr)


def enrolled_amr(amr: str, factors: Factors, method: str) -> str:
    """The session's methods after enrolling ``method``: a first factor upgrades the sign-in
    to what it now proved (the person used the new factor, and the account had nothing more
    to prove: that is how ``AUTH_MFA=required`` enrolment goes on); a further one changes
    nothing (the session already proved a second factor to be allowed to add it)."""
    known = session_amr(amr)
    return known if factors.any else amr_of(*known.split(), method)


# -- passkeys: where they work ------------------------------------------------------------


def rp_id(settings: Settings) -> str | None:
    """The relying party id (WebAuthn L3 §5.1.2: a registrable domain suffix of the origin):
    the issuer's host. ``None`` where passkeys cannot work: an IP address (not a valid RP id),
    or plain http anywhere but ``localhost`` (browsers allow WebAuthn only in secure
    contexts)."""
    parts = urlsplit(settings.issuer)
    host = (parts.hostname or "").lower()
    if not host:
        return None
    try:
        ip_address(host)
    except ValueError:
        pass
    else:
        return None
    if parts.scheme != "https" and not (host == "localhost" or host.endswith(".localhost")):
        return None
    return host


def origin(settings: Settings) -> str:
    """The origin the browser reports in ``clientDataJSON`` (§7.1 step 9)."""
    parts = urlsplit(settings.issuer)
    return f"{parts.scheme}://{parts.netloc}"


# -- signed values ------------------------------------------------------------------------


def _mac(settings: Settings, label: bytes, message: bytes) -> bytes:
    return hmac.new(settings.secret_key.encode(), label + b"|" + message, hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes | None:
    if len(text) > 4096 or not text.isascii():
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        return None


@dataclass(frozen=True)
class Pending:
    """A sign-in half done: who, what they proved so far, until when. ``session``: the browser
    session a step-up (a stronger ``acr``) is for; ``None`` for a new sign-in. ``changed``:
    the person's ``password_changed_at``, so a password change voids it."""

    user_id: str
    amr: str
    expires_at: int
    changed: int
    session: str | None = None
    #: The ``acr`` a step-up must reach (``target_level``): only factors that reach it are
    #: offered and accepted, so that a weaker one cannot send the browser round again.
    level: str | None = None
    #: Random: what makes each pending sign-in's cookie, and so its single use, its own.
    nonce: str = ""


def accepts(pending: Pending, method: str) -> bool:
    """Whether finishing ``pending`` with ``method`` reaches what it is for (any second
    factor does for a sign-in; a step-up may ask for a passkey)."""
    return pending.level is None or satisfies(amr_of(*pending.amr.split(), method), [pending.level])


def seal_pending(settings: Settings, pending: Pending) -> str:
    body = json.dumps(
        [
            pending.user_id,
            pending.amr,
            pending.expires_at,
            pending.changed,
            pending.session,
            pending.level,
            pending.nonce,
        ],
        separators=(",", ":"),
    ).encode()
    return _b64(body) + "." + _b64(_mac(settings, b"mfa-pending", body))


def open_pending(settings: Settings, value: str | None) -> Pending | None:
    """The pending sign-in a cookie value carries, if this server signed it and it is live."""
    if not value or value.count(".") != 1:
        return None
    body_text, mac_text = value.split(".")
    body, mac = _unb64(body_text), _unb64(mac_text)
    if body is None or mac is None:
        return None
    if not hmac.compare_digest(mac, _mac(settings, b"mfa-pending", body)):
        return None
    try:
        user_id, amr, expires_at, changed, session, level, nonce = json.loads(body)
    except (ValueError, TypeError):
        return None
    if expires_at <= now():
        return None
    return Pending(user_id, amr, expires_at, changed, session, level, nonce)


#: A challenge: version, expiry (8 bytes), 16 random bytes, then an HMAC of all that, the
#: purpose and what it is bound to. The server keeps nothing until it is answered; an answer
#: spends it (``ReplayGuard``, across replicas), so each is used once (WebAuthn L3 §13.4.3).
_CHALLENGE = struct.Struct(">BQ16s")
_CHALLENGE_VERSION = 1


def new_challenge(settings: Settings, purpose: str, binding: str) -> bytes:
    head = _CHALLENGE.pack(_CHALLENGE_VERSION, now() + CHALLENGE_TTL, secrets.token_bytes(16))
    return head + _mac(settings, b"webauthn-" + purpose.encode(), head + binding.encode())


def challenge_valid(settings: Settings, challenge: bytes, purpose: str, binding: str) -> bool:
    """Whether this server issued ``challenge`` for ``purpose`` and ``binding`` and it has not
    expired (whether it was already used is the caller's ``first_use``)."""
    if len(challenge) != _CHALLENGE.size + 32:
        return False
    head, mac = challenge[: _CHALLENGE.size], challenge[_CHALLENGE.size :]
    expected = _mac(settings, b"webauthn-" + purpose.encode(), head + binding.encode())
    if not hmac.compare_digest(mac, expected):
        return False
    version, expires_at, _ = _CHALLENGE.unpack(head)
    return bool(version == _CHALLENGE_VERSION and expires_at > now())


def recovery_code_hash(settings: Settings, user_id: str, code: str) -> str:
    """A keyed hash (HMAC-SHA256 under ``AUTH_SECRET_KEY``): a copy of the database alone
    does not let anyone test guesses against the ~50-bit codes offline."""
    normal = "".join(c for c in code.lower() if c.isalnum())
    return _mac(settings, b"recovery-code", f"{user_id}:{normal}".encode()).hex()
