"""admission.py and errors.py in isolation: the decision, its order, and the error bodies."""

from __future__ import annotations

import hashlib
import itertools
import json

import pytest

from ext_proc.admission import (
    DIGEST_PREFIX_HEX,
    Admission,
    Admitted,
    api_key_from_headers,
    digest_index,
    is_json_content_type,
)
from ext_proc.config import ServiceConfig
from ext_proc.errors import (
    ApiError,
    InvalidApiKey,
    InvalidContentType,
    InvalidJson,
    MissingApiKey,
    MissingModel,
    ModelNotAllowed,
    ModelNotFound,
)
from tests.ext_proc.kit import KEY_A, KEY_A2, KEY_B, config_dict, sha256_hex


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


def _keys_sharing_a_prefix(width: int) -> tuple[str, str]:
    """Two keys whose sha256 hex digests share their first ``width`` characters (found by counting up)."""
    seen: dict[str, str] = {}
    for i in itertools.count():
        key = f"sk-bucket-{i}"
        prefix = hashlib.sha256(key.encode()).hexdigest()[:width]
        if prefix in seen:
            return seen[prefix], key
        seen[prefix] = key
    raise AssertionError("unreachable")


def test_default_index_buckets_every_digest_by_its_prefix() -> None:
    index = digest_index(ServiceConfig.model_validate(config_dict()))
    assert {(d, t) for bucket in index.values() for d, t in bucket} == {
        (sha256_hex(KEY_A), "team-a"),
        (sha256_hex(KEY_A2), "team-a"),
        (sha256_hex(KEY_B), "team-b"),
    }
    assert all(d[:DIGEST_PREFIX_HEX] == prefix for prefix, bucket in index.items() for d, _ in bucket)


@pytest.mark.parametrize("width", [0, 1, 2], ids=["one-bucket", "width-1", "width-2"])
def test_keys_sharing_a_bucket_resolve_to_their_own_tenants(width: int) -> None:
    key_x, key_y = _keys_sharing_a_prefix(max(width, 1))
    doc = config_dict()
    doc["tenants"]["team-a"]["key_hashes"].append(sha256_hex(key_x))
    doc["tenants"]["team-b"]["key_hashes"].append(sha256_hex(key_y))
    config = ServiceConfig.model_validate(doc)
    shared = sha256_hex(key_x)[:width]
    assert {(sha256_hex(key_x), "team-a"), (sha256_hex(key_y), "team-b")} <= set(digest_index(config, width)[shared])
    admission = Admission(config, prefix_width=width)
    assert admission.authenticate(key_x.encode()) == "team-a"
    assert admission.authenticate(key_y.encode()) == "team-b"
    assert admission.authenticate(KEY_B.encode()) == "team-b"
    with pytest.raises(InvalidApiKey):
        admission.authenticate(b"sk-not-configured")


@pytest.mark.parametrize(
    ("content_type", "allowed"),
    [
        (None, True),
        (b"", True),
        (b"application/json", True),
        (b"Application/JSON", True),
        (b"application/json; charset=utf-8", True),
        (b" application/json ;charset=UTF-8", True),
        (b"application/x-www-form-urlencoded", False),
        (b"text/plain", False),
        (b"application/jsonl", False),
        (b"application/json-patch+json", False),
        (b"multipart/form-data; boundary=application/json", False),
    ],
)
def test_is_json_content_type(content_type: bytes | None, allowed: bool) -> None:
    assert is_json_content_type(content_type) is allowed


@pytest.mark.parametrize(
    ("key", "body", "error"),
    [
        (b"sk-unknown", b'{"model":"gpt-4o"}', InvalidApiKey),
        (KEY_A.encode(), b"a=b", InvalidContentType),
        (KEY_A.encode(), b'{"model":"gpt-4o"}', InvalidContentType),
    ],
    ids=["key-checked-first", "before-json", "even-valid-json"],
)
def test_content_type_order(key: bytes, body: bytes, error: type[ApiError]) -> None:
    admission = Admission(ServiceConfig.model_validate(config_dict()))
    with pytest.raises(error) as caught:
        admission.admit(key, body, b"application/x-www-form-urlencoded")
    assert type(caught.value) is error


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
    request = {"model": "gpt-4o-mini", "messages": [], "stream": True}
    assert admission.admit(KEY_A2.encode(), json.dumps(request).encode()) == Admitted("team-a", "gpt-4o-mini", request)
    assert admission.admit(KEY_B.encode(), b'{"model":"llama3"}') == Admitted("team-b", "llama3", {"model": "llama3"})


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
            InvalidContentType(),
            400,
            {
                "message": "Content-Type must be application/json",
                "type": "invalid_request_error",
                "code": "invalid_content_type",
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
    ids=["not-found", "not-allowed", "invalid-key", "invalid-content-type", "lone-surrogate"],
)
def test_error_bodies(err: ApiError, status: int, body: dict[str, str]) -> None:
    assert err.status == status
    assert json.loads(err.body()) == {"error": body}


def test_echoed_model_is_bounded() -> None:
    err = ModelNotFound("m" * 10_000)
    assert err.model == "m" * 256
    assert len(err.body()) < 400
