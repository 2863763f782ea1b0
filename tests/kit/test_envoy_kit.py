"""The kit against the REAL Envoy: a hand-written bootstrap routes to mock providers, stats count them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import EnvoyError, EnvoyProcess, MockUpstream, envoy_validate, free_ports, require_binary
from tests.support.client import post

OPENAI = "provider.openai.us-east.ep0"
OLLAMA = "provider.ollama.us-east.ep0"
SHADOW = "provider.shadow.us-east.ep0"


def _cluster(name: str, port: int) -> dict[str, Any]:
    endpoint = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
    }


def bootstrap(listener_port: int, admin_port: int, upstream: Mapping[str, int]) -> dict[str, Any]:
    """Listener → route (x-target: ollama → ollama, else openai, mirrored to shadow when x-mirror: 1)."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "kit",
        "route_config": {
            "name": "kit",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "name": "model.ollama",
                            "match": {
                                "prefix": "/",
                                "headers": [{"name": "x-target", "string_match": {"exact": "ollama"}}],
                            },
                            "route": {"cluster": "provider.ollama.us-east", "timeout": "1s"},
                        },
                        {
                            "name": "model.mirrored",
                            "match": {"prefix": "/", "headers": [{"name": "x-mirror", "string_match": {"exact": "1"}}]},
                            "route": {
                                "cluster": "provider.openai.us-east",
                                "timeout": "1s",
                                "request_mirror_policies": [{"cluster": "provider.shadow.us-east"}],
                            },
                        },
                        {
                            "name": "model.openai",
                            "match": {"prefix": "/"},
                            "route": {"cluster": "provider.openai.us-east", "timeout": "1s"},
                        },
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        # runtime_modify needs an admin layer
        "layered_runtime": {"layers": [{"name": "admin", "admin_layer": {}}]},
        "static_resources": {
            "listeners": [
                {
                    "name": "kit",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener_port}},
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [
                _cluster("provider.openai.us-east", upstream[OPENAI]),
                _cluster("provider.ollama.us-east", upstream[OLLAMA]),
                _cluster("provider.shadow.us-east", upstream[SHADOW]),
            ],
        },
    }


@dataclass(frozen=True)
class Lab:
    envoy: EnvoyProcess
    up: MockUpstream
    port: int


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_binary("envoy")
    listener, admin, *up_ports = free_ports(5)
    labels = dict(zip([OPENAI, OLLAMA, SHADOW], up_ports, strict=False))
    config = tmp_path_factory.mktemp("kit") / "envoy.json"
    config.write_text(json.dumps(bootstrap(listener, admin, labels), indent=2))
    with MockUpstream(labels) as up, EnvoyProcess(config, admin) as envoy:
        yield Lab(envoy, up, listener)


@pytest.fixture
def kit(lab: Lab) -> Lab:
    lab.up.clear()
    lab.up.reset()
    return lab


def test_request_through_envoy_reaches_the_label(kit: Lab) -> None:
    r = post(kit.port, {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, {"x-tenant": "a"})
    assert r.status == 200
    assert r.headers["x-served-by"] == OPENAI
    assert r.json()["model"] == "gpt-4o"
    assert r.json()["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert kit.up.counts() == {OPENAI: 1, OLLAMA: 0, SHADOW: 0}
    (seen,) = kit.up.requests(OPENAI)
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.headers["x-tenant"] == "a"
    assert "x-request-id" in seen.headers  # added by Envoy: the request really went through it
    assert seen.json()["messages"][0]["content"] == "hi"


def test_header_route_lands_on_other_cluster(kit: Lab) -> None:
    r = post(kit.port, {"model": "llama3"}, {"x-target": "ollama"})
    assert (r.status, r.headers["x-served-by"]) == (200, OLLAMA)
    assert kit.up.counts() == {OPENAI: 0, OLLAMA: 1, SHADOW: 0}


def test_scoped_status_applies_only_to_its_label(kit: Lab) -> None:
    steer = {"x-mock": f"status=503@{OPENAI}"}
    r = post(kit.port, {"model": "gpt-4o"}, steer)
    assert r.status == 503
    assert r.json()["error"]["type"] == "server_error"
    ok = post(kit.port, {"model": "llama3"}, {**steer, "x-target": "ollama"})
    assert ok.status == 200


def test_programmatic_override_and_reset(kit: Lab) -> None:
    kit.up.set("provider.openai.*", status=429, headers={"retry-after": "1"})
    r = post(kit.port, {"model": "gpt-4o"})
    assert (r.status, r.headers["retry-after"]) == (429, "1")
    assert r.json()["error"]["type"] == "rate_limit_error"
    kit.up.reset()
    assert post(kit.port, {"model": "gpt-4o"}).status == 200


def test_delay_is_applied_and_route_timeout_cuts_it(kit: Lab) -> None:
    t0 = time.monotonic()
    assert post(kit.port, {"model": "gpt-4o"}, {"x-mock": "delay_ms=300"}).status == 200
    assert time.monotonic() - t0 >= 0.3
    timed_out = post(kit.port, {"model": "gpt-4o"}, {"x-mock": "delay_ms=1500"})
    assert timed_out.status == 504  # the route's 1 s timeout


def test_drop_looks_like_an_upstream_reset(kit: Lab) -> None:
    r = post(kit.port, {"model": "gpt-4o"}, {"x-mock": "drop=1"})
    assert r.status == 503
    assert kit.envoy.wait_stat("cluster.provider.openai.us-east.upstream_cx_destroy_remote", 1) >= 1


def test_upstream_rq_completed_counts(kit: Lab) -> None:
    name = "cluster.provider.ollama.us-east.upstream_rq_completed"
    before = kit.envoy.stat(name)
    for _ in range(3):
        assert post(kit.port, {"model": "llama3"}, {"x-target": "ollama"}).status == 200
    assert kit.envoy.wait_stat(name, before + 3) == before + 3
    assert kit.envoy.stats(prefix="cluster.provider.ollama.us-east.")[name] == before + 3
    assert "provider.ollama.us-east::127.0.0.1:" in kit.envoy.clusters()
    with pytest.raises(KeyError, match="upstream_rq_complete"):
        kit.envoy.stat("cluster.provider.ollama.us-east.upstream_rq_complete")


def test_mirror_leg_is_waited_for(kit: Lab) -> None:
    assert post(kit.port, {"model": "gpt-4o"}, {"x-mirror": "1"}).status == 200
    (shadow,) = kit.up.wait_for(SHADOW, 1, timeout=5)
    assert "-shadow" in shadow.headers["host"]  # Envoy suffixes the mirrored request's authority


def test_32_concurrent_requests_are_served_in_parallel(kit: Lab) -> None:
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        replies = list(pool.map(lambda _: post(kit.port, {"model": "gpt-4o"}, {"x-mock": "delay_ms=300"}), range(32)))
    elapsed = time.monotonic() - t0
    assert [r.status for r in replies] == [200] * 32
    assert kit.up.count(OPENAI) == 32
    assert elapsed < 0.3 * 4, f"32 requests of 300 ms took {elapsed:.2f}s: not concurrent"


def test_runtime_modify_sets_a_key(kit: Lab) -> None:
    kit.envoy.runtime_modify({"kit.test.flag": 42}, other_key=True)
    rt = kit.envoy.runtime()
    assert (rt["kit.test.flag"], rt["other_key"]) == ("42", "true")


def test_envoy_validate_accepts_good_and_rejects_bad(tmp_path: Path) -> None:
    require_binary("envoy")
    listener, admin, *ports = free_ports(5)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(bootstrap(listener, admin, dict(zip([OPENAI, OLLAMA, SHADOW], ports, strict=False)))))
    envoy_validate(good)

    broken = bootstrap(listener, admin, dict(zip([OPENAI, OLLAMA, SHADOW], ports, strict=False)))
    broken["static_resources"]["clusters"][0]["connect_timeout"] = "soon"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(broken))
    with pytest.raises(EnvoyError, match="connect_timeout|Duration|soon"):
        envoy_validate(bad)


def test_envoy_that_cannot_start_raises_with_log_tail(tmp_path: Path) -> None:
    require_binary("envoy")
    listener, admin, *ports = free_ports(5)
    broken = bootstrap(listener, admin, dict(zip([OPENAI, OLLAMA, SHADOW], ports, strict=False)))
    broken["static_resources"]["clusters"].append(broken["static_resources"]["clusters"][0])  # duplicate name
    config = tmp_path / "dup.json"
    config.write_text(json.dumps(broken))
    with pytest.raises(EnvoyError, match="before ready") as err:
        EnvoyProcess(config, admin, ready_timeout=10).start()
    assert "provider.openai.us-east" in str(err.value)
