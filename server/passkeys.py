"""Passkeys (WebAuthn Level 3) with py_webauthn: the ceremonies' options and their checks.

- **Options** travel to the page as JSON (``PublicKeyCredentialCreationOptionsJSON`` /
  ``...RequestOptionsJSON``, §5.1.8-§5.1.9) for static/passkeys.js. Every challenge is
  ``mfa.new_challenge``: HMAC-signed, five minutes, bound to a purpose (``register``,
  ``signin``, ``second-step``) and to what it is for (the user id, or the browser's CSRF
  cookie for a sign-in without a username), so the server keeps nothing until an answer comes.
- **Answers**: the challenge is read back from ``clientDataJSON``, checked (signature, expiry,
  purpose, binding) and spent (``ReplayGuard``: once, across replicas, §13.4.3) before
  py_webauthn checks the rest (§7.1 registration, §7.2 authentication), always with user
  verification required: a passkey signs in alone as two factors (``mfa.amr_of``).
- **After an assertion** (§7.2 steps 19-22, §6.1.3): the backup-eligibility flag must be the
  one registered; a signature counter that did not grow (when either value is non-zero) means
  a possibly cloned authenticator, and the sign-in is refused; the new counter and backup state
  are stored by a conditional UPDATE on the old counter, so of two concurrent uses of one
  counter value only one succeeds.

Every refusal is a ``PasskeyError`` (a 400 for the pages), never an exception of the library.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    CredentialDeviceType,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from . import mfa
from .config import Settings
from .models import User, WebAuthnCredential, now
from .observability import audit
from .replay import ReplayGuard

REGISTER, SIGNIN, SECOND_STEP = "register", "signin", "second-step"
#: The largest posted credential (JSON) looked at: an attestation "none" registration or an
#: assertion is a few KiB at most (a credential id is at most 1023 bytes, §5.1).
MAX_CREDENTIAL_CHARS = 16_384
#: §5.1: a credential id is at most 1023 bytes; base64url of that is 1364 characters.
MAX_CREDENTIAL_ID_CHARS = 1364
_CREDENTIAL_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_CREDENTIAL_ID_CHARS}}}", re.ASCII)
NAME_MAX = 64
DEFAULT_NAME = "Passkey"
TIMEOUT_MS = 300_000  # as long as the challenge lives (mfa.CHALLENGE_TTL)
#: ES256, EdDSA and RS256 (§5.3: ES256 and RS256 cover nearly every authenticator).
ALGORITHMS = [
    COSEAlgorithmIdentifier.ECDSA_SHA_256,
    COSEAlgorithmIdentifier.EDDSA,
    COSEAlgorithmIdentifier.RSASSA_PKCS1_v1_5_SHA_256,
]
_TRANSPORTS = {t.value for t in AuthenticatorTransport}


#: One message for an unknown credential, another person's, and an answer that does not
#: verify: which credential ids are registered is nobody's business.
NOT_USABLE = "That passkey could not be used here. It may have been removed from your account."


class PasskeyError(Exception):
    """A refused ceremony: ``reason`` for the audit log, ``message`` for the person."""

    def __init__(self, reason: str, message: str = NOT_USABLE) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message = message


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64url(text: object) -> bytes:
    if not isinstance(text, str) or len(text) > MAX_CREDENTIAL_CHARS or not text.isascii():
        raise PasskeyError("malformed")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise PasskeyError("malformed") from None


def user_handle(user_id: str) -> bytes:
    """The user handle (§5.4.3: opaque, at most 64 bytes, no personal data): the user's id."""
    return user_id.encode("ascii")


def _descriptor(row: WebAuthnCredential) -> PublicKeyCredentialDescriptor:
    transports = [AuthenticatorTransport(t) for t in row.transports.split() if t in _TRANSPORTS]
    return PublicKeyCredentialDescriptor(
        id=_unb64url(row.credential_id), transports=transports or None
    )


# -- options ------------------------------------------------------------------------------


def _rp_id(settings: Settings) -> str:
    rp_id = mfa.rp_id(settings)
    if rp_id is None:
        raise PasskeyError("unavailable", "Passkeys are not available on this server.")
    return rp_id


def registration_options(settings: Settings, user: User, existing: list[WebAuthnCredential]) -> str:
    """``PublicKeyCredentialCreationOptions`` (§5.4) as JSON: a discoverable credential
    (``residentKey`` required, so it signs in without a username), user verification
    required, no attestation (§5.4.7 "none": this server trusts any authenticator), and the
    person's passkeys excluded (§5.4.3 ``excludeCredentials``: no second one on one device)."""
    options = generate_registration_options(
        rp_id=_rp_id(settings),
        rp_name=settings.issuer,
        user_id=user_handle(user.id),
        user_name=user.username,
        user_display_name=user.name or user.username,
        challenge=mfa.new_challenge(settings, REGISTER, user.id),
        timeout=TIMEOUT_MS,
        attestation=AttestationConveyancePreference.NONE,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.REQUIRED,
            user_verification=UserVerificationRequirement.REQUIRED,
        ),
        exclude_credentials=[_descriptor(row) for row in existing],
        supported_pub_key_algs=ALGORITHMS,
    )
    return _script_safe(options_to_json(options))


def assertion_options(
    settings: Settings,
    *,
    binding: str,
    credentials: list[WebAuthnCredential] | None,
    purpose: str | None = None,
) -> str:
    """``PublicKeyCredentialRequestOptions`` as JSON for static/passkeys.js: a challenge bound
    to ``binding`` (the user id for a second step, the browser's CSRF cookie for a sign-in
    without a username), ``allowCredentials`` from ``credentials`` (``None``: discoverable
    credentials, any the authenticator holds for this RP id), user verification required.
    ``purpose`` defaults to ``signin`` without credentials, ``second-step`` with them."""
    purpose = purpose or (SIGNIN if credentials is None else SECOND_STEP)
    options = generate_authentication_options(
        rp_id=_rp_id(settings),
        challenge=mfa.new_challenge(settings, purpose, binding),
        timeout=TIMEOUT_MS,
        allow_credentials=[_descriptor(row) for row in credentials or []],
        user_verification=UserVerificationRequirement.REQUIRED,
    )
    return _script_safe(options_to_json(options))


def _script_safe(text: str) -> str:
    """JSON that can sit inside ``<script type="application/json">`` (rendered ``|safe``):
    no ``<``, ``>`` or ``&`` that could close the element (the user name is in it)."""
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# -- answers ------------------------------------------------------------------------------


def parse_posted(text: str) -> dict[str, Any]:
    """The posted ``PublicKeyCredential`` JSON (``toJSON()``, §5.1.8), size-capped."""
    if not text or len(text) > MAX_CREDENTIAL_CHARS:
        raise PasskeyError("malformed", "No passkey answer came with the form.")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise PasskeyError("malformed") from None
    if not isinstance(data, dict) or not isinstance(data.get("response"), dict):
        raise PasskeyError("malformed")
    credential_id = data.get("id")
    # §5.1: the id is base64url (what the lookup compares with the stored one): anything
    # else (a NUL, a lone surrogate) is refused here, never sent to the database.
    if not isinstance(credential_id, str) or not _CREDENTIAL_ID.fullmatch(credential_id):
        raise PasskeyError("malformed")
    return data


async def _spend_challenge(
    settings: Settings, guard: ReplayGuard, data: dict[str, Any], purpose: str, binding: str
) -> bytes:
    """The challenge the answer signed, if this server issued it for ``purpose`` and
    ``binding``, it is live, and this is its first use (§13.4.3)."""
    try:
        client_data = json.loads(_unb64url(data["response"].get("clientDataJSON")))
    except (ValueError, RecursionError):
        raise PasskeyError("malformed") from None
    if not isinstance(client_data, dict):
        raise PasskeyError("malformed")
    challenge = _unb64url(client_data.get("challenge"))
    if not mfa.challenge_valid(settings, challenge, purpose, binding):
        raise PasskeyError("challenge", "That passkey request expired. Try again.")
    if not await guard.first_use("webauthn", b64url(challenge), mfa.CHALLENGE_TTL):
        raise PasskeyError("replayed", "That passkey request was already used. Try again.")
    return challenge


@dataclass(frozen=True)
class Registered:
    credential_id: str
    public_key: bytes
    sign_count: int
    backup_eligible: bool
    backed_up: bool
    transports: str
    aaguid: str


async def verify_registration(
    settings: Settings, guard: ReplayGuard, user: User, posted: str
) -> Registered:
    """§7.1: the answer to ``registration_options`` for ``user``."""
    rp_id = _rp_id(settings)
    data = parse_posted(posted)
    challenge = await _spend_challenge(settings, guard, data, REGISTER, user.id)
    try:
        verified = verify_registration_response(
            credential=data,
            expected_challenge=challenge,
            expected_rp_id=rp_id,
            expected_origin=mfa.origin(settings),
            require_user_verification=True,
            supported_pub_key_algs=ALGORITHMS,
        )
    except Exception as error:  # the library raises more than its own exceptions on bad input
        raise PasskeyError("invalid", "Your passkey could not be checked. Try again.") from error
    credential_id = b64url(verified.credential_id)
    if len(credential_id) > MAX_CREDENTIAL_ID_CHARS:
        raise PasskeyError("malformed")
    transports = data["response"].get("transports")
    listed = (
        [t for t in transports if isinstance(t, str) and t in _TRANSPORTS]
        if isinstance(transports, list)
        else []
    )
    return Registered(
        credential_id=credential_id,
        public_key=verified.credential_public_key,
        sign_count=verified.sign_count,
        backup_eligible=verified.credential_device_type == CredentialDeviceType.MULTI_DEVICE,
        backed_up=verified.credential_backed_up,
        transports=" ".join(dict.fromkeys(listed))[:200],
        aaguid=verified.aaguid,
    )


def clean_name(value: str) -> str | None:
    """A passkey's name: trimmed, 1..64 characters, no control characters; ``None`` if not."""
    name = " ".join(value.split())
    if not name or len(name) > NAME_MAX or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return None
    return name


async def store(db: AsyncSession, user: User, registered: Registered, name: str) -> str:
    """Keep a verified registration as ``user``'s passkey; returns its id. A credential id
    already registered (to anyone) is refused (§7.1 step 26)."""
    taken = await db.scalar(
        select(WebAuthnCredential.id).where(
            WebAuthnCredential.credential_id == registered.credential_id
        )
    )
    if taken is not None:
        raise PasskeyError("duplicate", "That passkey is already registered.")
    row = WebAuthnCredential(
        user_id=user.id,
        credential_id=registered.credential_id,
        public_key=registered.public_key,
        sign_count=registered.sign_count,
        backup_eligible=registered.backup_eligible,
        backed_up=registered.backed_up,
        transports=registered.transports,
        aaguid=registered.aaguid,
        name=name,
    )
    db.add(row)
    try:
        await db.flush()
    except IntegrityError:
        await db.rollback()
        raise PasskeyError("duplicate", "That passkey is already registered.") from None
    return row.id


@dataclass(frozen=True)
class Used:
    """A passkey that just proved its holder: its row id, its person, and which method."""

    id: str
    user_id: str
    method: str  # mfa.HWK (bound to its device) or mfa.SWK (may be synced)


async def verify_assertion(
    settings: Settings,
    guard: ReplayGuard,
    db: AsyncSession,
    posted: str,
    *,
    purpose: str,
    binding: str,
    user_id: str | None = None,
) -> Used:
    """§7.2: an answer to ``assertion_options``. ``user_id``: the person the credential must
    belong to (the second step); ``None`` for a sign-in without a username, where the
    authenticator's ``userHandle``, when sent, must be that of the credential's person."""
    rp_id = _rp_id(settings)
    data = parse_posted(posted)
    challenge = await _spend_challenge(settings, guard, data, purpose, binding)
    # §7.2 steps 5-6: the credential, and that it is the person's.
    row = await db.scalar(
        select(WebAuthnCredential).where(WebAuthnCredential.credential_id == data["id"])
    )
    if row is None or (user_id is not None and row.user_id != user_id):
        raise PasskeyError("unknown_credential")
    handle = data["response"].get("userHandle")
    if handle is not None and _unb64url(handle) != user_handle(row.user_id):
        raise PasskeyError("user_handle")
    stored_count = row.sign_count
    try:
        # The counter is checked below, after the signature (py_webauthn checks it first).
        verified = verify_authentication_response(
            credential=data,
            expected_challenge=challenge,
            expected_rp_id=rp_id,
            expected_origin=mfa.origin(settings),
            credential_public_key=row.public_key,
            credential_current_sign_count=0,
            require_user_verification=True,
        )
    except Exception as error:  # the library raises more than its own exceptions on bad input
        raise PasskeyError("invalid") from error
    # §6.1.3 / §7.2 step 19: backup eligibility is fixed when the credential is made.
    eligible = verified.credential_device_type == CredentialDeviceType.MULTI_DEVICE
    if eligible != row.backup_eligible:
        raise PasskeyError("backup_eligibility")
    # §7.2 step 21 / §6.1.1: a counter that did not grow is a sign of a cloned authenticator.
    new_count = verified.new_sign_count
    if (new_count or stored_count) and new_count <= stored_count:
        audit(
            "passkey.counter_regressed",
            user_id=row.user_id,
            factor=row.id,
            stored=stored_count,
            received=new_count,
        )
        raise PasskeyError("counter", "That passkey may have been copied: it was refused.")
    result = await db.execute(
        update(WebAuthnCredential)
        .where(WebAuthnCredential.id == row.id, WebAuthnCredential.sign_count == stored_count)
        .values(sign_count=new_count, backed_up=verified.credential_backed_up, last_used_at=now())
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        raise PasskeyError("concurrent", "That passkey was used twice at once. Try again.")
    return Used(row.id, row.user_id, mfa.SWK if eligible else mfa.HWK)
