"""Password hashing: argon2id with OWASP parameters, run off the event loop.

``verify`` always spends one argon2 verification, even for unknown users (against a dummy
hash made at start-up), so response timing does not reveal which usernames exist.
"""

from __future__ import annotations

import asyncio
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from .config import Settings

COMMON_PASSWORDS = frozenset(
    {
        "password",
        "password1",
        "password123",
        "12345678",
        "123456789",
        "1234567890",
        "qwertyuiop",
        "iloveyou",
        "11111111",
        "00000000",
        "abcdefgh",
        "letmein1",
        "welcome1",
        "qwerty123",
    }
)


class WeakPasswordError(ValueError):
    """The password breaks the policy; the message says which rule."""


def normalize_username(username: str) -> str:
    """One form for every comparison: NFKC folds width variants, casefold folds case."""
    return unicodedata.normalize("NFKC", username).casefold().strip()


@dataclass(frozen=True)
class Verification:
    ok: bool
    #: The stored hash used weaker parameters than configured: store a fresh one.
    needs_rehash: bool = False


class Passwords:
    def __init__(self, settings: Settings) -> None:
        self.hasher = PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_cost,
            parallelism=settings.argon2_parallelism,
        )
        self.max_length = settings.password_max_length
        self.min_length = settings.password_min_length
        self._dummy_hash = self.hasher.hash("dummy password for unknown users")
        #: Hashing runs on its own ``AUTH_ARGON2_CONCURRENCY`` threads, never the event loop's
        #: (nor anyio's shared pool of up to 40). More hashes at once than cores only share the
        #: cores; and each thread that ever hashed keeps a malloc arena the size of one hash
        #: (19 MiB), so a few dedicated threads also bound the memory.
        self._executor = ThreadPoolExecutor(
            max_workers=settings.argon2_concurrency, thread_name_prefix="argon2"
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def check_policy(self, password: str, *, username: str = "") -> None:
        if len(password) < self.min_length:
            raise WeakPasswordError(f"password must be at least {self.min_length} characters")
        if len(password) > self.max_length:
            raise WeakPasswordError(f"password must be at most {self.max_length} characters")
        if "\x00" in password:
            raise WeakPasswordError("password must not contain NUL characters")
        folded = password.casefold()
        if folded in COMMON_PASSWORDS or len(set(password)) < 3:
            raise WeakPasswordError("password is too common or too simple")
        if username and folded == normalize_username(username):
            raise WeakPasswordError("password must not be the username")

    def hash(self, password: str) -> str:
        return self.hasher.hash(password)

    def verify(self, password_hash: str | None, password: str) -> Verification:
        """Blocking: call through ``verify_async`` (or a worker thread) from async code."""
        if len(password) > self.max_length:
            password = ""
        try:
            self.hasher.verify(password_hash or self._dummy_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return Verification(ok=False)
        if password_hash is None:
            return Verification(ok=False)
        return Verification(ok=True, needs_rehash=self.hasher.check_needs_rehash(password_hash))

    async def verify_async(self, password_hash: str | None, password: str) -> Verification:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.verify, password_hash, password)

    async def hash_async(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.hash, password)
