"""The cross-reference rules, called directly: pure functions of (policy, lines)."""

from __future__ import annotations

from typing import Any

import pytest

from meshgen.policy.checks import (
    CHECKS,
    check_chaos_regions,
    check_failover_cycles,
    check_hedge_timeouts,
    check_mixed_schemes,
    check_model_references,
    check_reserved_headers,
    run_checks,
)
from meshgen.policy.lines import LineIndex
from meshgen.policy.model import Policy

NO_FILE = LineIndex("policy.yaml")


def policy(models: dict[str, Any], **extra: Any) -> Policy:
    return Policy.model_validate(
        {
            "apiVersion": "meshgen/v1",
            "name": "p",
            "regions": {"us-east": {}},
            "providers": {"openai": {"schema": "openai", "endpoints": [{"url": "https://api.openai.com"}]}},
            "models": models,
            **extra,
        }
    )


def test_valid_policy_passes_every_check() -> None:
    p = policy({"a": {"provider": "openai", "failover": ["b"]}, "b": {"provider": "openai"}})
    assert run_checks(p, NO_FILE) == []


def test_every_check_is_named_for_its_rule() -> None:
    assert all(check.__name__.startswith("check_") for check in CHECKS)
    assert len({check.__name__ for check in CHECKS}) == len(CHECKS)


def test_model_reference_without_a_file() -> None:
    p = policy({"a": {"provider": "openai", "failover": ["bb"]}, "b": {"provider": "openai"}})
    (problem,) = check_model_references(p, NO_FILE)
    assert (problem.line, problem.yaml_path, problem.code) == (1, "models.a.failover[0]", "MG101")
    assert problem.hint == "did you mean 'b'?"


@pytest.mark.parametrize(
    ("failover", "cycles"),
    [
        ({"a": ["b"], "b": ["a"]}, ["failover cycle: a → b → a"]),
        ({"a": ["b"], "b": ["c"], "c": ["a"]}, ["failover cycle: a → b → c → a"]),
        ({"a": ["b", "c"], "b": ["c"], "c": []}, []),
        (
            {"a": ["b"], "b": ["a"], "c": ["d"], "d": ["c"]},
            ["failover cycle: a → b → a", "failover cycle: c → d → c"],
        ),
        ({"a": ["a"]}, []),
    ],
    ids=["two", "three", "diamond-no-cycle", "two-cycles", "self-is-mg105"],
)
def test_failover_cycles(failover: dict[str, list[str]], cycles: list[str]) -> None:
    p = policy({name: {"provider": "openai", "failover": targets} for name, targets in failover.items()})
    assert [problem.message for problem in check_failover_cycles(p, NO_FILE)] == cycles


def test_checks_are_pure() -> None:
    p = policy({"a": {"provider": "openai", "failover": ["b"]}, "b": {"provider": "openai", "failover": ["a"]}})
    before = p.model_dump()
    assert run_checks(p, NO_FILE) == run_checks(p, NO_FILE)
    assert p.model_dump() == before


def test_hedge_timeout_falls_back_to_provider_then_defaults() -> None:
    p = policy(
        {
            "a": {"provider": "openai", "hedge": {"after": "30s"}},
            "b": {"provider": "openai", "timeout": "40s", "hedge": {"after": "30s"}},
            "c": {"provider": "nowhere", "hedge": {"after": "1h"}},
        },
        provider_defaults={"timeout": "30s"},
    )
    assert [(x.yaml_path, x.code) for x in check_hedge_timeouts(p, NO_FILE)] == [("models.a.hedge.after", "MG110")]


def test_reserved_header_prefixes_any_case() -> None:
    p = policy({"a": {"provider": "openai", "affinity": {"header": "X-Envoy-Original-Path"}}})
    (problem,) = check_reserved_headers(p, NO_FILE)
    assert problem.code == "MG401"
    p = policy({"a": {"provider": "openai", "affinity": {"header": "x-meshgenerator"}}})
    assert check_reserved_headers(p, NO_FILE) == []


def test_chaos_region_with_an_endpoint_passes() -> None:
    fault = {"target": {"provider": "openai", "region": "us-east"}, "abort": 503}
    p = policy({"a": {"provider": "openai"}}, chaos={"f": fault})
    (problem,) = check_chaos_regions(p, NO_FILE)  # the endpoint has no region: the fault hits nothing
    assert problem.code == "MG312"
    p.providers["openai"].endpoints[0].region = "us-east"
    assert check_chaos_regions(p, NO_FILE) == []


def test_same_scheme_in_different_regions_is_fine() -> None:
    endpoints = [{"url": "http://a:1", "region": "us-east"}, {"url": "https://b"}]
    p = policy({"a": {"provider": "o"}}, providers={"o": {"schema": "openai", "endpoints": endpoints}})
    assert check_mixed_schemes(p, NO_FILE) == []
