"""admission.py and errors.py in isolation: the decision, its order, and the error bodies."""

from __future__ import annotations

import json

import pytest

from ext_proc.admission import Admission, Admitted, api_key_from_headers
from ext_proc.config import ServiceConfig
from ext_proc.errors import (
    ApiError,
    InvalidApiKey,
    InvalidJson,
    MissingApiKey,
    MissingModel,
    ModelNotAllowed,
    ModelNotFound,
)
from tests.ext_proc.kit import KEY_A, KEY_A2, KEY_B, config_dict


@pytest.fixture(scope="module")
def admission() -> Admission:
    return Admission(ServiceConfig.model_validate(config_dict()))


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "expected"),
    [
        (b"Bearer k1", None, b"k1"),
        (b"bearer  k1 ", None, b"k1"),
        (b"BEARER k1", b"k2", b"k1"),
        (b"Basic abc", b"k2", b"k2"),
        (b"Bearer ", b"k2", b"k2"),
        (b"Bearer", None, None),
        (None, b" k2 ", b"k2"),
        (None, b"", None),
        (None, None, None),
        (b"k1", None, None),
    ],
    ids=[
        "bearer",
        "spaces",
        "bearer-wins",
        "basic-falls-back",
        "empty-bearer-falls-back",
        "bare-scheme",
        "x-api-key",
        "empty-x-api-key",
        "nothing",
        "no-scheme",
    ],
)
def test_api_key_from_headers(authorization: bytes | None, x_api_key: bytes | None, expected: bytes | None) -> None:
    assert api_key_from_headers(authorization, x_api_key) == expected


@pytest.mark.parametrize(
    ("key", "tenant"),
    [(KEY_A, "team-a"), (KEY_A2, "team-a"), (KEY_B, "team-b")],
    ids=["a", "a-second-key", "b"],
)
def test_authenticate(admission: Admission, key: str, tenant: str) -> None:
    assert admission.authenticate(key.encode()) == tenant


@pytest.mark.parametrize(
    ("key", "body", "error", "tenant", "model"),
    [
        (None, b'{"model":"gpt-4o"}', MissingApiKey, None, None),
        (b"sk-unknown", b'{"model":"gpt-4o"}', InvalidApiKey, None, None),
        (KEY_A[:-1].encode(), b'{"model":"gpt-4o"}', InvalidApiKey, None, None),
        (b"sk-unknown", b"not json", InvalidApiKey, None, None),
        (KEY_A.encode(), b"not json", InvalidJson, "team-a", None),
        (KEY_A.encode(), b"[" * 100_000, InvalidJson, "team-a", None),
        (KEY_A.encode(), b"\xff", InvalidJson, "team-a", None),
        (KEY_A.encode(), b'"gpt-4o"', InvalidJson, "team-a", None),
        (KEY_A.encode(), b"{}", MissingModel, "team-a", None),
        (KEY_A.encode(), b'{"model":["gpt-4o"]}', MissingModel, "team-a", None),
        (KEY_A.encode(), b'{"model":"GPT-4O"}', ModelNotFound, "team-a", "GPT-4O"),
        (KEY_A.encode(), b'{"model":"llama3"}', ModelNotAllowed, "team-a", "llama3"),
        (KEY_B.encode(), b'{"model":"gpt-4o"}', ModelNotAllowed, "team-b", "gpt-4o"),
    ],
    ids=[
        "no-key",
        "unknown-key",
        "truncated-key",
        "key-checked-before-body",
        "bad-json",
        "too-deep",
        "not-utf8",
        "json-string",
        "no-model",
        "model-list",
        "model-case-matters",
        "not-allowed-a",
        "not-allowed-b",
    ],
)
def test_refusals(
    admission: Admission,
    key: bytes | None,
    body: bytes,
    error: type[ApiError],
    tenant: str | None,
    model: str | None,
) -> None:
    with pytest.raises(error) as caught:
        admission.admit(key, body)
    assert type(caught.value) is error
    assert (caught.value.tenant, caught.value.model) == (tenant, model)


def test_admitted(admission: Admission) -> None:
    body = json.dumps({"model": "gpt-4o-mini", "messages": [], "stream": True}).encode()
    assert admission.admit(KEY_A2.encode(), body) == Admitted("team-a", "gpt-4o-mini")
    assert admission.admit(KEY_B.encode(), b'{"model":"llama3"}') == Admitted("team-b", "llama3")


@pytest.mark.parametrize(
    ("err", "status", "body"),
    [
        (
            ModelNotFound("x"),
            404,
            {
                "message": "The model 'x' does not exist",
                "type": "invalid_request_error",
                "code": "model_not_found",
            },
        ),
        (
            ModelNotAllowed("x", tenant="t"),
            403,
            {
                "message": "This API key is not allowed to use the model 'x'",
                "type": "permission_error",
                "code": "model_not_allowed",
            },
        ),
        (
            InvalidApiKey(),
            401,
            {
                "message": "Incorrect API key provided.",
                "type": "authentication_error",
                "code": "invalid_api_key",
            },
        ),
        (
            ModelNotFound("\ud800\u00e9"),
            404,
            {
                "message": "The model '\ud800\u00e9' does not exist",
                "type": "invalid_request_error",
                "code": "model_not_found",
            },
        ),
    ],
    ids=["not-found", "not-allowed", "invalid-key", "lone-surrogate"],
)
def test_error_bodies(err: ApiError, status: int, body: dict[str, str]) -> None:
    assert err.status == status
    assert json.loads(err.body()) == {"error": body}


def test_echoed_model_is_bounded() -> None:
    err = ModelNotFound("m" * 10_000)
    assert err.model == "m" * 256
    assert len(err.body()) < 400
