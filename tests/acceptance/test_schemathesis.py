"""schemathesis over /openapi.json of a real server: no 500, and every answer fits its schema.

Every operation of the JSON APIs gets generated requests, valid and invalid, sent with a live
user's bearer token (and, for the protected ones, also checked to refuse the request without
it). The checks are schemathesis's own: no server error, status codes and content types that
the schema documents, response bodies that match their declared models.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from .conftest import cli, server_env, start_server

pytestmark = pytest.mark.feature("account-api", "hostile-input-table")
PASSWORD = "a long enough passphrase"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    database_url = f"sqlite+aiosqlite:///{tmp / 'auth.db'}"
    keys = tmp / "keys"
    env = server_env(database_url, keys, "http://unused")
    assert cli(env, "migrate").returncode == 0
    server = start_server(
        database_url, keys, tmp / "server.log", AUTH_RATE_LIMIT_LOGIN_IP="100000/minute"
    )
    try:
        created = cli(server.env, "clients", "create", "--client-id", "app", "--json")
        secret = json.loads(created.stdout)["client_secret"]
        made = cli(
            server.env, "users", "create", "--username", "sam", "--password-stdin", stdin=PASSWORD
        )
        assert made.returncode == 0, made.stderr
        issued = httpx.post(
            server.url + "/oauth2/token",
            data={"grant_type": "password", "username": "sam", "password": PASSWORD},
            auth=("app", secret),
        )
        yield server.url, issued.json()["access_token"]
        log = server.log()
        assert "Traceback" not in log, log[-3000:]
    finally:
        server.stop()


def test_the_json_apis_never_fail_and_always_match_their_schema(running: tuple[str, str]) -> None:
    url, token = running
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6  # every documented operation, each on its own below
    headers = {"Authorization": f"Bearer {token}"}
    for operation in operations:
        # The password policy (at least AUTH_PASSWORD_MIN_LENGTH, not a common password, not
        # the username) is more than a JSON schema can say: a schema-valid weak password is a
        # documented 400 there, not a flaw. Every other check runs on every operation.
        excluded = [positive_data_acceptance] if "password" in str(operation.body) else []
        fuzz(operation, headers, excluded)


def fuzz(operation: Any, headers: dict[str, str], excluded: list[Any]) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        case.call_and_validate(headers=headers, excluded_checks=excluded)

    run()
