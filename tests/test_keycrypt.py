"""``server/keycrypt.py``: private keys sealed with AES-256-GCM under AUTH_KEY_ENCRYPTION_KEY.

A sealed key opens only with the encryption key it was sealed under and only for the row
(``kid``) it was sealed for; any altered byte is refused. The operator's key is parsed
strictly: base64url of exactly 32 bytes that look random.
"""

from __future__ import annotations

import base64
import secrets

import pytest

from server.keycrypt import (
    KEY_BYTES,
    NONCE_BYTES,
    VERSION,
    EncryptionKey,
    KeyDecryptError,
    KeyEncryptionError,
    parse_encryption_key,
)

pytestmark = pytest.mark.feature("key-store-database")

KID = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
PEM = b"-----BEGIN PRIVATE KEY-----\nMIIEv...not a real key...\n-----END PRIVATE KEY-----\n"
TAG_BYTES = 16


def b64url(raw: bytes, *, padded: bool = False) -> str:
    text = base64.urlsafe_b64encode(raw).decode("ascii")
    return text if padded else text.rstrip("=")


def fresh() -> EncryptionKey:
    return parse_encryption_key(secrets.token_urlsafe(32))


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# -- sealing and opening -------------------------------------------------------------------


def test_round_trip() -> None:
    key = fresh()
    sealed = key.seal(PEM, kid=KID)
    assert sealed.startswith(VERSION)
    assert len(sealed) == len(VERSION) + NONCE_BYTES + len(PEM) + TAG_BYTES
    assert PEM not in sealed and b"PRIVATE KEY" not in sealed
    assert key.open(sealed, kid=KID) == PEM
    # The same key parsed again (another process) opens it too.
    assert parse_encryption_key(b64url(key.raw)).open(sealed, kid=KID) == PEM


def test_each_seal_has_its_own_nonce() -> None:
    key = fresh()
    first, second = key.seal(PEM, kid=KID), key.seal(PEM, kid=KID)
    assert first != second
    start = len(VERSION)
    assert first[start : start + NONCE_BYTES] != second[start : start + NONCE_BYTES]
    assert key.open(first, kid=KID) == key.open(second, kid=KID) == PEM


@pytest.mark.parametrize(
    "where",
    ["nonce", "ciphertext", "tag"],
)
def test_a_flipped_byte_is_refused(where: str) -> None:
    key = fresh()
    sealed = key.seal(PEM, kid=KID)
    index = {
        "nonce": len(VERSION) + 3,
        "ciphertext": len(VERSION) + NONCE_BYTES + 10,
        "tag": len(sealed) - 1,
    }[where]
    with pytest.raises(KeyDecryptError) as refused:
        key.open(flip(sealed, index), kid=KID)
    assert str(refused.value) == (
        f"the private key of {KID} does not open with the encryption key {key.id}: "
        "it was altered, or sealed under another key"
    )


def test_a_truncated_seal_is_refused() -> None:
    key = fresh()
    sealed = key.seal(PEM, kid=KID)
    with pytest.raises(KeyDecryptError):
        key.open(sealed[:-1], kid=KID)
    with pytest.raises(KeyDecryptError, match="not in a known form"):
        key.open(sealed[: len(VERSION) + NONCE_BYTES + TAG_BYTES - 1], kid=KID)


def test_a_seal_moved_to_another_kid_is_refused() -> None:
    key = fresh()
    sealed = key.seal(PEM, kid=KID)
    other = KID[:-1] + ("A" if KID[-1] != "A" else "B")
    with pytest.raises(KeyDecryptError, match=f"the private key of {other} does not open"):
        key.open(sealed, kid=other)


@pytest.mark.parametrize("prefix", [b"v2", b"v0", b"", b"V1"])
def test_another_version_prefix_is_refused(prefix: bytes) -> None:
    key = fresh()
    sealed = key.seal(PEM, kid=KID)
    with pytest.raises(KeyDecryptError, match=f"the sealed private key of {KID} is not in"):
        key.open(prefix + sealed[len(VERSION) :], kid=KID)


def test_another_encryption_key_is_refused_clearly() -> None:
    sealer, other = fresh(), fresh()
    sealed = sealer.seal(PEM, kid=KID)
    with pytest.raises(KeyDecryptError) as refused:
        other.open(sealed, kid=KID)
    message = str(refused.value)
    assert message == (
        f"the private key of {KID} does not open with the encryption key {other.id}: "
        "it was altered, or sealed under another key"
    )
    # The message names key ids, never key material.
    for raw in (sealer.raw, other.raw):
        assert b64url(raw) not in message and b64url(raw)[:8] not in message


def test_the_seal_is_bound_to_the_encryption_key_id() -> None:
    """The AAD holds the id of the encryption key: a key with the same bytes but presented
    under another id (as a row claiming another encryption key) does not open it."""
    key = fresh()
    sealed = key.seal(PEM, kid=KID)

    class Renamed(EncryptionKey):
        @property
        def id(self) -> str:
            return "another-id"

    with pytest.raises(KeyDecryptError):
        Renamed(key.raw).open(sealed, kid=KID)


# -- the operator's key --------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "   ", "\n"])
def test_a_missing_key_is_refused_with_the_fix(value: str | None) -> None:
    with pytest.raises(KeyEncryptionError) as refused:
        parse_encryption_key(value)
    assert str(refused.value).startswith("AUTH_KEY_ENCRYPTION_KEY is not set: make one with ")
    assert "secrets.token_urlsafe(32)" in str(refused.value)


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[:20] + "!" + text[21:],  # outside every base64 alphabet
        lambda text: text[:20] + "+" + text[21:],  # standard base64, not base64url
        lambda text: text[:20] + "/" + text[21:],
        lambda text: text[:20] + " " + text[20:],  # a space inside: base64 would skip it
        lambda text: text[:20] + "\n" + text[20:],
        lambda text: text[:20] + "." + text[20:],
        lambda text: text + "=" * 3,  # too much padding
        lambda text: "=" + text,
        lambda text: text[:-1] + "é",
    ],
    ids=["bang", "plus", "slash", "space", "newline", "dot", "padding", "leading-pad", "accent"],
)
def test_characters_outside_base64url_are_refused(damage: object) -> None:
    assert callable(damage)
    text = b64url(secrets.token_bytes(KEY_BYTES))
    with pytest.raises(KeyEncryptionError) as refused:
        parse_encryption_key(damage(text))
    assert str(refused.value).startswith("AUTH_KEY_ENCRYPTION_KEY is not base64url: make one ")


@pytest.mark.parametrize("size", [0, 1, 16, 24, 31, 33, 48, 64])
def test_a_key_of_the_wrong_length_is_refused(size: int) -> None:
    raw = secrets.token_bytes(size) if size else b""
    text = b64url(raw) or "AA"
    with pytest.raises(KeyEncryptionError) as refused:
        parse_encryption_key(text)
    assert "AUTH_KEY_ENCRYPTION_KEY " in str(refused.value)
    if size:
        assert f"decodes to {size} bytes, not 32" in str(refused.value)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00" * 32,
        b"a" * 32,
        b"ab" * 16,
        b"password" * 4,
        b"0123456789abcde" * 2 + b"01",  # 15 distinct values
        bytes(range(15)) * 2 + b"\x00\x01",
    ],
    ids=["zeros", "repeated", "pair", "word", "digits", "fifteen"],
)
def test_a_weak_key_is_refused(raw: bytes) -> None:
    assert len(raw) == KEY_BYTES
    with pytest.raises(KeyEncryptionError) as refused:
        parse_encryption_key(b64url(raw))
    assert "AUTH_KEY_ENCRYPTION_KEY is not random enough (weak): make one with " in str(
        refused.value
    )


def test_the_setting_name_is_the_one_given() -> None:
    with pytest.raises(KeyEncryptionError, match=r"^--old-key-file is not set"):
        parse_encryption_key("", setting="--old-key-file")


def test_padding_and_surrounding_whitespace_are_optional() -> None:
    raw = secrets.token_bytes(KEY_BYTES)
    unpadded, padded = b64url(raw), b64url(raw, padded=True)
    assert unpadded != padded
    keys = [parse_encryption_key(v) for v in (unpadded, padded, f"  {padded}\n", unpadded + "\n")]
    assert {key.raw for key in keys} == {raw}
    assert len({key.id for key in keys}) == 1


def test_the_key_is_not_in_its_repr() -> None:
    key = fresh()
    assert b64url(key.raw) not in repr(key) and str(key.raw) not in repr(key)


# -- the key id ----------------------------------------------------------------------------


def test_the_key_id_is_stable_and_reveals_nothing_obvious() -> None:
    raw = secrets.token_bytes(KEY_BYTES)
    key = parse_encryption_key(b64url(raw))
    assert key.id == EncryptionKey(raw).id == parse_encryption_key(b64url(raw, padded=True)).id
    assert len(key.id) == 16
    assert base64.urlsafe_b64decode(key.id)  # base64url text
    text = b64url(raw)
    assert not text.startswith(key.id[:4]) and key.id not in text
    decoded = base64.urlsafe_b64decode(key.id)
    assert decoded not in raw and raw[:4] not in decoded
    # Different keys, different ids (also for keys that differ in one byte).
    assert fresh().id != key.id
    assert EncryptionKey(flip(raw, 0)).id != key.id


def test_random_keys_are_accepted() -> None:
    """The weak-key rule refuses no key made as the message says (nor raw random bytes)."""
    for _ in range(2000):
        parse_encryption_key(secrets.token_urlsafe(32))
        parse_encryption_key(b64url(secrets.token_bytes(KEY_BYTES), padded=True))
