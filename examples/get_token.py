"""Print an access token for the example API: the demo client's client_credentials grant
(``make run`` seeded it and saved its secret in data/demo-credentials.json), asking for the
API as the token's audience (RFC 8707 ``resource``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx

TOKEN_SERVER = os.environ.get("TOKEN_SERVER", "http://127.0.0.1:8000")
API_RESOURCE = os.environ.get("API_RESOURCE", "http://127.0.0.1:8001")


def main() -> int:
    credentials = json.loads(Path("data/demo-credentials.json").read_text())
    answer = httpx.post(
        TOKEN_SERVER + "/oauth2/token",
        data={"grant_type": "client_credentials", "scope": "api", "resource": API_RESOURCE},
        auth=(credentials["client_id"], credentials["client_secret"]),
    )
    if answer.status_code != 200:
        print(f"error: {answer.status_code} {answer.text}", file=sys.stderr)
        return 1
    print(answer.json()["access_token"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
