"""What a client and a provider see through the real Envoy + the real data-plane service."""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.behaviour.conftest import DEV_KEY, Running, chat

OPENAI = "provider.openai.us-east.ep0"
BETA = "provider.openai-beta.us-east.ep0"
SHADOW = "provider.shadow.us-east.ep0"
PRIMARY = "provider.primary.us-east.ep0"
BACKUP = "provider.backup.us-east.ep0"
FLAKY = "provider.flaky.us-east.ep0"
CLAUDE = "provider.claude.global.ep0"
SLOWPOKE = "provider.slowpoke.us-east.ep0"
RETRIER = "provider.retrier.us-east.ep0"


@pytest.mark.parametrize(
    ("model", "label"),
    [("failover-model", PRIMARY), ("eject-model", FLAKY), ("claude-model", CLAUDE)],
    ids=["openai-schema", "second-provider", "anthropic-schema"],
)
def test_body_model_routes_to_its_provider(lab: Running, model: str, label: str) -> None:
    reply = lab.post(chat(model))
    assert reply.status == 200, reply.body
    assert reply.headers["x-served-by"] == label
    (seen,) = lab.upstream.requests(label)
    assert seen.json()["model"] == model
    # The client's key and address never reach a provider, nor do the gateway's internal answers.
    assert not {"authorization", "x-forwarded-for", "x-envoy-external-address"} & set(seen.headers)
    assert not [h for h in seen.headers if h.startswith("x-meshgen-")]
    assert seen.headers["host"] == "127.0.0.1", "a provider gets its own name as Host, not the gateway's"


def test_access_log_names_tenant_and_model_without_the_prompt(lab: Running) -> None:
    lab.post(chat("claude-model", user="access-log-test", messages=[{"role": "user", "content": "secret prompt"}]))
    deadline = time.monotonic() + 5  # Envoy flushes its stdout log about once a second
    while not (lines := [ln for ln in lab.envoy.log().splitlines() if '"model":"claude-model"' in ln]):
        assert time.monotonic() < deadline, "no access log line for the request"
        time.sleep(0.1)
    assert json.loads(lines[-1])["tenant"] == "team"
    assert "secret prompt" not in lab.envoy.log()
    assert "sk-test-team" not in lab.envoy.log()


@pytest.mark.parametrize(
    ("content_type", "status"),
    [("application/json; charset=utf-8", 200), ("Application/JSON", 200), ("application/x-www-form-urlencoded", 400)],
    ids=["charset", "case", "form"],
)
def test_body_is_read_as_json_by_envoy_and_service_alike(lab: Running, content_type: str, status: int) -> None:
    reply = lab.post(chat("claude-model"), headers={"content-type": content_type})
    assert reply.status == status, reply.body
    if status == 400:
        assert reply.json()["error"]["code"] == "invalid_content_type"
    else:
        assert reply.headers["x-served-by"] == CLAUDE


def test_canary_takes_ten_percent(lab: Running) -> None:
    def send(n: int) -> Counter[str]:
        served: Counter[str] = Counter()
        conn = http.client.HTTPConnection("127.0.0.1", lab.port, timeout=15)
        try:
            for _ in range(n):
                reply = lab.post(chat("gpt-4o"), conn=conn)
                assert reply.status == 200, reply.body
                served[reply.headers["x-served-by"]] += 1
        finally:
            conn.close()
        return served

    with ThreadPoolExecutor(8) as pool:
        served = sum(pool.map(send, [250] * 8), Counter())
    assert served.total() == 2000
    assert set(served) == {OPENAI, BETA}
    assert 0.075 <= served[BETA] / 2000 <= 0.125, served


def test_beta_header_always_reaches_beta(lab: Running) -> None:
    served = Counter(
        lab.post(chat("gpt-4o"), headers={"X-Model-Version": "beta"}).headers["x-served-by"] for _ in range(40)
    )
    assert served == {BETA: 40}


def test_mirror_gets_a_copy_while_client_gets_the_primary(lab: Running) -> None:
    reply = lab.post(chat("gpt-4o", user="mirror-test"), headers={"x-mock": f"status=500@{SHADOW}"})
    assert reply.status == 200
    assert reply.headers["x-served-by"] in (OPENAI, BETA)
    lab.upstream.wait_for(SHADOW, 1)
    (copy,) = [r for r in lab.upstream.requests(SHADOW) if r.json().get("user") == "mirror-test"]
    assert copy.headers["x-meshgen-mirror"] == "1", "the shadow leg must be marked so it is never billed"
    assert "authorization" not in copy.headers


def test_primary_503_fails_over_to_same_schema_backup(lab: Running) -> None:
    reply = lab.post(chat("failover-model"), headers={"x-mock": f"status=503@{PRIMARY}"})
    assert reply.status == 200, reply.body
    assert reply.headers["x-served-by"] == BACKUP
    assert lab.upstream.count(PRIMARY) == 1
    assert lab.upstream.requests(BACKUP)[0].headers["x-envoy-attempt-count"] == "2"


def test_affinity_keeps_a_session_on_one_endpoint(lab: Running) -> None:
    served = {
        session: {
            lab.post(chat("sticky-model"), headers={"x-session-id": session}).headers["x-served-by"] for _ in range(5)
        }
        for session in (f"session-{i}" for i in range(12))
    }
    assert all(len(endpoints) == 1 for endpoints in served.values()), served
    assert set().union(*served.values()) == {"provider.pool.us-east.ep0", "provider.pool.us-east.ep1"}


def test_slow_primary_is_hedged_to_the_next_priority(lab: Running) -> None:
    reply = lab.post(chat("hedge-model"), headers={"x-mock": f"delay_ms=1500@{SLOWPOKE}"})
    assert reply.status == 200
    assert reply.headers["x-served-by"] == BACKUP, "the hedge's answer wins while the primary is still thinking"
    assert lab.upstream.count(SLOWPOKE) == 1


def test_chaos_fault_switched_on_at_runtime_drives_failover(lab: Running) -> None:
    assert lab.post(chat("failover-model")).headers["x-served-by"] == PRIMARY
    lab.envoy.runtime_modify({"meshgen.chaos.primary-down.abort_percent": 100})
    try:
        lab.upstream.clear()
        reply = lab.post(chat("failover-model"))
        assert reply.status == 200
        assert reply.headers["x-served-by"] == BACKUP
        assert lab.upstream.count(PRIMARY) == 0
    finally:
        lab.envoy.runtime_modify({"meshgen.chaos.primary-down.abort_percent": 0})
    assert lab.post(chat("failover-model")).headers["x-served-by"] == PRIMARY


def test_consecutive_5xx_eject_the_endpoint(lab: Running) -> None:
    ejections = "cluster.provider_flaky_us-east.outlier_detection.ejections_enforced_consecutive_5xx"
    assert lab.envoy.stat(ejections) == 0
    for _ in range(3):
        assert lab.post(chat("eject-model"), headers={"x-mock": "status=500"}).status == 500
    lab.envoy.wait_stat(ejections, 1)
    reply = lab.post(chat("eject-model"))
    assert reply.status == 503
    assert reply.json()["error"]["code"] == "no_healthy_upstream"
    assert lab.upstream.count(FLAKY) == 3


def test_client_supplied_internal_headers_change_nothing(lab: Running) -> None:
    forged = {"x-meshgen-tenant": "team", "x-meshgen-route": "eject-model", "x-meshgen-model": "eject-model"}
    # dev may only use dev-model: claiming to be team, or re-routing itself, gets it nowhere.
    denied = lab.post(chat("failover-model"), key=DEV_KEY, headers=forged)
    assert denied.status == 403
    assert denied.json()["error"]["code"] == "model_not_allowed"
    served = lab.post(chat("dev-model"), key=DEV_KEY, headers=forged)
    assert served.status == 200
    assert served.headers["x-served-by"] == BACKUP
    (seen,) = lab.upstream.requests(BACKUP)
    assert not [h for h in seen.headers if h.startswith("x-meshgen-")]
    # eject-model is a downgrade target, so its header route exists: only the service may take it.
    rerouted = lab.post(chat("failover-model"), headers=forged)
    assert rerouted.headers["x-served-by"] == PRIMARY
    assert lab.upstream.count(FLAKY) == 0


def test_client_cannot_set_envoy_timeouts_or_retries(lab: Running) -> None:
    forged = {
        "x-envoy-upstream-rq-timeout-ms": "1",
        "x-envoy-max-retries": "5",
        "x-envoy-retry-on": "5xx",
        "x-envoy-hedge-on-per-try-timeout": "true",
        "x-envoy-force-trace": "1",
        "x-envoy-upstream-canary": "true",
        "x-envoy-original-path": "/admin",
    }
    slow = lab.post(chat("claude-model"), headers={**forged, "x-mock": "delay_ms=100"})
    assert slow.status == 200, "the client's 1 ms timeout must not apply"
    failing = lab.post(chat("retry-model"), headers={**forged, "x-mock": "status=500"})
    assert failing.status == 500
    assert lab.upstream.count(RETRIER) == 3, "2 retries from the policy, not the client's 5"
    leaked = {h for r in lab.upstream.requests() for h in r.headers if h in forged}
    assert not leaked


def test_tenant_rpm_gets_an_openai_429_with_rate_limit_headers(lab: Running) -> None:
    statuses = [lab.post(chat("dev-model"), key="sk-test-limited").status for _ in range(3)]
    assert statuses == [200, 200, 200]
    limited = lab.post(chat("dev-model"), key="sk-test-limited")
    assert limited.status == 429
    error = limited.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "requests per minute" in error["message"]
    assert limited.headers["x-ratelimit-limit-requests"] == "3"
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert lab.post(chat("dev-model"), key=DEV_KEY).status == 200, "another tenant's bucket is its own"


def test_admin_serves_prometheus_stats_on_loopback(lab: Running) -> None:
    assert lab.gw.ports.of("admin.us-east")
    text = lab.envoy.admin("/stats/prometheus")
    # Stat names use _ for the dots of our names, so each stays one whole Prometheus label.
    assert 'envoy_cluster_upstream_rq_total{envoy_cluster_name="provider_backup_us-east"}' in text
    assert 'envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix="gateway_us-east"}' in text


@pytest.mark.parametrize(
    ("body", "key", "status", "error_type", "code"),
    [
        (chat("gpt-4o"), None, 401, "authentication_error", "missing_api_key"),
        (chat("gpt-4o"), "sk-wrong", 401, "authentication_error", "invalid_api_key"),
        (b'{"model": "gpt-4o", ', "sk-test-team", 400, "invalid_request_error", "invalid_json"),
        ({"messages": []}, "sk-test-team", 400, "invalid_request_error", "missing_model"),
        (chat("gpt-5-ultra"), "sk-test-team", 404, "invalid_request_error", "model_not_found"),
        (chat("gpt-4o"), DEV_KEY, 403, "permission_error", "model_not_allowed"),
    ],
    ids=["no-key", "bad-key", "malformed-json", "no-model", "unknown-model", "model-not-allowed"],
)
def test_refusals_are_openai_errors(
    lab: Running, body: object, key: str | None, status: int, error_type: str, code: str
) -> None:
    reply = lab.post(body, key=key)  # type: ignore[arg-type]
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == (error_type, code)
    assert error["message"]
    assert lab.upstream.count() == 0
