"""CPU floors measured in the same run as the scenarios, on the same number of cores.

- argon2id verifications per second with the server's configured parameters: the ceiling of
  the password grant, which must verify one hash per request.
- RS256 signatures per second (the raw RSA-2048 PKCS#1 v1.5 operation, and the server's own
  ``KeySet.sign`` of a typical access token): what every token response must pay at least once.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from server.config import Settings
from server.keys import KeyStore

CLAIMS: dict[str, Any] = {
    "iss": "http://127.0.0.1:8000",
    "sub": "0123456789abcdef0123456789abcdef",
    "aud": "http://127.0.0.1:8000",
    "exp": 2_000_000_000,
    "iat": 1_999_999_100,
    "jti": "abcdefghijklmnopqrstuv",
    "client_id": "bench-app",
    "scope": "api",
    "auth_time": 1_999_999_100,
    "sid": "0123456789abcdef0123456789abcdef",
}


def _argon2_worker(args: tuple[dict[str, int], float]) -> int:
    params, seconds = args
    hasher = PasswordHasher(
        memory_cost=params["memory_cost"],
        time_cost=params["time_cost"],
        parallelism=params["parallelism"],
    )
    encoded = hasher.hash("correct horse battery staple")
    done = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        hasher.verify(encoded, "correct horse battery staple")
        done += 1
    return done


def _rsa_worker(args: tuple[str, str, float]) -> int:
    keys_dir, kind, seconds = args
    keyset = KeyStore(Path(keys_dir)).keyset()
    private = keyset.current.private_key
    assert private is not None
    message = b"x" * 600
    done = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if kind == "raw":
            private.sign(message, padding.PKCS1v15(), hashes.SHA256())
        else:
            keyset.sign(CLAIMS, "at+jwt")
        done += 1
    return done


def _parallel(worker: Any, args: Any, processes: int, seconds: float) -> float:
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        pool.map(worker, [(*args, 0.3)] * processes)  # warm-up: imports, first allocations
        counts: list[int] = pool.map(worker, [(*args, seconds)] * processes)
    return sum(counts) / seconds


def argon2_per_second(settings: Settings, processes: int, seconds: float = 3.0) -> float:
    params = {
        "memory_cost": settings.argon2_memory_cost,
        "time_cost": settings.argon2_time_cost,
        "parallelism": settings.argon2_parallelism,
    }
    return _parallel(_argon2_worker, (params,), processes, seconds)


def rs256_per_second(keys_dir: Path, processes: int, kind: str, seconds: float = 3.0) -> float:
    return _parallel(_rsa_worker, (str(keys_dir), kind), processes, seconds)
