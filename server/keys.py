"""Signing keys: PEM files in ``keys_dir`` and their lifecycle, and the JWKS.

Lifecycle: *next* (published, not yet signing) → *current* (signing) → *retired* (published
until every token it signed has expired) → removed by ``keys prune``. ``keys.json`` in the
same directory records each key's state; it is replaced atomically, so a running server (or
every replica sharing the directory) reloads it as soon as its content changes.
The ``kid`` of a key is its RFC 7638 thumbprint, checked against the file at every load.

A reload costs what changed, not what is there: a PEM file is parsed once per content (its
public half, without the slow RSA consistency check), and only the signing key's private half
is imported in full, once per rotation. The server calls ``reload`` off its event loop, and
records a reload that fails (``failure``) so that readiness can say so.

Whoever can write this directory can plant a signing key, so it is made 0700 and every file in
it 0600 whatever the umask, and nothing is loaded from it (nor written to it) while the
directory or a file read from it is writable by another user than ours or root, as ssh's
StrictModes does for ``~/.ssh``. Being readable by others is allowed: a secret mounted read-only
(root-owned, 0755/0644) must keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from joserfc import jwt
from joserfc.jwk import RSAKey

MANIFEST = "keys.json"
#: A key file's name: the key's RFC 7638 thumbprint (SHA-256, base64url, 43 characters).
KID_FILE = re.compile(r"[A-Za-z0-9_-]{43}\.pem")
RSA_BITS = 2048
#: A key's states, in the order of its life (``keys.json`` and the ``signing_keys`` table).
KEY_STATES = ("next", "current", "retired")


class KeysUnavailableError(RuntimeError):
    """There is no usable signing key; the message says how to create one."""


class KeyFileError(KeysUnavailableError):
    """``keys.json`` or a key file cannot be read or parsed; the message names the file."""


class RotationTooSoonError(RuntimeError):
    """The next key is too new: a cached JWKS may not hold it yet."""


@dataclass
class KeyInfo:
    kid: str
    state: str
    created_at: int
    activated_at: int | None = None
    retired_at: int | None = None


@dataclass
class KeySet:
    """What a running server needs: the signing key and the bytes of the JWKS, made once."""

    current: RSAKey
    kid: str
    public: dict[str, RSAKey]
    jwks_bytes: bytes
    etag: str
    #: The one algorithm tokens are signed (and checked) with: RS256, or PS256 under
    #: ``AUTH_FAPI2`` (FAPI 2.0 Security Profile §5.4.1), with the same RSA keys.
    alg: str = "RS256"
    #: Every key's state and timestamps as loaded (the ``key_age_seconds`` metric).
    infos: list[KeyInfo] = field(default_factory=list)

    def sign(self, claims: dict[str, Any], typ: str) -> str:
        header = {"alg": self.alg, "typ": typ, "kid": self.kid}
        return jwt.encode(header, claims, self.current, algorithms=[self.alg])


@dataclass(frozen=True)
class ReloadFailure:
    """The keys on disk could not be loaded: the server keeps the ones it loaded before."""

    reason: str
    since: float  # time.time() of the first failed attempt in a row
    attempts: int

    @staticmethod
    def after(previous: ReloadFailure | None, exc: BaseException) -> ReloadFailure:
        """The failure ``exc``, one more in the row ``previous`` began (if any)."""
        return ReloadFailure(
            reason=str(exc),
            since=previous.since if previous else time.time(),
            attempts=previous.attempts + 1 if previous else 1,
        )


@dataclass(frozen=True)
class _Parsed:
    """One PEM file as last parsed: its digest, its public key and, for the signing key only,
    its private key (imported with full validation)."""

    digest: bytes
    public: RSAKey
    private: RSAKey | None


@dataclass(frozen=True)
class PruneResult:
    removed: list[str]  # retired kids whose every token has expired
    kept: list[str]  # for each retired key kept, why
    orphans: list[str]  # files keys.json does not list (left by an interrupted rotation)


class KeySource(Protocol):
    """What a running server needs of a key store: ``KeyStore`` (files) or
    ``keys_db.DatabaseKeyStore``."""

    failure: ReloadFailure | None

    def keyset(self) -> KeySet: ...
    async def areload(self) -> bool: ...
    async def alist(self) -> list[KeyInfo]: ...
    async def arotate(self, *, min_next_age: int = 0) -> list[KeyInfo]: ...
    async def aprune(self, *, max_token_lifetime: int) -> PruneResult: ...


class KeyStore:
    def __init__(self, directory: Path, alg: str = "RS256") -> None:
        self.directory = directory
        self.alg = alg
        self._loaded_version: bytes | None = None
        self._keyset: KeySet | None = None
        self._parsed: dict[str, _Parsed] = {}
        #: Set while the latest reload failed; ``None`` once one succeeds.
        self.failure: ReloadFailure | None = None
        self._reloading = threading.Lock()  # the reloader's thread and the admin API's

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    # -- reading -----------------------------------------------------------------

    def read_manifest(self) -> list[KeyInfo]:
        raw = self._manifest_bytes()
        return [] if raw is None else self._parse_manifest(raw)

    def _manifest_bytes(self) -> bytes | None:
        """The bytes of ``keys.json`` (checked like every file of the directory), or ``None``."""
        path = self.manifest_path
        try:
            return self._read_private(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None

    def _parse_manifest(self, raw: bytes) -> list[KeyInfo]:
        path = self.manifest_path
        try:
            data = json.loads(raw)
        except UnicodeDecodeError:
            raise KeyFileError(f"{path}: not valid JSON (not UTF-8 text)") from None
        except json.JSONDecodeError as exc:
            raise KeyFileError(
                f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): "
                "restore it from a backup, or move it away and run `python -m server keys rotate`"
            ) from None
        try:
            infos = [KeyInfo(**entry) for entry in data["keys"]]
        except (KeyError, TypeError):
            raise KeyFileError(
                f'{path}: not a key manifest (expected {{"keys": [{{"kid": …, "state": …, '
                '"created_at": …}, …]})'
            ) from None
        for info in infos:
            if not isinstance(info.kid, str) or not isinstance(info.state, str):
                raise KeyFileError(f"{path}: an entry's kid or state is not a string")
        return infos

    def _read_private(self, path: Path) -> bytes:
        """The bytes of a file of the key directory, after checking that no other user could
        have written it or the directory (the mode of the open file, not of the path)."""
        with open(path, "rb") as handle:
            self._check_private(self.directory, os.stat(self.directory))
            self._check_private(path, os.fstat(handle.fileno()))
            return handle.read()

    def private_pem(self, kid: str) -> bytes:
        """The PEM file of ``kid`` (``keys import``), checked like every file here."""
        return self._read_private(self._pem_path(kid))

    def _check_private(self, path: Path, info: os.stat_result) -> None:
        mode = stat.S_IMODE(info.st_mode)
        owners = {os.geteuid(), 0}
        if info.st_uid in owners and not mode & (stat.S_IWGRP | stat.S_IWOTH):
            return
        why = (
            f"owned by another user than the server's (uid {os.geteuid()}) or root"
            if info.st_uid not in owners
            else "writable by others (group or world)"
        )
        raise KeysUnavailableError(
            f"refusing to use signing keys: {path} (mode {mode:o}, owner uid {info.st_uid}) "
            f"is {why}, so another user could plant a signing key: run "
            f"`chmod 700 {self.directory} && chmod 600 {self.directory}/*` (and `chown` them "
            "to the server's user) after checking that keys.json lists only your keys"
        )

    def load(self) -> KeySet:
        """The keys on disk, without touching what this store has loaded (``reload`` does)."""
        return self._build(self.read_manifest(), dict(self._parsed))[0]

    def _build(
        self, infos: list[KeyInfo], cache: dict[str, _Parsed]
    ) -> tuple[KeySet, dict[str, _Parsed]]:
        current = [info for info in infos if info.state == "current"]
        if not current:
            raise KeysUnavailableError(
                f"no current signing key in {self.directory}: "
                "run `python -m server keys rotate` to create one"
            )
        parsed: dict[str, _Parsed] = {}
        for info in infos:
            pem_path = self._pem_path(info.kid)
            try:
                pem = self._read_private(pem_path)
            except FileNotFoundError:
                raise KeysUnavailableError(
                    f"keys.json lists {info.kid} but {pem_path} is missing: "
                    "restore the file, or remove the entry and run `python -m server keys rotate`"
                ) from None
            except OSError as exc:
                raise KeyFileError(f"{pem_path}: cannot be read ({exc.strerror or exc})") from None
            digest = hashlib.sha256(pem).digest()
            entry = cache.get(info.kid)
            if entry is None or entry.digest != digest:
                entry = _Parsed(digest, public_half(info.kid, pem, pem_path), None)
            signs = info is current[0]
            if signs and entry.private is None:
                entry = replace(entry, private=_private_key(pem, pem_path))
            elif not signs and entry.private is not None:
                entry = replace(entry, private=None)  # only the signing key is kept private
            parsed[info.kid] = entry
        signing = parsed[current[0].kid].private
        assert signing is not None
        public = {kid: entry.public for kid, entry in parsed.items()}
        return make_keyset(infos, public, current[0].kid, signing, self.alg), parsed

    def keyset(self) -> KeySet:
        if self._keyset is None:
            self.reload()
        assert self._keyset is not None
        return self._keyset

    def reload(self) -> bool:
        """Load the keys again if ``keys.json`` changed; True when something new was loaded.

        Not a coroutine and slow when a key changed (the signing key's validation): a server
        runs it in a worker thread. On failure it raises, keeps the keys loaded before, and
        records the failure in ``failure`` until a reload succeeds. The directory and
        ``keys.json`` are checked at every call, so loosened permissions are noticed even when
        the content did not change. The version is a digest of ``keys.json``, not its mtime:
        two writes within one timestamp tick (a second on some network filesystems) would
        share it and hide a rotation.
        """
        with self._reloading:
            return self._reload()

    def _reload(self) -> bool:
        try:
            raw = self._manifest_bytes()
            version = None if raw is None else hashlib.sha256(raw).digest()
            if self._keyset is not None and version == self._loaded_version:
                changed = False
            else:
                try:
                    self._load_manifest(raw)
                except KeysUnavailableError:
                    # Read while `keys prune` replaced keys.json and then deleted a key file
                    # the old one listed? Then the new keys.json is complete: load it instead.
                    again = self._manifest_bytes()
                    if again == raw:
                        raise
                    raw, version = again, None if again is None else hashlib.sha256(again).digest()
                    self._load_manifest(raw)
                self._loaded_version = version
                changed = True
        except Exception as exc:
            self.failure = ReloadFailure.after(self.failure, exc)
            raise
        self.failure = None
        return changed

    def _load_manifest(self, raw: bytes | None) -> None:
        infos = [] if raw is None else self._parse_manifest(raw)
        self._keyset, self._parsed = self._build(infos, self._parsed)

    # -- the interface both stores share (``KeySource``), for the event loop ----------

    async def areload(self) -> bool:
        return await asyncio.to_thread(self.reload)

    async def alist(self) -> list[KeyInfo]:
        return await asyncio.to_thread(self.read_manifest)

    async def arotate(self, *, min_next_age: int = 0) -> list[KeyInfo]:
        return await asyncio.to_thread(lambda: self.rotate(min_next_age=min_next_age))

    async def aprune(self, *, max_token_lifetime: int) -> PruneResult:
        return await asyncio.to_thread(lambda: self.prune(max_token_lifetime=max_token_lifetime))

    # -- writing (operator commands) --------------------------------------------

    def ensure(self) -> bool:
        """Create a current and a next key when the directory has none; True if created."""
        with self._locked():
            if self.read_manifest():
                return False
            self._write_manifest(self._fresh_pair())
            return True

    def rotate(self, *, min_next_age: int = 0) -> list[KeyInfo]:
        """next → current, current → retired, and a new next. Returns the new manifest.

        ``min_next_age`` (the JWKS max-age): refuse to promote a next key published more
        recently than that, since a verifier's cached JWKS might not hold it yet and would
        reject every token it signs until the cache expired.
        """
        with self._locked():
            infos = self.read_manifest()
            if not any(info.state == "current" for info in infos):
                infos = [*infos, *self._fresh_pair()]
            else:
                stamp = int(time.time())
                for info in infos:
                    too_soon = rotation_too_soon(info, stamp, min_next_age)
                    if too_soon is not None:
                        raise too_soon
                for info in infos:
                    if info.state == "current":
                        info.state, info.retired_at = "retired", stamp
                promoted = False
                for info in infos:
                    if info.state == "next":
                        info.state, info.activated_at = "current", stamp
                        promoted = True
                if not promoted:
                    infos.append(self._generate("current"))
                infos.append(self._generate("next"))
            self._write_manifest(infos)
            return infos

    def prune(self, *, max_token_lifetime: int) -> PruneResult:
        """Remove retired keys whose every token has expired, and the files ``keys.json`` does
        not list: PEM files of a rotation killed before it wrote ``keys.json``, and its
        unfinished ``keys.json`` (every writer holds the lock, so none is being written now).
        """
        removed: list[str] = []
        kept: list[str] = []
        with self._locked():
            stamp = int(time.time())
            infos = self.read_manifest()
            remaining: list[KeyInfo] = []
            for info in infos:
                if info.state == "retired":
                    safe_at = (info.retired_at or stamp) + max_token_lifetime
                    if safe_at <= stamp:
                        removed.append(info.kid)
                        continue
                    kept.append(
                        f"{info.kid}: tokens it signed may be valid for {safe_at - stamp} s more"
                    )
                remaining.append(info)
            self._write_manifest(remaining)
            for kid in removed:
                self._pem_path(kid).unlink(missing_ok=True)
            listed = {self._pem_path(info.kid).name for info in remaining}
            # Only files named as this store names keys (<RFC 7638 thumbprint>.pem): a backup
            # an operator keeps here under another name is not ours to delete.
            orphans = sorted(
                path.name
                for path in self.directory.glob("*.pem")
                if path.name not in listed and KID_FILE.fullmatch(path.name) and path.is_file()
            )
            for name in orphans:
                (self.directory / name).unlink(missing_ok=True)
        return PruneResult(removed, kept, orphans)

    def _fresh_pair(self) -> list[KeyInfo]:
        current = self._generate("current")
        current.activated_at = current.created_at
        return [current, self._generate("next")]

    def _generate(self, state: str) -> KeyInfo:
        key = RSAKey.generate_key(RSA_BITS, private=True)
        kid = key.thumbprint()
        path = self._pem_path(kid)
        # 0600 from the first byte: the private key is never readable by others.
        fd = _open_private(path, os.O_EXCL)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key.as_pem(private=True))
        return KeyInfo(kid=kid, state=state, created_at=int(time.time()))

    def _pem_path(self, kid: str) -> Path:
        return self.directory / f"{kid}.pem"

    def _write_manifest(self, infos: list[KeyInfo]) -> None:
        body = json.dumps({"keys": [info.__dict__ for info in infos]}, indent=2)
        tmp = self.manifest_path.with_suffix(".tmp")
        # 0600 before the first byte, so keys.json is 0600 once renamed over the old one.
        with os.fdopen(_open_private(tmp, os.O_TRUNC), "w") as handle:
            handle.write(body + "\n")
        os.replace(tmp, self.manifest_path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self.directory.exists():
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.directory.mkdir(mode=0o700)
                os.chmod(self.directory, 0o700)  # mkdir's mode went through the umask
            except FileExistsError:
                pass  # made by another process meanwhile: checked below like any other
        self._check_private(self.directory, os.stat(self.directory))
        with os.fdopen(_open_private(self.directory / ".lock", 0), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


def _open_private(path: Path, flags: int) -> int:
    """Open ``path`` for writing, created 0600; fchmod'ed too, since the mode given to open
    goes through the umask (which can only remove bits) and an existing file keeps its own."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def public_half(kid: str, pem: bytes, path: Path) -> RSAKey:
    """The public half of a PEM file, which must be the key its name says (RFC 7638 kid);
    the database store checks each row's sealed key with it too.

    Parsed without the RSA consistency check (tens of milliseconds a key): only the public
    numbers are used, and the thumbprint check proves they are the ones keys.json names.
    """
    try:
        key = load_pem_private_key(pem, password=None, unsafe_skip_rsa_key_validation=True)
    except Exception:  # cryptography raises several types for a bad file
        key = None
    if not isinstance(key, RSAPrivateKey):
        raise KeyFileError(
            f"{path}: not a readable RSA private key (truncated or damaged?): "
            "restore it from a backup"
        )
    public = RSAKey.import_key(key.public_key())
    thumbprint = public.thumbprint()
    if thumbprint != kid:
        raise KeyFileError(
            f"{path}: holds the key {thumbprint}, not {kid} (a kid is its key's RFC 7638 "
            "thumbprint): restore the right file from a backup"
        )
    return public


def _private_key(pem: bytes, path: Path) -> RSAKey:
    """The signing key, imported with full validation (once per rotation)."""
    try:
        key = RSAKey.import_key(pem)
        if not key.as_dict(private=True).get("d"):
            raise ValueError("no private key")
    except Exception:  # joserfc/cryptography raise several types for a bad key
        raise KeyFileError(
            f"{path}: not a readable RSA private key (truncated or damaged?): "
            "restore it from a backup"
        ) from None
    return key


def make_keyset(
    infos: list[KeyInfo], public: dict[str, RSAKey], kid: str, signing: RSAKey, alg: str
) -> KeySet:
    """The KeySet of either store: the JWKS lists current, next, then retired keys."""
    jwks = {
        "keys": [
            {**public[info.kid].as_dict(), "kid": info.kid, "use": "sig", "alg": alg}
            for info in sorted(infos, key=_publish_order)
        ]
    }
    body = json.dumps(jwks, separators=(",", ":")).encode()
    return KeySet(
        current=signing,
        kid=kid,
        public=public,
        jwks_bytes=body,
        etag='"' + hashlib.sha256(body).hexdigest()[:32] + '"',
        alg=alg,
        infos=[replace(info) for info in infos],
    )


def rotation_too_soon(info: KeyInfo, stamp: int, min_next_age: int) -> RotationTooSoonError | None:
    """The rule of both stores: a next key published less than ``min_next_age`` (the JWKS
    max-age) ago may not sign yet, since a verifier's cached JWKS might not hold it."""
    age = stamp - info.created_at
    if info.state != "next" or age >= min_next_age:
        return None
    return RotationTooSoonError(
        f"the next key {info.kid} was published {age} s ago, but a JWKS "
        f"may be cached for {min_next_age} s, so verifiers might not know "
        f"it yet: rotate in {min_next_age - age} s, or pass --force if no "
        "verifier caches the JWKS (or all refetch it on an unknown kid)"
    )


def signing_info(infos: list[KeyInfo]) -> KeyInfo | None:
    """The key that signs: the current one (of several in a damaged store, the one activated
    last), or None."""
    current = [info for info in infos if info.state == "current"]
    if not current:
        return None
    return max(current, key=lambda info: (info.activated_at or info.created_at, info.kid))


def _publish_order(info: KeyInfo) -> int:
    return {"current": 0, "next": 1}.get(info.state, 2)
