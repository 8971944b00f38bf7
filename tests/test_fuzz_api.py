"""Property-based fuzzing of every operation in our OpenAPI document (Schemathesis + Hypothesis).

Bounded for CI: FUZZ_EXAMPLES examples per operation (env NORMBENCH_FUZZ_EXAMPLES overrides; about 20 s
for 40), derandomized so a failure reproduces (NORMBENCH_FUZZ_RANDOM=1 explores fresh examples).
Checks: no 5xx, the status code is documented, the content type and the body match the schema.
Every operation is fuzzed, the upload included (with generated multipart bodies); the admin endpoints
are fuzzed with the admin token so their handlers are reached too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from pydantic import SecretStr
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from app.config import Settings
from app.main import create_app

FUZZ_EXAMPLES = int(os.environ.get("NORMBENCH_FUZZ_EXAMPLES", "40"))
ADMIN_TOKEN = "fuzz-admin-token-0123456789abcdef"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


# Only the OpenAPI document of this app is read (no lifespan, no database); the requests go to `fuzz_app`,
# built per test on the migrated, emptied test database. (`schemathesis.pytest.from_fixture` would be the
# natural way, but it writes `node._nodeid`, which pytest 9 no longer has.)
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@pytest.fixture
def fuzz_app(settings: Settings) -> Iterator[FastAPI]:
    app = create_app(settings.model_copy(update={"admin_token": SecretStr(ADMIN_TOKEN)}))
    with TestClient(app):  # runs the lifespan: built-in datasets registered
        schema.app = app
        yield app
    schema.app = None


@schema.parametrize()
@hypothesis_settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("NORMBENCH_FUZZ_RANDOM") != "1",  # 1: explore new examples locally
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_survives_fuzzing(case: schemathesis.Case, fuzz_app: FastAPI) -> None:
    case.call_and_validate(app=fuzz_app, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, checks=CHECKS)
