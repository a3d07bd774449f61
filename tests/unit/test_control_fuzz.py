"""The control plane's OpenAPI schema, fuzzed with schemathesis: whatever a client sends
that the schema allows or not, the API answers without a server error, and its answers
conform to the schema. Run as an operator and as a device (the two kinds of caller)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from edgefleet.cloud.control import rollout
from edgefleet.cloud.control.app import ControlSettings, create_app


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, str]]]:
    from fastapi.testclient import TestClient

    folder = tmp_path_factory.mktemp("control-fuzz")
    app = create_app(ControlSettings(database_url=f"sqlite:///{folder}/control.db",
                                     state_dir=folder / "state", tick_s=3600.0,
                                     policy=rollout.GatePolicy()))
    admin = {"Authorization": "Bearer " + (folder / "state" / "admin.token").read_text().strip()}
    with TestClient(app) as http:
        operator = http.post("/v1/tokens", json={"name": "fuzz", "role": "operator"},
                             headers=admin).json()["token"]
        made = http.post("/v1/enrollment-tokens", json={"labels": {"site": "fuzz"}},
                         headers=admin).json()["token"]
        device = http.post("/v1/enroll", json={"token": made, "device": "gw-fuzz"}).json()
        yield app, {"operator": f"Bearer {operator}", "device": f"Bearer {device['token']}"}


FUZZ = settings(max_examples=12, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def _fuzz(app: Any, authorization: str) -> list[str]:
    """Every operation of the schema, fuzzed; returns the operations run."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    ran = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @FUZZ
        @given(case=operation.as_strategy())
        def one(case: Any) -> None:
            # Every check but "schema-valid data is accepted": some refusals depend on
            # state or on rules a schema cannot state (a model that is not published, a
            # label set twice, a second active deployment), and must stay refusals.
            case.call_and_validate(headers={"Authorization": authorization},
                                   excluded_checks=[positive_data_acceptance])

        one()
        ran.append(operation.label)
    return ran


@pytest.mark.parametrize("role", ["operator", "device"])
def test_every_operation_answers_without_server_errors_and_as_its_schema_says(
    control: tuple[Any, dict[str, str]], role: str,
) -> None:
    app, tokens = control
    ran = _fuzz(app, tokens[role])
    assert "POST /v1/deployments" in ran and "GET /v1/device/desired" in ran
