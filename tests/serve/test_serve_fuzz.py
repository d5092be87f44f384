"""Bounded schemathesis run over every route of a live `dsft serve` (tiny model, loopback, fixed seed).

Fails on any 5xx, on a status or content type the published OpenAPI document does not declare, on a JSON
answer that violates its declared schema, and on schema-violating input that is not refused with a 4xx.
"""

from __future__ import annotations

import pytest

from dsft.config import ServeConfig
from dsft.serve.background import serve_in_background

schemathesis = pytest.importorskip("schemathesis", reason="dev extra: pip install 'dsft[dev]'")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (after the skip)
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
EXAMPLES = {"POST": 40, "GET": 8}  # per operation and generation mode: ≈ 300 requests in all


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir):
    # a short context keeps every generated completion short (≤ 48 tokens)
    cfg = ServeConfig(port=0, served_model_name="tiny", max_model_len=48, max_queue=64)
    with serve_in_background(str(tiny_model_dir), cfg) as url:
        yield url


def test_schemathesis_finds_no_5xx_and_no_schema_violation(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "GET /health", "GET /metrics", "POST /generate", "GET /v1/models", "GET /v1/models/{model_id}",
        "POST /v1/chat/completions", "POST /v1/completions"}
    calls = 0
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES[op.method.upper()], derandomize=True, database=None, deadline=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def call(case):
                nonlocal calls
                calls += 1
                case.call_and_validate(base_url=fuzz_server, checks=CHECKS, timeout=60)

            try:
                call()
            except Unsatisfiable:  # no input to make invalid (GET /health): nothing negative to send
                assert mode == GenerationMode.NEGATIVE, op.path
    assert calls >= 150, calls
