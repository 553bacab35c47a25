"""Property-based tests of every route from the OpenAPI document (schemathesis).

Positive cases (valid per the schema) must get documented statuses, content
types and bodies; negative cases (invalid per the schema) must never get a
5xx. Bounded: a few examples per operation, no example database.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance
from schemathesis.checks import not_a_server_error
from schemathesis.checks import response_schema_conformance
from schemathesis.checks import status_code_conformance

from daemon import config as config_mod
from daemon.app.tasks import Tasks
from daemon.roles.web.app import WebServer
from daemon.roles.web.app import create_app
from daemon.roles.web.openapi import build_spec
from daemon.store.db import open_database
from daemon.store.models import database
from daemon.store.queue import make_queues

TOKEN = "fuzz-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
POSITIVE_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

positive = schemathesis.openapi.from_dict(build_spec())
positive.config.generation.update(modes=[GenerationMode.POSITIVE])
negative = schemathesis.openapi.from_dict(build_spec())
negative.config.generation.update(modes=[GenerationMode.NEGATIVE])

BOUNDED = settings(
    max_examples=6,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


@schemathesis.serializer("text/csv")
def _csv(ctx, value):
    return value.encode("utf-8", "replace") if isinstance(value, str) else b""


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz")
    cfg = config_mod.from_dict(
        {
            "daemon": {"data_dir": str(data)},
            "web": {"api_token": TOKEN, "max_body_bytes": 65536},
            "provider": {"verify_token": "vt"},
        }
    )
    open_database(cfg, migrate_schema=True)
    database.close()
    queues = make_queues(cfg)
    server = WebServer(create_app(cfg, Tasks(cfg, queues)), cfg, port=0)
    thread = server.serve_in_thread()
    yield server.url
    server.stop()
    thread.join(10)
    queues.close()


@pytest.mark.timeout(120)
@positive.parametrize()
@BOUNDED
def test_valid_requests_get_documented_answers(case, server_url):
    case.call_and_validate(base_url=server_url, headers=HEADERS, checks=POSITIVE_CHECKS)


@pytest.mark.timeout(120)
@negative.parametrize()
@BOUNDED
def test_invalid_requests_never_get_a_server_error(case, server_url):
    case.call_and_validate(
        base_url=server_url, headers=HEADERS, checks=[not_a_server_error]
    )
