"""Errors a client may see, as OpenAI-style bodies. Nothing else ever reaches a client.

Exception tree::

    ApiError                      whitelisted: status, type and code are shown to the client
    ├── MissingApiKey             401 authentication_error  missing_api_key
    ├── InvalidApiKey             401 authentication_error  invalid_api_key
    ├── InvalidContentType        400 invalid_request_error invalid_content_type
    ├── InvalidJson               400 invalid_request_error invalid_json
    ├── MissingModel              400 invalid_request_error missing_model
    ├── ModelNotFound             404 invalid_request_error model_not_found
    ├── ModelNotAllowed           403 permission_error      model_not_allowed
    ├── NotFound                  404 invalid_request_error not_found        (path the service does not serve)
    ├── MethodNotAllowed          405 invalid_request_error method_not_allowed
    ├── RequestTooLarge           413 invalid_request_error request_too_large
    ├── MalformedRequest          400 invalid_request_error malformed_request (bad HTTP; then close)
    ├── LimitExceeded             429 rate_limit_error      rate_limit_exceeded (rpm, tpm, tpd; + Retry-After)
    │   └── BudgetExceeded        429 rate_limit_error      insufficient_quota  (usd_per_day)
    └── ServiceUnavailable        503 server_error          service_unavailable (unexpected exception)
        ├── LedgerUnavailable     503 server_error          ledger_unavailable  (store down, policy refuse)
        └── ProviderSaturated     503 server_error          provider_saturated  (non-critical, held in vain;
                                                                                 + Retry-After)

Any exception that is not an ``ApiError`` is answered as ``ServiceUnavailable``, logged without the request.
"""

from __future__ import annotations

import json
from typing import ClassVar

__all__ = [
    "ApiError",
    "BudgetExceeded",
    "InvalidApiKey",
    "InvalidContentType",
    "LEDGER_UNAVAILABLE_AUTHZ_STATUS",
    "InvalidJson",
    "LedgerUnavailable",
    "LimitExceeded",
    "MalformedRequest",
    "MethodNotAllowed",
    "MissingApiKey",
    "MissingModel",
    "ModelNotAllowed",
    "ModelNotFound",
    "NotFound",
    "ProviderSaturated",
    "RequestTooLarge",
    "ServiceUnavailable",
    "error_body",
]

# A model name sent by a client is echoed in a message and a log line; bound what we echo.
_MAX_ECHO = 256


class ApiError(Exception):
    status: ClassVar[int]
    type: ClassVar[str]
    code: ClassVar[str]
    default_message: ClassVar[str]
    authz_status: ClassVar[int | None] = None
    """The status answered to Envoy's ext_authz call when it differs from what the client sees (``status``)."""

    def __init__(
        self,
        message: str | None = None,
        *,
        tenant: str | None = None,
        model: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ):
        self.message = message if message is not None else self.default_message
        self.tenant = tenant
        self.model = model
        self.headers = headers
        """Extra response headers a client may see (Envoy passes `retry-after` and `x-ratelimit-*` on)."""
        super().__init__(self.message)

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code)


class MissingApiKey(ApiError):
    status, type, code = 401, "authentication_error", "missing_api_key"
    default_message = (
        "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' or in the 'x-api-key' header."
    )


class InvalidApiKey(ApiError):
    status, type, code = 401, "authentication_error", "invalid_api_key"
    default_message = "Incorrect API key provided."


class InvalidContentType(ApiError):
    status, type, code = 400, "invalid_request_error", "invalid_content_type"
    default_message = "Content-Type must be application/json"


class InvalidJson(ApiError):
    status, type, code = 400, "invalid_request_error", "invalid_json"
    default_message = "The request body must be a JSON object."


class MissingModel(ApiError):
    status, type, code = 400, "invalid_request_error", "missing_model"
    default_message = "The request body must name a model: a string field 'model'."


class ModelNotFound(ApiError):
    status, type, code = 404, "invalid_request_error", "model_not_found"
    default_message = "The model does not exist"

    def __init__(self, model: str, *, tenant: str | None = None):
        model = model[:_MAX_ECHO]
        super().__init__(f"The model '{model}' does not exist", tenant=tenant, model=model)


class ModelNotAllowed(ApiError):
    status, type, code = 403, "permission_error", "model_not_allowed"
    default_message = "This API key is not allowed to use the model"

    def __init__(self, model: str, *, tenant: str):
        model = model[:_MAX_ECHO]
        super().__init__(f"This API key is not allowed to use the model '{model}'", tenant=tenant, model=model)


class NotFound(ApiError):
    status, type, code = 404, "invalid_request_error", "not_found"
    default_message = "Unknown path."


class MethodNotAllowed(ApiError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"
    default_message = "Method not allowed."


class RequestTooLarge(ApiError):
    status, type, code = 413, "invalid_request_error", "request_too_large"
    default_message = "The request body is too large."


class MalformedRequest(ApiError):
    status, type, code = 400, "invalid_request_error", "malformed_request"
    default_message = "Malformed HTTP request."


class LimitExceeded(ApiError):
    """A tenant limit would be crossed: requests or tokens per minute, or tokens per day."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"
    default_message = "Rate limit reached."

    def __init__(
        self,
        message: str | None = None,
        *,
        tenant: str | None = None,
        model: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        limit: str | None = None,
        reason: str | None = None,
    ):
        super().__init__(message, tenant=tenant, model=model, headers=headers)
        self.limit = limit
        """The limit that refused (``rpm``, ``tpm``, ``tpd``, ``usd_per_day``): the queue holds rpm and tpm."""
        self.reason = reason or limit or self.code
        """Why, for the refusals metric: the limit, or ``queue_full`` / ``queue_timeout`` for a held request."""


class BudgetExceeded(LimitExceeded):
    """The tenant's dollars per day are spent (OpenAI's name for a spent budget)."""

    code = "insufficient_quota"
    default_message = "The daily budget is spent."


class ServiceUnavailable(ApiError):
    status, type, code = 503, "server_error", "service_unavailable"
    default_message = "The service is temporarily unavailable. Please retry."


LEDGER_UNAVAILABLE_AUTHZ_STATUS = 424
"""What the service answers Envoy's ext_authz call for :class:`LedgerUnavailable`: ext_authz takes any 5xx as the
service itself failing and applies ``failure_mode`` (``open`` would let the request through uncounted), so the
service answers 424 (Failed Dependency) and Envoy's local reply hands the client 503 with this same body."""


class LedgerUnavailable(ServiceUnavailable):
    """The ledger's store does not answer and the policy (``ledger_down: refuse``) says not to admit uncounted.
    Clients see 503; Envoy's ext_authz call sees :data:`LEDGER_UNAVAILABLE_AUTHZ_STATUS`."""

    code = "ledger_unavailable"
    authz_status = LEDGER_UNAVAILABLE_AUTHZ_STATUS
    default_message = "Usage accounting is temporarily unavailable, so the request was not admitted. Please retry."


class ProviderSaturated(ServiceUnavailable):
    """A non-critical request waited its tenant's ``queue_max_wait`` for its model's provider, which stayed
    saturated. Clients see 503 with Retry-After; Envoy's ext_authz call sees :data:`LEDGER_UNAVAILABLE_AUTHZ_STATUS`
    (a 5xx would be taken as the service failing)."""

    code = "provider_saturated"
    authz_status = LEDGER_UNAVAILABLE_AUTHZ_STATUS
    default_message = "The model's provider is saturated; this non-critical request waited in vain. Please retry."


def error_body(message: str, type_: str, code: str) -> bytes:
    """``{"error": {"message", "type", "code"}}`` as compact ASCII JSON (a lone surrogate cannot break it)."""
    doc = {"error": {"message": message, "type": type_, "code": code}}
    return json.dumps(doc, separators=(",", ":")).encode()
