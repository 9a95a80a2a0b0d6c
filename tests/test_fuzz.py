"""Fuzz the API from its own OpenAPI schema (schemathesis): valid and invalid requests alike
must never produce a server error."""

from __future__ import annotations

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from serving import LiveServer

from mixtral.config import preset
from mixtral.model import Transformer
from mixtral.server.app import Settings, create_app, json_constraints


def small_context_model() -> Transformer:
    model = Transformer(preset("tiny").with_(max_seq_len=96))  # every generation stays short
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model.eval()


APP = create_app(small_context_model, Settings(name="tiny", max_queue=64), json_constraints())
schema = schemathesis.openapi.from_dict(APP.openapi())  # the app's own schema, no server yet
CASES: dict = {"count": 0}


@pytest.fixture(scope="module")
def server():
    s = LiveServer(app=APP)
    yield s
    print(f"\nschemathesis: {CASES}")
    s.stop()


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_fails(case, server):
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = "mistral-small"  # a known model, so requests reach generation
    response = case.call(base_url=server.url, timeout=60)
    CASES["count"] += 1
    key = (case.operation.label, response.status_code)
    CASES[key] = CASES.get(key, 0) + 1
    assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
    assert "Traceback" not in response.text
