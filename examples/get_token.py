"""Print an access token for the example API: the demo client's client_credentials grant
(``make run`` seeded it and saved its secret in data/demo-credentials.json), asking for the
API as the token's audience (RFC 8707 ``resource``).

Run it where ``make run`` (``python -m server seed-demo``) ran, the repository's root: the
credentials file is read relative to the working directory, as seed-demo wrote it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx

TOKEN_SERVER = os.environ.get("TOKEN_SERVER", "http://127.0.0.1:8000")
API_RESOURCE = os.environ.get("API_RESOURCE", "http://127.0.0.1:8001")
#: Where ``seed-demo`` saves the demo client's secret, relative to where it ran.
CREDENTIALS = Path("data") / "demo-credentials.json"


def main() -> int:
    try:
        credentials = json.loads(CREDENTIALS.read_text())
    except FileNotFoundError:
        print(
            f"error: no {CREDENTIALS} here: run this where `make run` seeded the demo client "
            "(the repository's root)",
            file=sys.stderr,
        )
        return 1
    try:
        answer = httpx.post(
            TOKEN_SERVER + "/oauth2/token",
            data={"grant_type": "client_credentials", "scope": "api", "resource": API_RESOURCE},
            auth=(credentials["client_id"], credentials["client_secret"]),
        )
    except httpx.TransportError as error:
        print(
            f"error: the token server at {TOKEN_SERVER} cannot be reached: {error}", file=sys.stderr
        )
        return 1
    if answer.status_code != 200:
        print(f"error: {answer.status_code} {answer.text}", file=sys.stderr)
        return 1
    print(answer.json()["access_token"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
