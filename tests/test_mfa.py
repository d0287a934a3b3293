"""server/mfa.py: what a sign-in proved (amr, acr), the policy, and the signed values."""

from __future__ import annotations

import pytest

from server import mfa, models
from server.config import Settings
from server.mfa import Factors

SETTINGS = Settings(secret_key="k" * 40)


@pytest.mark.feature("mfa-amr-acr")
@pytest.mark.parametrize(
    ("methods", "amr", "acr"),
    [
        (("pwd",), "pwd", "1"),
        (("pwd", "otp"), "pwd otp mfa", "2"),
        (("pwd", "otp", "mfa"), "pwd otp mfa", "2"),  # mfa given is recomputed, not doubled
        (("pwd", "pwd"), "pwd", "1"),  # one method twice is one factor
        (("swk",), "swk mfa", "phr"),  # a passkey is used only with user verification
        (("hwk",), "hwk mfa", "phrh"),
        (("pwd", "otp", "hwk"), "pwd otp hwk mfa", "phrh"),
        ((), "", None),  # a sign-in from before methods were recorded: no claim
    ],
)
def test_amr_and_the_level_it_reaches(methods: tuple[str, ...], amr: str, acr: str | None) -> None:
    assert mfa.amr_of(*methods) == amr
    assert mfa.acr_of(amr) == acr


@pytest.mark.feature("mfa-step-up")
@pytest.mark.parametrize(
    ("amr", "requested", "met"),
    [
        ("pwd", [], True),
        ("pwd", ["1"], True),
        ("pwd", ["2"], False),
        ("pwd", ["2", "1"], True),  # any of them, in order of preference (OIDC Core §3.1.2.1)
        ("pwd otp mfa", ["2"], True),
        ("pwd otp mfa", ["phr"], False),
        ("swk mfa", ["2"], True),  # a stronger level meets a weaker request
        ("swk mfa", ["phrh"], False),
        ("hwk mfa", ["phrh"], True),
        ("pwd", ["urn:unknown"], True),  # unknown values are ignored
        ("", ["1"], False),
    ],
)
def test_levels_are_ordered(amr: str, requested: list[str], met: bool) -> None:
    assert mfa.satisfies(amr, requested) is met


@pytest.mark.feature("mfa-step-up")
def test_step_up_only_when_a_factor_can_reach_the_level() -> None:
    totp = Factors(totp=True)
    synced = Factors(passkeys=1)
    bound = Factors(passkeys=1, bound_passkeys=1)
    assert mfa.step_up_helps("pwd", totp, ["2"])
    assert not mfa.step_up_helps("pwd", Factors(), ["2"])  # nothing to ask for: no loop
    assert not mfa.step_up_helps("pwd", totp, ["phr"])  # the app cannot reach it
    assert mfa.step_up_helps("pwd otp mfa", synced, ["phr"])
    assert not mfa.step_up_helps("pwd", synced, ["phrh"])
    assert mfa.step_up_helps("swk mfa", bound, ["phrh"])
    assert not mfa.step_up_helps("pwd otp mfa", totp, ["2"])  # met already


@pytest.mark.feature("mfa-policy")
def test_the_second_step_follows_the_deployment_and_the_person() -> None:
    def needed(policy: str, have: Factors) -> bool:
        return mfa.second_step_needed(SETTINGS.model_copy(update={"mfa": policy}), have)

    assert not needed("off", Factors(totp=True))
    assert needed("optional", Factors(totp=True))
    # A passkey signs in by itself: having one does not add a step to password sign-ins.
    assert not needed("optional", Factors(passkeys=2))
    assert not needed("optional", Factors())
    assert needed("required", Factors())
    assert needed("required", Factors(passkeys=1))


@pytest.mark.feature("mfa-passkeys")
@pytest.mark.parametrize(
    ("issuer", "rp_id"),
    [
        ("https://login.example.com", "login.example.com"),
        ("https://login.example.com:8443/base", "login.example.com"),
        ("http://localhost:8000", "localhost"),
        ("http://auth.localhost:8000", "auth.localhost"),
        ("http://127.0.0.1:8000", None),  # an IP address is no RP id (WebAuthn L3 §5.1.2)
        ("https://[::1]:8443", None),
        ("http://login.example.com", None),  # no secure context: browsers refuse WebAuthn
    ],
)
def test_the_relying_party_id_follows_the_issuer(issuer: str, rp_id: str | None) -> None:
    settings = SETTINGS.model_copy(update={"issuer": issuer})
    assert mfa.rp_id(settings) == rp_id


@pytest.mark.feature("mfa-policy")
def test_a_pending_sign_in_opens_only_as_signed_and_only_while_live(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(models, "clock", lambda: 1_000_000.0)
    pending = mfa.Pending("u1", "pwd", 1_000_000 + mfa.PENDING_TTL, 5, None)
    value = mfa.seal_pending(SETTINGS, pending)
    assert mfa.open_pending(SETTINGS, value) == pending
    other = SETTINGS.model_copy(update={"secret_key": "z" * 40})
    assert mfa.open_pending(other, value) is None  # another server's key
    body, mac = value.split(".")
    forged = mfa.seal_pending(SETTINGS, mfa.Pending("u2", "pwd", pending.expires_at, 5))
    assert mfa.open_pending(SETTINGS, forged.split(".")[0] + "." + mac) is None
    for bad in ["", "x", "a.b.c", body, "." + mac, "é.é", "!!.!!", "a" * 5000 + "." + mac]:
        assert mfa.open_pending(SETTINGS, bad) is None
    monkeypatch.setattr(models, "clock", lambda: 1_000_000.0 + mfa.PENDING_TTL)
    assert mfa.open_pending(SETTINGS, value) is None  # expired


@pytest.mark.feature("mfa-webauthn-challenges")
def test_a_challenge_is_bound_to_its_purpose_binding_and_lifetime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(models, "clock", lambda: 2_000_000.0)
    challenge = mfa.new_challenge(SETTINGS, "signin", "browser-1")
    assert mfa.challenge_valid(SETTINGS, challenge, "signin", "browser-1")
    assert mfa.new_challenge(SETTINGS, "signin", "browser-1") != challenge  # random each time
    assert not mfa.challenge_valid(SETTINGS, challenge, "register", "browser-1")
    assert not mfa.challenge_valid(SETTINGS, challenge, "signin", "browser-2")
    assert not mfa.challenge_valid(
        SETTINGS.model_copy(update={"secret_key": "z" * 40}), challenge, "signin", "browser-1"
    )
    flipped = bytes([challenge[0] ^ 1]) + challenge[1:]
    assert not mfa.challenge_valid(SETTINGS, flipped, "signin", "browser-1")
    assert not mfa.challenge_valid(SETTINGS, challenge[:-1], "signin", "browser-1")
    assert not mfa.challenge_valid(SETTINGS, b"", "signin", "browser-1")
    monkeypatch.setattr(models, "clock", lambda: 2_000_000.0 + mfa.CHALLENGE_TTL)
    assert not mfa.challenge_valid(SETTINGS, challenge, "signin", "browser-1")


@pytest.mark.feature("mfa-recovery-codes")
def test_recovery_code_hashes_are_keyed_per_person_and_forgiving_of_typing() -> None:
    h = mfa.recovery_code_hash(SETTINGS, "u1", "abcde-fghij")
    assert h == mfa.recovery_code_hash(SETTINGS, "u1", " ABCDE FGHIJ ")
    assert h != mfa.recovery_code_hash(SETTINGS, "u2", "abcde-fghij")
    other = SETTINGS.model_copy(update={"secret_key": "z" * 40})
    assert h != mfa.recovery_code_hash(other, "u1", "abcde-fghij")
    assert len(h) == 64


@pytest.mark.feature("mfa-step-up")
def test_a_step_up_targets_the_weakest_level_asked_and_accepts_only_what_reaches_it() -> None:
    assert mfa.target_level([]) == "2"
    assert mfa.target_level(["1"]) == "2"  # a step-up is for a second factor at least
    assert mfa.target_level(["phrh", "phr"]) == "phr"
    assert mfa.target_level(["urn:x", "phrh"]) == "phrh"
    sign_in = mfa.Pending("u", "pwd", 0, 0)
    assert all(mfa.accepts(sign_in, m) for m in (mfa.OTP, mfa.SWK, mfa.HWK))
    phr = mfa.Pending("u", "pwd", 0, 0, "s", "phr")
    assert not mfa.accepts(phr, mfa.OTP)
    assert mfa.accepts(phr, mfa.SWK) and mfa.accepts(phr, mfa.HWK)
    phrh = mfa.Pending("u", "pwd otp mfa", 0, 0, "s", "phrh")
    assert not mfa.accepts(phrh, mfa.SWK)
    assert mfa.accepts(phrh, mfa.HWK)
