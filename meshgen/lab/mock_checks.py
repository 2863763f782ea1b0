"""Wrong requests to a mock provider, refused with the provider's real error (off unless ``auth=`` / ``schema=``
ask for them: see ``mock_header.py``).

- auth: OpenAI wants ``authorization: Bearer <key>`` (401 ``invalid_request_error`` / ``invalid_api_key``);
  Anthropic wants ``x-api-key`` (401 ``authentication_error``); Ollama has no auth and checks none.
- schema: a body that is not the endpoint's — an OpenAI body on ``/v1/messages`` (no ``max_tokens``, a ``system``
  message, ``stream_options``), an Anthropic body on ``/v1/chat/completions`` (a top-level ``system``), no
  ``model`` or ``messages`` — answers that provider's 400, worded as the provider words it. Anthropic also wants
  the ``anthropic-version`` header.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from meshgen.lab.answers import Answer, Api, api_of, error_answer
from meshgen.lab.mock_header import Behaviour

__all__ = ["check_auth", "check_schema"]

_OPENAI_PARAMS = frozenset(
    """model messages stream stream_options max_tokens max_completion_tokens temperature top_p n stop
    presence_penalty frequency_penalty logit_bias logprobs top_logprobs user tools tool_choice parallel_tool_calls
    response_format seed service_tier store metadata modalities audio prediction reasoning_effort functions
    function_call web_search_options verbosity prompt_cache_key safety_identifier""".split()
)
_OPENAI_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_ANTHROPIC_PARAMS = frozenset(
    """model messages max_tokens system metadata stop_sequences stream temperature top_k top_p tools tool_choice
    thinking service_tier container mcp_servers""".split()
)


def _masked(key: str) -> str:
    return f"{key[:3]}{'*' * max(len(key) - 7, 0)}{key[-4:]}" if len(key) > 7 else "*" * len(key)


def check_auth(path: str, headers: Mapping[str, str], b: Behaviour) -> Answer | None:
    """The provider's 401 when ``b`` requires auth and the request's credential is missing or wrong."""
    if not b.auth:
        return None
    api = api_of(path)
    if api is Api.ANTHROPIC:
        key = headers.get("x-api-key", "").strip()
        if not key:
            return error_answer(api, 401, "x-api-key header is required", etype="authentication_error")
        if b.auth_key is not None and key != b.auth_key:
            return error_answer(api, 401, "invalid x-api-key", etype="authentication_error")
        return None
    if api is Api.OLLAMA:
        return None
    scheme, _, key = headers.get("authorization", "").strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        message = (
            "You didn't provide an API key. You need to provide your API key in an Authorization header using "
            "Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
        return error_answer(api, 401, message, etype="invalid_request_error", code="invalid_api_key")
    if b.auth_key is not None and key != b.auth_key:
        message = f"Incorrect API key provided: {_masked(key)}. You can find your API key at https://platform.openai.com/account/api-keys."
        return error_answer(api, 401, message, etype="invalid_request_error", code="invalid_api_key")
    return None


def check_schema(method: str, path: str, headers: Mapping[str, str], body: bytes, b: Behaviour) -> Answer | None:
    """The provider's 400 when ``b`` asks for strict schemas and the body is not the endpoint's."""
    if not b.schema_strict or method != "POST":
        return None
    path = path.split("?", 1)[0].rstrip("/")
    api = api_of(path)
    if path not in {"/v1/chat/completions", "/chat/completions", "/v1/messages", "/api/chat"}:
        if api is Api.ANTHROPIC:
            return error_answer(api, 404, "Not Found", etype="not_found_error")
        if api is Api.OLLAMA:
            return error_answer(api, 404, "404 page not found")
        message = f"Invalid URL (POST {path})"
        return error_answer(api, 404, message, etype="invalid_request_error")
    try:
        req: Any = json.loads(body)
    except ValueError:
        req = None
    if api is Api.ANTHROPIC:
        return _anthropic(headers, req)
    if api is Api.OLLAMA:
        return _ollama(req)
    return _openai(req)


def _openai(req: Any) -> Answer | None:
    api = Api.OPENAI

    def bad(message: str, *, code: str | None = None, param: str | None = None) -> Answer:
        return error_answer(api, 400, message, etype="invalid_request_error", code=code, param=param)

    if not isinstance(req, dict):
        return bad(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
            "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
        )
    unknown = sorted(set(req) - _OPENAI_PARAMS)
    if unknown:
        return bad(f"Unrecognized request argument supplied: {unknown[0]}")
    if not isinstance(req.get("model"), str) or not req["model"]:
        return bad("you must provide a model parameter")
    if "messages" not in req:
        return bad("Missing required parameter: 'messages'.", code="missing_required_parameter", param="messages")
    messages = req["messages"]
    if not isinstance(messages, list) or not messages:
        return bad(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            code="empty_array",
            param="messages",
        )
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in _OPENAI_ROLES:
            return bad(
                f"Invalid value: '{role}'. Supported values are: 'system', 'assistant', 'user', 'function', "
                "'tool', and 'developer'.",
                code="invalid_value",
                param=f"messages[{i}].role",
            )
    return None


def _anthropic(headers: Mapping[str, str], req: Any) -> Answer | None:
    api = Api.ANTHROPIC

    def bad(message: str) -> Answer:
        return error_answer(api, 400, message, etype="invalid_request_error")

    if "anthropic-version" not in headers:
        return bad("anthropic-version: header is required")
    if not isinstance(req, dict):
        return bad("There was an error parsing the body of your request as JSON")
    for field in ("model", "messages", "max_tokens"):
        if field not in req:
            return bad(f"{field}: Field required")
    unknown = sorted(set(req) - _ANTHROPIC_PARAMS)
    if unknown:
        return bad(f"{unknown[0]}: Extra inputs are not permitted")
    if not isinstance(req["max_tokens"], int) or isinstance(req["max_tokens"], bool) or req["max_tokens"] < 1:
        return bad("max_tokens: Input should be a valid integer greater than or equal to 1")
    messages = req["messages"]
    if not isinstance(messages, list):
        return bad("messages: Input should be a valid list")
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "system":
            return bad(
                'messages: Unexpected role "system". The Messages API accepts a top-level `system` parameter, '
                'not "system" as an input message role.'
            )
        if role not in {"user", "assistant"}:
            return bad(f"messages.{i}.role: Input should be 'user' or 'assistant'")
    return None


def _ollama(req: Any) -> Answer | None:
    if not isinstance(req, dict):
        return error_answer(Api.OLLAMA, 400, "invalid character looking for beginning of value")
    if not isinstance(req.get("model"), str) or not req["model"]:
        return error_answer(Api.OLLAMA, 400, "model is required")
    if "messages" in req and not isinstance(req["messages"], list):
        return error_answer(Api.OLLAMA, 400, "json: cannot unmarshal into Go struct field ChatRequest.messages")
    return None
