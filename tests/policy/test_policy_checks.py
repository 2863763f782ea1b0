"""The cross-reference rules, called directly: pure functions of (policy, lines)."""

from __future__ import annotations

from typing import Any

import pytest

from meshgen.policy.checks import (
    CHECKS,
    check_failover_cycles,
    check_model_references,
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
