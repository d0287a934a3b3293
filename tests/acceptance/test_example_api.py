"""examples/README.md's five steps, end to end, with real processes.

1. the token server with the example API among its resources (``AUTH_RESOURCES``), seeded with
   ``seed-demo`` as ``make run`` does; 2. the example API under uvicorn; 3. ``get_token.py``;
4. ``GET /orders`` with the token; 5. the same without one: 401 with the challenge naming the
API's RFC 9728 metadata, which names the token server.

The token server's CLI and ``get_token.py`` run in a directory of the test's own, so the
``data/demo-credentials.json`` they write and read is not the repository's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc.jwk import ECKey

from .conftest import (
    FAST_ARGON2_ENV,
    ROOT,
    RunningServer,
    free_port,
    fresh_database,
    launch_server,
    server_env,
    wait_until_up,
)
from .test_resource_kit import dpop_proof

pytestmark = pytest.mark.feature("rs-kit-integration", "rs-kit-challenges", "rs-kit-metadata")

README = ROOT / "examples" / "README.md"


@dataclass(frozen=True)
class Demo:
    token_server: RunningServer
    api_url: str
    #: The environment the README's commands run with (the two URLs the example reads).
    env: dict[str, str]
    #: Where the token server's CLI ran (its data/demo-credentials.json).
    workdir: Path


def wait_for(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer: " + log.read_text())
        time.sleep(0.1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """The two processes of steps 1 and 2, for the module's tests (each only asks for tokens
    and calls the API)."""
    tmp_path = tmp_path_factory.mktemp("example-api")
    api_port = str(free_port())
    api_url = f"http://127.0.0.1:{api_port}"
    token_port = free_port()
    issuer = f"http://127.0.0.1:{token_port}"
    workdir = tmp_path / "work"
    workdir.mkdir()
    keys = tmp_path / "keys"
    with fresh_database("sqlite", tmp_path) as database_url:
        # Step 1, as `AUTH_RESOURCES=<api> make run` does it: seed-demo, then serve.
        env = server_env(database_url, keys, issuer, AUTH_RESOURCES=api_url, **FAST_ARGON2_ENV)
        seeded = subprocess.run(
            [sys.executable, "-m", "server", "seed-demo"],
            env={**env, "PYTHONPATH": str(ROOT)},
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert seeded.returncode == 0, seeded.stderr
        assert (workdir / "data" / "demo-credentials.json").exists()
        token_server = launch_server(
            database_url,
            keys,
            tmp_path / "server.log",
            port=token_port,
            AUTH_RESOURCES=api_url,
            **FAST_ARGON2_ENV,
        )
        api: subprocess.Popen[bytes] | None = None
        try:
            wait_until_up(token_server)
            # Step 2: the API, from the repository's root.
            example_env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("AUTH_")},
                "TOKEN_SERVER": issuer,
                "API_RESOURCE": api_url,
            }
            api_log = tmp_path / "api.log"
            with api_log.open("w") as log:
                api = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "uvicorn",
                        "examples.orders_api:app",
                        "--port",
                        api_port,
                    ],
                    env={**example_env, "PYTHONPATH": str(ROOT)},
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            wait_for(api_url + "/healthz", api, api_log)
            yield Demo(token_server, api_url, example_env, workdir)
        finally:
            if api is not None and api.poll() is None:
                api.terminate()
                api.wait(timeout=30)
            token_server.stop()


def get_token(demo: Demo, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Step 3: ``python examples/get_token.py``, where the credentials file is."""
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "get_token.py")],
        env=demo.env,
        cwd=cwd or demo.workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def readme_challenge(api_url: str) -> str:
    """The ``www-authenticate`` line the README says step 5 prints, for the API at
    ``api_url`` (the README's is http://127.0.0.1:8001)."""
    printed = re.search(r"The last one prints.*?```\n(.*?)\n```", README.read_text(), re.S)
    assert printed is not None, "examples/README.md no longer shows step 5's output"
    return printed.group(1).replace("http://127.0.0.1:8001", api_url)


def demo_token(demo: Demo, headers: dict[str, str] | None = None, **form: str) -> dict[str, Any]:
    """A token for the demo client asked for directly (what get_token.py does, varied)."""
    credentials = json.loads((demo.workdir / "data" / "demo-credentials.json").read_text())
    answer = httpx.post(
        demo.token_server.url + "/oauth2/token",
        data={"grant_type": "client_credentials", **form},
        auth=(credentials["client_id"], credentials["client_secret"]),
        headers=headers or {},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def orders(demo: Demo, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(demo.api_url + "/orders", headers=headers or {}, timeout=10)


def test_the_readme_steps_work_end_to_end(demo: Demo) -> None:
    got = get_token(demo)
    assert got.returncode == 0, got.stderr
    token = got.stdout.strip()

    # Step 4: the call with the token succeeds.
    answer = orders(demo, {"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["subject"] == "demo-client" and body["client_id"] == "demo-client"
    assert [order["id"] for order in body["orders"]] == ["o-1", "o-2"]

    # Step 5: without a token, 401 and the challenges naming the metadata document, exactly
    # as the README prints them.
    refused = orders(demo)
    assert refused.status_code == 401, refused.text
    challenge = refused.headers["www-authenticate"]
    metadata_url = demo.api_url + "/.well-known/oauth-protected-resource"
    assert f'resource_metadata="{metadata_url}"' in challenge
    assert "error=" not in challenge  # RFC 6750 §3.1: no error code for a request without one
    assert f"www-authenticate: {challenge}" == readme_challenge(demo.api_url)

    # The document names the token server, the scope and the DPoP algorithms.
    document = httpx.get(metadata_url, timeout=10)
    assert document.status_code == 200
    metadata = document.json()
    assert metadata["resource"] == demo.api_url
    assert metadata["authorization_servers"] == [demo.token_server.url]
    assert metadata["scopes_supported"] == ["api"]
    assert "ES256" in metadata["dpop_signing_alg_values_supported"]


def test_the_example_refuses_what_the_readme_says_and_takes_dpop(demo: Demo) -> None:
    # get_token.py run elsewhere than where the demo was seeded says so.
    lost = get_token(demo, cwd=demo.workdir.parent)
    assert lost.returncode == 1 and "demo-credentials.json" in lost.stderr, lost.stderr

    # A token of the same server for another audience (the issuer's, no `resource`).
    unaimed = demo_token(demo, scope="api")["access_token"]
    refused = orders(demo, {"Authorization": f"Bearer {unaimed}"})
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"] == "invalid_token"
    assert 'error="invalid_token"' in refused.headers["www-authenticate"]

    # A token for this API without the `api` scope.
    narrow = demo_token(demo, scope="profile", resource=demo.api_url)["access_token"]
    refused = orders(demo, {"Authorization": f"Bearer {narrow}"})
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"] == "insufficient_scope"
    assert 'scope="api"' in refused.headers["www-authenticate"]

    # A DPoP-bound token, with a proof for this request: accepted; as Bearer: refused.
    key = ECKey.generate_key("P-256")
    proof = dpop_proof(key, "POST", demo.token_server.url + "/oauth2/token")
    bound = demo_token(demo, {"DPoP": proof}, scope="api", resource=demo.api_url)
    assert bound["token_type"] == "DPoP"
    token = bound["access_token"]
    url = demo.api_url + "/orders"
    answer = orders(
        demo, {"Authorization": f"DPoP {token}", "DPoP": dpop_proof(key, "GET", url, token)}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["client_id"] == "demo-client"
    refused = orders(demo, {"Authorization": f"Bearer {token}"})
    assert refused.status_code == 401, refused.text
    assert refused.headers["www-authenticate"].startswith('DPoP realm="api", error="invalid_token"')
