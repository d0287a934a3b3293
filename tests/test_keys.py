"""Signing keys (SPEC.md "Keys"): PEM files, RFC 7638 kids, lifecycle, JWKS, hot reload."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from server import keys as keys_module
from server.keys import MANIFEST, KeyFileError, KeyStore, KeysUnavailableError, PruneResult

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth"}


def b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def rfc7638_thumbprint(pem: bytes) -> str:
    """Computed independently of joserfc: SHA-256 over the canonical JSON of e, kty, n."""
    key = load_pem_private_key(pem, password=None)
    assert isinstance(key, RSAPrivateKey)
    numbers = key.public_key().public_numbers()
    canonical = json.dumps(
        {"e": b64url_uint(numbers.e), "kty": "RSA", "n": b64url_uint(numbers.n)},
        separators=(",", ":"),
        sort_keys=True,
    )
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def manifest(directory: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads((directory / MANIFEST).read_text())["keys"]
    return entries


def states(directory: Path) -> dict[str, str]:
    return {entry["kid"]: entry["state"] for entry in manifest(directory)}


def kid_in(directory: Path, state: str) -> str:
    (kid,) = [kid for kid, s in states(directory).items() if s == state]
    return kid


def jwks(store: KeyStore) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = json.loads(store.keyset().jwks_bytes)["keys"]
    return keys


@pytest.mark.feature("signing-keys", "key-lifecycle")
def test_ensure_creates_current_and_next_once(tmp_path: Path) -> None:
    directory = tmp_path / "nested" / "keys"
    store = KeyStore(directory)
    assert store.ensure() is True
    first = manifest(directory)
    assert sorted(entry["state"] for entry in first) == ["current", "next"]
    current = next(entry for entry in first if entry["state"] == "current")
    assert current["activated_at"] == current["created_at"]
    assert current["retired_at"] is None
    assert sorted(p.name for p in directory.glob("*.pem")) == sorted(
        f"{entry['kid']}.pem" for entry in first
    )

    assert store.ensure() is False
    assert KeyStore(directory).ensure() is False
    assert manifest(directory) == first
    assert len(list(directory.glob("*.pem"))) == 2


@pytest.mark.feature("signing-keys")
def test_kid_is_the_rfc7638_thumbprint(tmp_path: Path) -> None:
    KeyStore(tmp_path).ensure()
    for entry in manifest(tmp_path):
        pem = (tmp_path / f"{entry['kid']}.pem").read_bytes()
        assert entry["kid"] == rfc7638_thumbprint(pem)
        key = load_pem_private_key(pem, password=None)
        assert isinstance(key, RSAPrivateKey)
        assert key.key_size == 2048


@pytest.mark.feature("signing-keys")
def test_private_key_files_are_mode_0600_even_with_a_lax_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        store = KeyStore(tmp_path)
        store.ensure()
        store.rotate()
    finally:
        os.umask(previous)
    pems = list(tmp_path.glob("*.pem"))
    assert len(pems) == 3
    for pem in pems:
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600, pem


@pytest.mark.feature("signing-keys", "key-lifecycle")
def test_jwks_holds_public_keys_only_for_next_current_and_retired(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.ensure()
    store.rotate()
    retired = kid_in(tmp_path, "retired")
    current = kid_in(tmp_path, "current")
    upcoming = kid_in(tmp_path, "next")

    keyset = store.keyset()
    published = jwks(store)
    assert [key["kid"] for key in published] == [current, upcoming, retired]
    for key in published:
        assert set(key) == {"kty", "n", "e", "kid", "use", "alg"}
        assert not PRIVATE_MEMBERS & set(key)
        assert (key["kty"], key["use"], key["alg"], key["e"]) == ("RSA", "sig", "RS256", "AQAB")
    assert b'"d"' not in keyset.jwks_bytes
    assert keyset.etag == '"' + hashlib.sha256(keyset.jwks_bytes).hexdigest()[:32] + '"'
    assert set(keyset.public) == {current, upcoming, retired}
    assert keyset.kid == current


@pytest.mark.feature("key-lifecycle")
def test_rotate_moves_next_to_current_to_retired_and_makes_a_new_next(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.ensure()
    first_current = kid_in(tmp_path, "current")
    first_next = kid_in(tmp_path, "next")
    before = int(time.time())

    infos = store.rotate()

    after = int(time.time())
    by_kid = {entry["kid"]: entry for entry in manifest(tmp_path)}
    assert [(info.kid, info.state) for info in infos] == [
        (kid, entry["state"]) for kid, entry in by_kid.items()
    ]
    assert by_kid[first_current]["state"] == "retired"
    assert before <= by_kid[first_current]["retired_at"] <= after
    assert by_kid[first_next]["state"] == "current"
    assert before <= by_kid[first_next]["activated_at"] <= after
    new_next = kid_in(tmp_path, "next")
    assert new_next not in (first_current, first_next)
    assert (tmp_path / f"{new_next}.pem").exists()
    assert store.keyset().kid == first_next

    store.rotate()
    assert states(tmp_path) == {
        first_current: "retired",
        first_next: "retired",
        new_next: "current",
        kid_in(tmp_path, "next"): "next",
    }


@pytest.mark.feature("key-lifecycle")
def test_rotate_on_an_empty_directory_creates_a_pair(tmp_path: Path) -> None:
    infos = KeyStore(tmp_path / "keys").rotate()
    assert sorted(info.state for info in infos) == ["current", "next"]
    assert KeyStore(tmp_path / "keys").keyset().kid == kid_in(tmp_path / "keys", "current")


@pytest.mark.feature("key-lifecycle")
def test_rotate_without_a_next_key_generates_the_new_current(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.ensure()
    old_current = kid_in(tmp_path, "current")
    only_current = [entry for entry in manifest(tmp_path) if entry["state"] == "current"]
    (tmp_path / MANIFEST).write_text(json.dumps({"keys": only_current}))

    store.rotate()

    current = kid_in(tmp_path, "current")
    assert current != old_current
    assert states(tmp_path)[old_current] == "retired"
    assert kid_in(tmp_path, "next") not in (current, old_current)
    assert (tmp_path / f"{current}.pem").exists()


@pytest.mark.feature("key-lifecycle")
def test_prune_keeps_a_recently_retired_key_and_says_for_how_long(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.ensure()
    store.rotate()
    retired = kid_in(tmp_path, "retired")

    pruned = store.prune(max_token_lifetime=900)
    removed, kept = pruned.removed, pruned.kept

    assert removed == []
    assert len(kept) == 1
    match = re.fullmatch(rf"{retired}: tokens it signed may be valid for (\d+) s more", kept[0])
    assert match is not None, kept
    assert 895 <= int(match.group(1)) <= 900
    assert retired in states(tmp_path)
    assert (tmp_path / f"{retired}.pem").exists()


@pytest.mark.feature("key-lifecycle")
def test_prune_removes_a_retired_key_whose_tokens_have_expired(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.ensure()
    store.rotate()
    retired = kid_in(tmp_path, "retired")
    current, upcoming = kid_in(tmp_path, "current"), kid_in(tmp_path, "next")
    assert retired in {key["kid"] for key in jwks(store)}

    pruned = store.prune(max_token_lifetime=0)
    removed, kept = pruned.removed, pruned.kept

    assert (removed, kept) == ([retired], [])
    assert states(tmp_path) == {current: "current", upcoming: "next"}
    assert not (tmp_path / f"{retired}.pem").exists()
    assert sorted(p.stem for p in tmp_path.glob("*.pem")) == sorted([current, upcoming])
    fresh = KeyStore(tmp_path)
    assert {key["kid"] for key in jwks(fresh)} == {current, upcoming}
    # Nothing left to prune: nothing removed, nothing kept, current and next untouched.
    assert fresh.prune(max_token_lifetime=0) == PruneResult([], [], [])
    assert states(tmp_path) == {current: "current", upcoming: "next"}


@pytest.mark.feature("key-lifecycle")
def test_prune_uses_the_retirement_time(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.ensure()
    store.rotate()
    store.rotate()
    entries = manifest(tmp_path)
    old, recent = (entry for entry in entries if entry["state"] == "retired")
    old["retired_at"] = int(time.time()) - 3600
    (tmp_path / MANIFEST).write_text(json.dumps({"keys": entries}))

    pruned = store.prune(max_token_lifetime=900)
    removed, kept = pruned.removed, pruned.kept

    assert removed == [old["kid"]]
    assert [reason.split(":")[0] for reason in kept] == [recent["kid"]]


@pytest.mark.feature("signing-keys")
def test_load_without_keys_says_how_to_create_them(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    message = (
        f"no current signing key in {tmp_path}: run `python -m server keys rotate` to create one"
    )
    with pytest.raises(KeysUnavailableError) as caught:
        store.load()
    assert str(caught.value) == message
    with pytest.raises(KeysUnavailableError):
        store.keyset()
    assert store.read_manifest() == []


@pytest.mark.feature("key-hot-reload")
def test_reload_picks_up_a_rotation_made_by_another_process(tmp_path: Path) -> None:
    server = KeyStore(tmp_path)
    KeyStore(tmp_path).ensure()
    before = server.keyset()
    assert server.reload() is False
    assert server.keyset() is before

    operator = KeyStore(tmp_path)
    operator.rotate()

    assert server.reload() is True
    after = server.keyset()
    assert after.kid == kid_in(tmp_path, "current")
    assert after.kid != before.kid
    assert after.etag != before.etag
    assert server.reload() is False


@pytest.mark.feature("key-hot-reload")
def test_reload_sees_a_rotation_within_the_same_mtime_tick(tmp_path: Path) -> None:
    """Coarse file timestamps (1 s on some network filesystems) must not hide a rotation."""
    server = KeyStore(tmp_path)
    KeyStore(tmp_path).ensure()
    before = server.keyset()
    stamp = (tmp_path / MANIFEST).stat()

    KeyStore(tmp_path).rotate()
    os.utime(tmp_path / MANIFEST, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))

    assert server.reload() is True
    assert server.keyset().kid != before.kid
    assert server.keyset().kid == kid_in(tmp_path, "current")


@pytest.mark.feature("signing-keys", "key-lifecycle")
def test_signed_token_verifies_with_the_published_jwk(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.ensure()
    keyset = store.keyset()
    claims = {"iss": "https://auth.example.com", "sub": "user-1", "exp": int(time.time()) + 60}

    token = keyset.sign(claims, "at+jwt")

    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS256", "typ": "at+jwt", "kid": keyset.kid}
    entry = next(key for key in jwks(store) if key["kid"] == header["kid"])
    decoded = jwt.decode(token, jwt.PyJWK(entry).key, algorithms=["RS256"])
    assert decoded == claims
    upcoming = next(key for key in jwks(store) if key["kid"] != keyset.kid)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, jwt.PyJWK(upcoming).key, algorithms=["RS256"])


@pytest.mark.feature("key-lifecycle", "key-hot-reload")
def test_tokens_signed_before_a_rotation_still_verify_after_it(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.ensure()
    old_token = store.keyset().sign({"sub": "a"}, "at+jwt")
    KeyStore(tmp_path).rotate()
    assert store.reload() is True
    new_token = store.keyset().sign({"sub": "b"}, "at+jwt")
    published = {key["kid"]: key for key in jwks(store)}
    for token, sub in ((old_token, "a"), (new_token, "b")):
        kid = jwt.get_unverified_header(token)["kid"]
        key = jwt.PyJWK(published[kid]).key
        assert jwt.decode(token, key, algorithms=["RS256"]) == {"sub": sub}
    assert (
        jwt.get_unverified_header(old_token)["kid"] != jwt.get_unverified_header(new_token)["kid"]
    )


@pytest.mark.feature("signing-keys")
def test_missing_key_file_is_a_clear_error(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.ensure()
    current = next(info for info in store.read_manifest() if info.state == "current")
    (tmp_path / f"{current.kid}.pem").unlink()
    with pytest.raises(KeysUnavailableError, match="is missing"):
        store.load()


@pytest.mark.feature("signing-keys")
@pytest.mark.parametrize(
    ("damage", "says"),
    [
        ("directory", "cannot be read"),
        ("not-utf8", "not valid JSON (not UTF-8 text)"),
        ("bad-kid", "an entry's kid or state is not a string"),
    ],
)
def test_an_unusable_manifest_is_a_key_file_error_naming_it(
    tmp_path: Path, damage: str, says: str
) -> None:
    store = KeyStore(tmp_path)
    manifest = tmp_path / MANIFEST
    if damage == "directory":
        manifest.mkdir()
    elif damage == "not-utf8":
        manifest.write_bytes(b"\xff\xfe{")
    else:
        manifest.write_text(json.dumps({"keys": [{"kid": 1, "state": "current", "created_at": 0}]}))

    with pytest.raises(KeyFileError) as raised:
        store.load()

    assert str(raised.value).startswith(f"{manifest}: {says}"), raised.value
    assert isinstance(raised.value, KeysUnavailableError)  # what callers already handle


@pytest.mark.feature("signing-keys")
def test_a_public_key_in_place_of_the_private_one_is_a_key_file_error(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.ensure()
    kid = next(k["kid"] for k in json.loads((tmp_path / MANIFEST).read_text())["keys"])
    pem = tmp_path / f"{kid}.pem"
    private = load_pem_private_key(pem.read_bytes(), password=None)
    pem.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )

    with pytest.raises(KeyFileError, match=re.escape(f"{pem}: not a readable RSA private key")):
        store.load()


# -- who may write the key directory (an operator review: under umask 000 another user planted
# a key in keys.json and its PEM, and the JWKS published it; ssh's StrictModes is the model) --


@pytest.mark.feature("signing-keys", "file-permissions")
@pytest.mark.parametrize("umask", [0o000, 0o002], ids=["umask-000", "umask-002"])
def test_keys_directory_is_0700_and_every_file_0600_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    directory = tmp_path / "keys"
    previous = os.umask(umask)
    try:
        store = KeyStore(directory)
        store.ensure()
        store.rotate()
        store.prune(max_token_lifetime=0)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = sorted(path.name for path in directory.iterdir())
    assert MANIFEST in files and ".lock" in files
    assert not [name for name in files if name.endswith(".tmp")]
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert KeyStore(directory).load().kid


@pytest.mark.feature("signing-keys")
@pytest.mark.parametrize("mode", [0o777, 0o775, 0o720, 0o702], ids=oct)
def test_load_refuses_a_directory_others_can_write(tmp_path: Path, mode: int) -> None:
    directory = tmp_path / "keys"
    KeyStore(directory).ensure()
    directory.chmod(mode)

    with pytest.raises(KeysUnavailableError) as refused:
        KeyStore(directory).load()
    message = str(refused.value)
    assert str(directory) in message
    assert f"mode {mode:o}" in message
    assert "chmod 700" in message and "chmod 600" in message
    with pytest.raises(KeysUnavailableError):
        KeyStore(directory).rotate()  # nor does an operator command write there
    directory.chmod(0o700)
    assert KeyStore(directory).load().kid


@pytest.mark.feature("signing-keys")
@pytest.mark.parametrize("which", ["manifest", "pem"])
@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602], ids=oct)
def test_load_refuses_a_file_others_can_write(tmp_path: Path, which: str, mode: int) -> None:
    store = KeyStore(tmp_path)
    store.ensure()
    path = store.manifest_path if which == "manifest" else next(tmp_path.glob("*.pem"))
    path.chmod(mode)

    with pytest.raises(KeysUnavailableError) as refused:
        KeyStore(tmp_path).load()
    message = str(refused.value)
    assert str(path) in message and f"mode {mode:o}" in message
    assert "chmod 600" in message


@pytest.mark.feature("signing-keys", "file-permissions")
@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
@pytest.mark.parametrize("which", ["directory", "manifest", "pem"])
def test_load_refuses_keys_owned_by_another_user(tmp_path: Path, which: str) -> None:
    directory = tmp_path / "keys"
    store = KeyStore(directory)
    store.ensure()
    path = {
        "directory": directory,
        "manifest": store.manifest_path,
        "pem": next(directory.glob("*.pem")),
    }[which]
    os.chown(path, 65534, -1)  # nobody: another user than the server's

    with pytest.raises(KeysUnavailableError) as refused:
        KeyStore(directory).load()
    message = str(refused.value)
    assert str(path) in message and "owner uid 65534" in message
    assert "owned by another user" in message


@pytest.mark.feature("signing-keys", "file-permissions")
def test_read_only_keys_readable_by_others_still_load(tmp_path: Path) -> None:
    """A mounted secret (root- or server-owned, 0755 directory, 0444/0644 files) is fine:
    only who can *write* matters for planting a key."""
    directory = tmp_path / "keys"
    store = KeyStore(directory)
    store.ensure()
    kid = store.load().kid
    for path in directory.iterdir():
        path.chmod(0o444)
    store.manifest_path.chmod(0o644)
    directory.chmod(0o555)
    try:
        assert KeyStore(directory).load().kid == kid
    finally:
        directory.chmod(0o700)


@pytest.mark.feature("key-hot-reload")
def test_reload_keeps_the_loaded_keys_when_the_new_manifest_is_writable_by_others(
    tmp_path: Path,
) -> None:
    store = KeyStore(tmp_path)
    store.ensure()
    before = store.keyset().kid
    KeyStore(tmp_path).rotate()
    store.manifest_path.chmod(0o666)

    with pytest.raises(KeysUnavailableError, match="writable by others"):
        store.reload()
    assert store.keyset().kid == before
    store.manifest_path.chmod(0o600)
    assert store.reload() and store.keyset().kid != before


@pytest.mark.feature("key-hot-reload", "key-reload-health")
def test_a_reload_parses_only_the_files_that_changed_and_imports_only_the_signing_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = KeyStore(tmp_path)
    store.ensure()
    for _ in range(5):
        store.rotate()  # 7 keys
    parsed: list[str] = []
    imported: list[Path] = []
    real_public, real_private = keys_module.public_half, keys_module._private_key

    def public_key(kid: str, pem: bytes, path: Path) -> Any:
        parsed.append(kid)
        return real_public(kid, pem, path)

    def private_key(pem: bytes, path: Path) -> Any:
        imported.append(path)
        return real_private(pem, path)

    monkeypatch.setattr(keys_module, "public_half", public_key)
    monkeypatch.setattr(keys_module, "_private_key", private_key)
    server = KeyStore(tmp_path)
    assert server.reload() is True
    assert sorted(parsed) == sorted(states(tmp_path))
    assert imported == [tmp_path / f"{kid_in(tmp_path, 'current')}.pem"]

    parsed.clear()
    imported.clear()
    store.rotate()
    assert server.reload() is True
    assert parsed == [kid_in(tmp_path, "next")], "only the new next key is parsed"
    assert imported == [tmp_path / f"{kid_in(tmp_path, 'current')}.pem"]
    assert len(jwks(server)) == 8

    parsed.clear()
    imported.clear()
    assert server.reload() is False
    assert (parsed, imported) == ([], [])


@pytest.mark.feature("signing-keys", "key-hot-reload", "key-reload-health")
def test_a_key_file_holding_another_key_than_its_kid_is_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.ensure()
    current, upcoming = kid_in(tmp_path, "current"), kid_in(tmp_path, "next")
    swapped = tmp_path / f"{upcoming}.pem"
    swapped.write_bytes((tmp_path / f"{current}.pem").read_bytes())

    with pytest.raises(KeyFileError) as caught:
        KeyStore(tmp_path).load()
    assert str(caught.value) == (
        f"{swapped}: holds the key {current}, not {upcoming} (a kid is its key's RFC 7638 "
        "thumbprint): restore the right file from a backup"
    )


@pytest.mark.feature("key-hot-reload", "key-reload-health")
def test_a_failing_reload_is_recorded_until_one_succeeds(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.ensure()
    before = store.keyset().kid
    store.manifest_path.chmod(0o666)  # loosened, content unchanged: noticed all the same

    for attempt in (1, 2):
        with pytest.raises(KeysUnavailableError, match="writable by others"):
            store.reload()
        assert store.failure is not None
        assert store.failure.attempts == attempt
        assert "writable by others" in store.failure.reason
    since = store.failure.since
    assert since <= time.time()
    assert store.keyset().kid == before

    store.manifest_path.chmod(0o600)
    assert store.reload() is False  # nothing changed on disk: the keys loaded are kept
    assert store.failure is None


@pytest.mark.feature("key-lifecycle", "key-reload-health")
def test_prune_removes_key_files_left_by_an_interrupted_rotation(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.ensure()
    listed = set(states(tmp_path))
    # What a rotation killed after writing its new key and before keys.json leaves behind.
    orphan = store._generate("next")
    (tmp_path / "keys.tmp").write_text('{"keys": [')
    backup = tmp_path / "backup-2026.pem"  # an operator's file, not named like a key of ours
    backup.write_bytes((tmp_path / f"{orphan.kid}.pem").read_bytes())
    assert len(list(tmp_path.glob("*.pem"))) == 4

    pruned = store.prune(max_token_lifetime=900)

    assert pruned == PruneResult([], [], [f"{orphan.kid}.pem"])
    assert not (tmp_path / "keys.tmp").exists()
    assert {path.stem for path in tmp_path.glob("*.pem")} == {*listed, backup.stem}
    assert set(states(tmp_path)) == listed
    assert KeyStore(tmp_path).load().kid == kid_in(tmp_path, "current")
    assert store.prune(max_token_lifetime=900) == PruneResult([], [], [])


@pytest.mark.feature("key-hot-reload", "key-reload-health")
def test_a_reload_that_races_keys_prune_loads_the_new_manifest_instead_of_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`keys prune` replaces keys.json, then deletes the pruned key's file: a reload that read
    the old keys.json just before must not report the file as missing (readiness would flap)."""
    store = KeyStore(tmp_path)
    store.ensure()
    store.rotate()
    server = KeyStore(tmp_path)
    server.reload()
    old = kid_in(tmp_path, "retired")
    data = json.loads(store.manifest_path.read_text())
    for entry in data["keys"]:
        if entry["kid"] == old:
            entry["retired_at"] -= 1000
    store.manifest_path.write_text(json.dumps(data))  # changed: the server will rebuild
    real_read = server._read_private

    def read_while_pruning(path: Path) -> bytes:
        if path.name == f"{old}.pem":
            assert KeyStore(tmp_path).prune(max_token_lifetime=900).removed == [old]
        return real_read(path)

    monkeypatch.setattr(server, "_read_private", read_while_pruning)
    assert server.reload() is True
    assert server.failure is None
    assert old not in server.keyset().public
