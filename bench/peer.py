"""node-oidc-provider, the peer ``make bench`` measures beside the token server.

``bench/node/server.mjs`` runs npm's ``oidc-provider`` (the version ``package-lock.json``
pins) with its in-memory adapter, one confidential client and RS256 JWT access tokens for
client_credentials, in as many cluster workers as the compared mode of ours has. This module
installs its packages when they are missing or stale, starts it on a free port, checks one
token (200, a JWT whose header says RS256 and whose signature verifies against the peer's
JWKS), and tells ``measure`` what to send: the same static.lua as our client_credentials and
JWKS scenarios, with the peer's paths from its discovery document.

Where node or npm is missing, or ``npm ci`` fails, the peer is reported as not measured; the
rest of the run goes on. A peer that starts but issues the wrong token stops the run: that is
a fault in ``server.mjs``, not in the machine.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from .processes import free_port, stop, wait_for

NODE_DIR = Path(__file__).resolve().parent / "node"
CLIENT_ID = "bench-cc"
CLIENT_SECRET = "bench-cc-secret"  # a client of a throw-away in-memory server on loopback
SCOPE = "api"
#: The peer's two scenarios; ours are compared with these (bench/report.py).
SCENARIOS = ["client_credentials", "jwks"]


class PeerUnavailable(Exception):
    """The peer cannot be run on this machine (no node or npm, or its packages will not install)."""


@dataclass
class Peer:
    url: str
    basic: str
    token_path: str
    jwks_path: str
    node: str
    oidc_provider: str
    workers: int

    def scenario_args(self, scenario: str) -> tuple[str, list[str]]:
        """The wrk script and arguments of one of the peer's scenarios (as ``Seeded``'s)."""
        if scenario == "client_credentials":
            body = f"grant_type=client_credentials&scope={SCOPE}"
            return "static", ["POST", self.token_path, self.basic, body]
        if scenario == "jwks":
            return "static", ["GET", self.jwks_path, "-", "-"]
        raise ValueError(f"the peer has no {scenario} scenario")


def _stale() -> bool:
    """node_modules is missing, or older than the lock file npm installed it from."""
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    if not installed.exists():
        return True
    mtime = installed.stat().st_mtime
    return any(
        (NODE_DIR / name).stat().st_mtime > mtime for name in ("package.json", "package-lock.json")
    )


def install() -> None:
    """``npm ci`` in bench/node when node_modules is missing or stale."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise PeerUnavailable("node or npm is not installed")
    if not _stale():
        return
    print("  npm ci in bench/node", flush=True)
    done = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise PeerUnavailable(f"npm ci failed: {(done.stderr or done.stdout).strip()[-500:]}")


def versions() -> tuple[str, str]:
    """node's version and the installed oidc-provider's."""
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True)
    package = NODE_DIR / "node_modules" / "oidc-provider" / "package.json"
    return node.stdout.strip(), str(json.loads(package.read_text())["version"])


def check(peer: Peer, discovery: dict[str, str]) -> None:
    """One client_credentials token: 200, an RS256 JWT that verifies against the peer's JWKS."""
    response = httpx.post(
        peer.url + peer.token_path,
        content=f"grant_type=client_credentials&scope={SCOPE}",
        headers={
            "Authorization": "Basic " + peer.basic,
            "Content-Type": "application/x-www-form-urlencoded",
        },
        timeout=10,
    )
    if response.status_code != 200:
        raise SystemExit(
            f"node-oidc-provider: token endpoint {response.status_code}: {response.text}"
        )
    value = response.json()["access_token"]
    keys = KeySet.import_key_set(httpx.get(discovery["jwks_uri"], timeout=10).json())
    try:
        token = jwt.decode(value, keys, algorithms=["RS256"])
        jwt.JWTClaimsRegistry(
            iss={"essential": True, "value": discovery["issuer"]},
            client_id={"essential": True, "value": CLIENT_ID},
            exp={"essential": True},
        ).validate(token.claims)
    except (JoseError, ValueError) as error:
        raise SystemExit(f"node-oidc-provider: its access token does not verify: {error}") from None
    if token.header.get("alg") != "RS256" or token.header.get("typ") != "at+jwt":
        raise SystemExit(f"node-oidc-provider: not an RS256 JWT access token: {token.header}")


@contextmanager
def serving(workdir: Path, workers: int) -> Iterator[Peer]:
    """The peer on a free port with ``workers`` cluster workers, checked, until the block ends."""
    install()
    node, oidc_provider = versions()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "node-oidc-provider.log"
    env = {
        **os.environ,
        "BENCH_PEER_CLIENT_ID": CLIENT_ID,
        "BENCH_PEER_CLIENT_SECRET": CLIENT_SECRET,
    }
    with log_path.open("w") as log:
        process = subprocess.Popen(
            ["node", "server.mjs", str(port), str(workers)],
            cwd=NODE_DIR,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_for(url + "/.well-known/openid-configuration", process, log_path)
        except SystemExit as error:
            raise PeerUnavailable(str(error)) from None
        discovery: dict[str, str] = httpx.get(
            url + "/.well-known/openid-configuration", timeout=10
        ).json()
        basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        peer = Peer(
            url,
            basic,
            urlsplit(discovery["token_endpoint"]).path,
            urlsplit(discovery["jwks_uri"]).path,
            node,
            oidc_provider,
            workers,
        )
        check(peer, discovery)
        yield peer
    finally:
        stop(process)
