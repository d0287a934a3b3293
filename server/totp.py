"""One-time codes from an authenticator app (TOTP, RFC 6238) and recovery codes.

- **Secret**: 160 random bits (RFC 4226 §4 R6 recommends 160), base32 for the app, sealed at
  rest with ``secretbox`` under ``AUTH_SECRET_KEY``, bound to its row by the context
  ``totp:<user id>`` (a sealed secret copied to another person's row does not open there).
- **Codes**: six digits, 30-second steps, HMAC-SHA1 (RFC 6238 §4, the defaults every app
  knows). A code is checked against the step now and one step either side (§5.2: "at most one
  time step is allowed as the network delay"), each comparison in constant time.
- **Replay** (§5.2: "the verifier MUST NOT accept the second attempt of the same OTP"): a code
  is accepted only if one conditional UPDATE moves ``last_step`` forward to its step. A code
  already used, or one of an earlier step than the last accepted, changes no row, whichever
  replica or concurrent request tries it (the database serialises the two UPDATEs).
- **Recovery codes** (look-up secrets, NIST SP 800-63B §5.1.2): ten, each ten characters from
  an alphabet without look-alikes (about 49 bits), shown once as ``xxxxx-xxxxx``; only a keyed
  hash is kept (``mfa.recovery_code_hash``). Using one is a conditional UPDATE of ``used_at``
  where it is still NULL: once, and only once.
"""

from __future__ import annotations

import hmac
import io
import re
import secrets
from urllib.parse import urlsplit

import pyotp
import segno
from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncSession

from . import secretbox
from .config import Settings
from .mfa import recovery_code_hash
from .models import RecoveryCode, TotpFactor, now

#: RFC 6238 §4: X (the step) 30 seconds; six digits (RFC 4226 §5.3).
STEP_SECONDS = 30
DIGITS = 6
#: §5.2: one step of delay either way.
WINDOW = 1
#: 32 base32 characters = 160 bits (RFC 4226 §4 R6).
SECRET_LENGTH = 32

RECOVERY_CODES = 10
RECOVERY_CODE_LENGTH = 10
#: No 0/o, 1/l/i: a code copied from paper is read back as written.
RECOVERY_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"
#: Anything longer is no code of ours: refused before any hashing or query.
MAX_CODE_LENGTH = 64

_TOTP_CODE = re.compile(rf"[0-9]{{{DIGITS}}}")
_SEPARATORS = re.compile(r"[\s-]+")


# -- the secret ----------------------------------------------------------------------------


def new_secret() -> str:
    return pyotp.random_base32(SECRET_LENGTH)


def _context(user_id: str) -> str:
    return "totp:" + user_id


def seal(settings: Settings, user_id: str, secret: str) -> str:
    return secretbox.seal(settings.secret_key, secret, context=_context(user_id))


def unseal(settings: Settings, user_id: str, sealed: str) -> str | None:
    """The secret, or ``None`` when it cannot be opened (altered, another row's, or sealed
    under a previous ``AUTH_SECRET_KEY``)."""
    try:
        return secretbox.unseal(settings.secret_key, sealed, context=_context(user_id))
    except secretbox.UnsealError:
        return None


def issuer_label(settings: Settings) -> str:
    """The issuer the app shows next to the account: this server's host name."""
    return urlsplit(settings.issuer).hostname or "token-server"


def provisioning_uri(settings: Settings, username: str, secret: str) -> str:
    """The ``otpauth://totp/...`` URI the QR code carries (Key Uri Format: issuer as label
    prefix and parameter, account = the username)."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(
        name=username, issuer_name=issuer_label(settings)
    )


def qr_svg(uri: str) -> str:
    """The QR code of ``uri`` as inline SVG markup, drawn here (no outside service sees the
    secret) and without ``style`` attributes (CSP ``style-src 'self'``)."""
    out = io.BytesIO()
    segno.make(uri, error="m").save(
        out,
        kind="svg",
        xmldecl=False,
        svgns=True,
        omitsize=True,
        svgclass="qr-code",
        lineclass="qr-code-modules",
        scale=4,
        border=4,
        dark="#000",
        light="#fff",
        nl=False,
        title="QR code for your authenticator app",
    )
    return out.getvalue().decode("ascii")


def grouped(secret: str) -> str:
    """The secret in groups of four, for typing into an app by hand."""
    return " ".join(secret[i : i + 4] for i in range(0, len(secret), 4))


# -- codes ---------------------------------------------------------------------------------


def normalise(code: str) -> str:
    return _SEPARATORS.sub("", code[: MAX_CODE_LENGTH + 1])


def is_totp_code(code: str) -> bool:
    """Whether the text is shaped like a one-time code (six ASCII digits, spaces allowed);
    anything else is taken for a recovery code."""
    return _TOTP_CODE.fullmatch(normalise(code)) is not None


def current_step(at: int | None = None) -> int:
    """RFC 6238 §4.2: T = floor((now - T0) / X), T0 = 0."""
    return (now() if at is None else at) // STEP_SECONDS


def matching_step(secret: str, code: str, at: int | None = None) -> int | None:
    """The time step (now - 1 .. now + 1, §5.2) whose code ``code`` is, else ``None``. Every
    candidate is compared, each in constant time; the latest match wins (the strictest for
    replay)."""
    text = normalise(code)
    if _TOTP_CODE.fullmatch(text) is None:
        return None
    generator = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS)
    step = current_step(at)
    found: int | None = None
    for candidate in range(step - WINDOW, step + WINDOW + 1):
        if candidate < 1:
            continue
        expected = generator.generate_otp(candidate)
        if hmac.compare_digest(expected.encode(), text.encode()):
            found = candidate
    return found


async def spend_step(db: AsyncSession, user_id: str, step: int) -> bool:
    """Accept a code of ``step`` from the person's confirmed app: true only for the one
    request whose UPDATE moves ``last_step`` forward (RFC 6238 §5.2, one use per code)."""
    result = await db.execute(
        update(TotpFactor)
        .where(
            TotpFactor.user_id == user_id,
            TotpFactor.confirmed_at.is_not(None),
            TotpFactor.last_step < step,
        )
        .values(last_step=step)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


async def confirm(db: AsyncSession, user_id: str, sealed: str, step: int) -> bool:
    """Confirm the unconfirmed app whose secret is ``sealed`` (the one the code was checked
    against: a setup started again in another tab replaced it) with a code of ``step``."""
    result = await db.execute(
        update(TotpFactor)
        .where(
            TotpFactor.user_id == user_id,
            TotpFactor.confirmed_at.is_(None),
            TotpFactor.secret_sealed == sealed,
            TotpFactor.last_step < step,
        )
        .values(last_step=step, confirmed_at=now())
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


# -- recovery codes ------------------------------------------------------------------------


def new_recovery_code() -> str:
    raw = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(RECOVERY_CODE_LENGTH))
    half = RECOVERY_CODE_LENGTH // 2
    return raw[:half] + "-" + raw[half:]


async def replace_recovery_codes(db: AsyncSession, settings: Settings, user_id: str) -> list[str]:
    """Ten new codes for ``user_id``; the old ones (used or not) stop working. Returns the
    codes in clear, to be shown once."""
    await db.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user_id))
    codes: list[str] = []
    while len(codes) < RECOVERY_CODES:
        code = new_recovery_code()
        if code not in codes:
            codes.append(code)
    stamp = now()
    db.add_all(
        RecoveryCode(
            code_hash=recovery_code_hash(settings, user_id, code),
            user_id=user_id,
            created_at=stamp,
        )
        for code in codes
    )
    await db.flush()
    return codes


async def use_recovery_code(db: AsyncSession, settings: Settings, user_id: str, code: str) -> bool:
    """Spend one of the person's unused recovery codes: true for the one request whose
    UPDATE finds it unused."""
    if not code or len(code) > MAX_CODE_LENGTH:
        return False
    result = await db.execute(
        update(RecoveryCode)
        .where(
            RecoveryCode.code_hash == recovery_code_hash(settings, user_id, code),
            RecoveryCode.user_id == user_id,
            RecoveryCode.used_at.is_(None),
        )
        .values(used_at=now())
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]
