"""schemathesis over /openapi.json of a real server: no 500, and every answer fits its schema.

Every operation of the JSON APIs gets generated requests, valid (and, where the schema can be
broken, invalid) ones, sent with a live bearer token: a person's for the account API, an admin
client's for the admin API, which creates, changes and deletes what it generates on a server
of the test's own. The checks are schemathesis's own: no server error, status codes and
content types that the schema documents, response bodies that match their declared models,
valid data accepted and invalid data refused.

The generation is random; its seed is shown at the end of the report and on a failure, and
``AUTH_TEST_SEED=<n>`` replays the same requests (tests/seeds.py). The server's own random
values (ids, secrets) differ from run to run, so an answer that depends on them may not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.seeds import Seeded, run_with, seed_for

from .conftest import cli, server_env, start_server

pytestmark = pytest.mark.feature("account-api", "admin-api", "hostile-input-table")
PASSWORD = "a long enough passphrase"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    database_url = f"sqlite+aiosqlite:///{tmp / 'auth.db'}"
    keys = tmp / "keys"
    env = server_env(database_url, keys, "http://unused")
    assert cli(env, "migrate").returncode == 0
    server = start_server(
        database_url, keys, tmp / "server.log", AUTH_RATE_LIMIT_LOGIN_IP="100000/minute"
    )
    try:
        # Ids longer than what generated path parameters usually are, so no generated DELETE
        # or secret rotation lands on the clients the run itself uses.
        created = cli(
            server.env,
            "clients",
            "create",
            "--client-id",
            "account-app",
            "--first-party",
            "--scope",
            "account",
            "--json",
        )
        secret = json.loads(created.stdout)["client_secret"]
        ops = cli(
            server.env,
            "clients",
            "create",
            "--client-id",
            "schemathesis-ops",
            "--admin",
            "--grant",
            "client_credentials",
            "--json",
        )
        admin = httpx.post(
            server.url + "/oauth2/token",
            data={"grant_type": "client_credentials", "scope": "admin"},
            auth=("schemathesis-ops", json.loads(ops.stdout)["client_secret"]),
        )
        made = cli(
            server.env, "users", "create", "--username", "sam", "--password-stdin", stdin=PASSWORD
        )
        assert made.returncode == 0, made.stderr
        issued = httpx.post(
            server.url + "/oauth2/token",
            data={"grant_type": "password", "username": "sam", "password": PASSWORD},
            auth=("account-app", secret),
        )
        yield server.url, issued.json()["access_token"], admin.json()["access_token"]
        log = server.log()
        assert "Traceback" not in log, log[-3000:]
    finally:
        server.stop()


def test_the_json_apis_never_fail_and_always_match_their_schema(
    running: tuple[str, str, str], request: pytest.FixtureRequest
) -> None:
    url, person, admin = running
    seeded = seed_for(request)  # random unless AUTH_TEST_SEED names one
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 24  # every documented operation, each on its own below
    # The account API's last: a generated admin request must not disable the person first.
    operations.sort(key=lambda operation: operation.path.startswith("/api/"))
    seen: dict[str, set[int]] = {}
    for operation in operations:
        token = person if operation.path.startswith("/api/") else admin
        # Some rules are more than a JSON schema can say: the password policy (a minimum
        # length, not a common password, not the username), a client's consistency (a public
        # client has no client_credentials, authorization_code needs a redirect URI), a
        # taken id, a cursor this server did not make. A schema-valid request refused with a
        # documented 400 or 409 is then the contract, not a flaw; every other check runs on
        # every operation.
        responses = operation.definition.raw.get("responses", {})
        semantic = {"400", "409"} & set(responses)
        excluded = [positive_data_acceptance] if semantic else []
        headers = {"Authorization": f"Bearer {token}"}
        statuses = fuzz(operation, headers, excluded, GenerationMode.POSITIVE, seeded)
        # The token was accepted throughout: the run exercised the operation, not the guard.
        assert not statuses & {401, 403}, (operation.label, statuses)
        seen[operation.label] = statuses
        if operation.definition.raw.get("parameters") or operation.body:
            # Invalid data (wrong types, missing fields, bad formats): schemathesis's
            # negative_data_rejection check fails any that is accepted and truly invalid (an
            # unknown query parameter, say, is ignored, not invalid); no 5xx either way.
            refused = fuzz(operation, headers, [], GenerationMode.NEGATIVE, seeded)
            assert refused & {400, 404, 422}, (operation.label, refused)
    # Each operation answered valid data with something besides 422 at least once (the data
    # reached the handler), and each listing and read succeeded.
    assert all(statuses - {422} for statuses in seen.values()), seen
    reads = [label for label in seen if label.startswith("GET ") and "{" not in label]
    assert all(200 in seen[label] for label in reads), seen


def fuzz(
    operation: Any,
    headers: dict[str, str],
    excluded: list[Any],
    mode: GenerationMode,
    seeded: Seeded,
) -> set[int]:
    """Run the generated cases (the same ones for the same seed); the status codes seen."""
    statuses: set[int] = set()

    @given(case=operation.as_strategy(mode))
    @settings(
        # Invalid data is mostly refused at validation, after few examples: fewer of them.
        max_examples=30 if mode == GenerationMode.POSITIVE else 15,
        deadline=None,
        database=None,  # only the seed decides what runs
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        response = case.call_and_validate(headers=headers, excluded_checks=excluded)
        statuses.add(response.status_code)

    run_with(seeded, run)
    return statuses
