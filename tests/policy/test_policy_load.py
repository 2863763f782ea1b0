"""Loading: valid policies load, line numbers are right, every error is a Problem in the one format."""

from __future__ import annotations

from pathlib import Path

import pytest

import meshgen.policy
from meshgen.errors import MeshgenError, OutputDriftError, PolicyError, Problem, RenderError
from meshgen.policy import Policy, load_policy, load_policy_text
from meshgen.policy.checks import did_you_mean
from meshgen.policy.lines import format_path
from meshgen.policy.load import _parse
from meshgen.policy.model import parse_duration

ROOT = Path(__file__).resolve().parents[2]
KEY_A = "sha256:" + "a" * 64

MINIMAL = """\
apiVersion: meshgen/v1
name: minimal
regions:
  us-east: {}
providers:
  openai:
    schema: openai
    endpoints: [{url: "https://api.openai.com"}]
models:
  gpt-4o:
    provider: openai
"""

FULL = f"""\
apiVersion: meshgen/v1
name: small-lab
regions:
  us-east: {{auth: api-key}}
  us-west: {{auth: jwt, jwt: {{issuer: "https://auth.lab.local", audiences: [lab]}}}}
providers:
  openai:
    schema: openai
    endpoints:
      - {{url: "https://api.openai.com", region: us-east}}
      - {{url: "http://localhost:8080", region: us-west, weight: 2}}
    timeout: 1m
  anthropic: {{schema: anthropic, endpoints: [{{url: "https://api.anthropic.com"}}]}}
models:
  gpt-4o:
    provider: openai
    failover: [claude-sonnet, gpt-4o-mini]
    hedge: {{after: 1500ms}}
    canary: {{model: gpt-4o-mini, weight: 5}}
    downgrade: gpt-4o-mini
    price: {{input_per_mtok: 2.5, output_per_mtok: 10}}
  gpt-4o-mini:
    provider: openai
    price: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}
  claude-sonnet: {{provider: anthropic, failover: [gpt-4o-mini]}}
tenants:
  team-a:
    keys: ["{KEY_A}"]
    models: [gpt-4o, claude-sonnet]
    limits: {{rpm: 600}}
chaos:
  openai-slow: {{target: {{provider: openai, region: us-east}}, delay: 5s}}
slos:
  chat: {{objective: 99.5, window: 30d}}
"""


def problems_of(text: str, filename: str = "p.yaml") -> list[Problem]:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, filename)
    return list(caught.value.problems)


def test_public_surface() -> None:
    assert sorted(meshgen.policy.__all__) == ["Policy", "load_policy", "load_policy_text"]


def test_minimal_policy_loads() -> None:
    policy = load_policy_text(MINIMAL, "minimal.yaml")
    assert isinstance(policy, Policy)
    assert policy.api_version == "meshgen/v1"
    assert policy.providers["openai"].schema_ == "openai"
    assert policy.models["gpt-4o"].provider == "openai"
    assert policy.regions["us-east"].auth == "api-key"
    assert policy.tenants == {}


def test_full_policy_loads() -> None:
    policy = load_policy_text(FULL, "full.yaml")
    assert policy.models["gpt-4o"].failover == ["claude-sonnet", "gpt-4o-mini"]
    assert policy.models["gpt-4o"].hedge is not None and policy.models["gpt-4o"].hedge.after == 1500
    assert policy.providers["openai"].timeout == 60_000
    assert policy.slos["chat"].window == 30 * 86_400_000


def test_load_policy_from_path(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    assert load_policy(path).name == "minimal"


def test_lab_policy_loads() -> None:
    lab = ROOT / "policies" / "lab.yaml"
    if not lab.exists():
        pytest.skip("policies/lab.yaml not present")
    assert load_policy(lab).name


def test_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path / "nope.yaml")
    (problem,) = caught.value.problems
    assert problem.code == "MG004"
    assert problem.file == str(tmp_path / "nope.yaml")


# --- line index ----------


def test_line_index_of_keys_and_items() -> None:
    _, lines, problems = _parse(FULL, "full.yaml")
    assert problems == []
    index = lines.as_dict()
    assert index["apiVersion"] == 1
    assert index["providers.openai.endpoints"] == 9
    assert index["providers.openai.endpoints[1]"] == 11
    assert index["providers.openai.endpoints[1].region"] == 11
    assert index["models.gpt-4o.failover[1]"] == 17
    assert index["tenants.team-a.keys[0]"] == 28
    assert lines.children(("models",)) == ("gpt-4o", "gpt-4o-mini", "claude-sonnet")


def test_line_of_missing_path_is_its_deepest_ancestor() -> None:
    _, lines, _ = _parse(FULL, "full.yaml")
    assert lines.line(("models", "gpt-4o", "mirror", "model")) == 15
    assert lines.line(("nowhere",)) == 1
    assert lines.line(()) == 1


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        (("models", "gpt-4o", "failover", 1), "models.gpt-4o.failover[1]"),
        (("tenants", "team-a", "keys", 0), "tenants.team-a.keys[0]"),
        (("providers", "openai", "endpoints"), "providers.openai.endpoints"),
        ((), "(root)"),
    ],
    ids=["failover-item", "key-item", "field", "root"],
)
def test_format_path(path: tuple[str | int, ...], shown: str) -> None:
    assert format_path(path) == shown


def test_merge_keys_are_not_duplicates() -> None:
    text = MINIMAL + "  gpt-4o-mini:\n    <<: {provider: openai}\n    provider: openai\n"
    assert set(load_policy_text(text, "m.yaml").models) == {"gpt-4o", "gpt-4o-mini"}


# --- problems ----------


def test_problem_str_with_and_without_hint() -> None:
    problem = Problem("p.yaml", 14, "models.a.failover[1]", "unknown model 'b'", "did you mean 'c'?", "MG101")
    assert str(problem) == "p.yaml:14: models.a.failover[1]: unknown model 'b' (did you mean 'c'?) [MG101]"
    plain = Problem("p.yaml", 3, "name", "bad", None, "MG012")
    assert str(plain) == "p.yaml:3: name: bad [MG012]"


def test_every_problem_in_one_run_sorted_by_line() -> None:
    text = MINIMAL.replace("  gpt-4o:\n    provider: openai\n", "  gpt-4o:\n    provider: opnai\n    fallover: []\n")
    text = text.replace("name: minimal", "name: minimal\nlab: {base_port: 80}")
    problems = problems_of(text)
    assert [p.code for p in problems] == ["MG015", "MG102", "MG010"]
    assert [p.line for p in problems] == sorted(p.line for p in problems)


def test_plaintext_key_is_never_echoed() -> None:
    text = MINIMAL + "tenants:\n  t:\n    keys: [sk-very-secret]\n    models: [gpt-4o]\n"
    text += "  u:\n    keys: sk-also-secret\n    models: [gpt-4o]\n"
    problems = problems_of(text)
    assert [p.code for p in problems] == ["MG014", "MG012"]
    assert "secret" not in "\n".join(map(str, problems))


def test_unknown_field_with_alias_suggests_the_alias() -> None:
    text = MINIMAL.replace("    schema: openai", "    shema: openai")
    problems = problems_of(text)
    assert [(p.yaml_path, p.code) for p in problems] == [
        ("providers.openai", "MG011"),
        ("providers.openai.shema", "MG010"),
    ]
    assert problems[1].hint == "did you mean 'schema'?"


# --- errors ----------


def test_exit_codes() -> None:
    assert PolicyError.exit_code == 1
    assert OutputDriftError.exit_code == 3
    assert RenderError.exit_code == 70
    for cls in (PolicyError, OutputDriftError, RenderError):
        assert issubclass(cls, MeshgenError)


def test_policy_error_needs_problems() -> None:
    with pytest.raises(ValueError):
        PolicyError([])


def test_output_drift_lists_paths() -> None:
    err = OutputDriftError(["b/x.yaml", Path("a/y.yaml")], root="generated")
    assert err.paths == ("a/y.yaml", "b/x.yaml")
    assert "a/y.yaml" in str(err) and "generated/" in str(err)


def test_render_error_context() -> None:
    err = RenderError("duplicate cluster name", target="envoy", path="compose/envoy.yaml")
    assert (err.target, err.path) == ("envoy", "compose/envoy.yaml")
    assert str(err).startswith("envoy: compose/envoy.yaml: duplicate cluster name")


# --- helpers ----------


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("250ms", 250),
        ("5s", 5000),
        ("1.5s", 1500),
        ("2m", 120_000),
        ("1h", 3_600_000),
        ("30d", 2_592_000_000),
    ],
    ids=["ms", "s", "fractional-s", "m", "h", "d"],
)
def test_parse_duration(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize(
    "value",
    ["5 seconds", "5", 5, "0s", "-1s", "0.5ms", "", "5S", None],
    ids=["words", "bare-string", "bare-int", "zero", "negative", "sub-ms", "empty", "upper-unit", "none"],
)
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("word", "choices", "hint"),
    [
        ("claude-sonet", ["gpt-4o", "claude-sonnet"], "did you mean 'claude-sonnet'?"),
        ("failovr", ["provider", "failover", "hedge"], "did you mean 'failover'?"),
        ("us-est", ["us-east", "us-west"], "did you mean 'us-east'?"),
        ("zzz", ["gpt-4o", "claude-sonnet"], None),
        ("gpt-4o", [], None),
    ],
    ids=["typo", "field", "tie-goes-to-first", "nothing-close", "no-choices"],
)
def test_did_you_mean(word: str, choices: list[str], hint: str | None) -> None:
    assert did_you_mean(word, choices) == hint


def test_numeric_key_is_shown_as_a_key() -> None:
    (problem,) = problems_of(MINIMAL.replace("us-east: {}", "1: {}"))
    assert (problem.line, problem.yaml_path, problem.code) == (4, "regions.1", "MG017")


def test_more_than_one_document() -> None:
    (problem,) = problems_of(MINIMAL + "---\nname: other\n")
    assert (problem.line, problem.code) == (12, "MG001")


def test_broken_entry_still_counts_as_defined() -> None:
    text = MINIMAL + "  gpt-4o-mini:\n    provider: openai\n    retry: {attempts: lots}\n"
    text = text.replace("    provider: openai\n", "    provider: openai\n    failover: [gpt-4o-mini]\n", 1)
    assert [p.code for p in problems_of(text)] == ["MG012"]


def test_numeric_canary_header_is_a_header_problem() -> None:
    text = MINIMAL + "    canary: {model: gpt-4o, header: {5: beta}}\n"
    problems = problems_of(text)
    assert ("models.gpt-4o.canary.header.5", "MG018") in [(p.yaml_path, p.code) for p in problems]


def test_provider_overrides_keep_the_fields_they_set() -> None:
    text = MINIMAL.replace(
        '    endpoints: [{url: "https://api.openai.com"}]\n',
        '    endpoints: [{url: "https://api.openai.com"}]\n'
        "    outlier: {consecutive_5xx: 2}\n    circuit_breakers: {max_retries: 8}\n",
    )
    text = text.replace("providers:", "provider_defaults: {outlier: {ejection: 1m}}\nproviders:")
    p = load_policy_text(text, "p.yaml")
    defaults, override = p.provider_defaults, p.providers["openai"]
    assert override.outlier is not None and override.circuit_breakers is not None
    assert override.outlier.model_fields_set == {"consecutive_5xx"}
    assert override.circuit_breakers.model_fields_set == {"max_retries"}
    merged = defaults.outlier.model_copy(update=override.outlier.model_dump(exclude_unset=True))
    assert (merged.consecutive_5xx, merged.ejection) == (2, 60_000)
    breakers = defaults.circuit_breakers.model_copy(update=override.circuit_breakers.model_dump(exclude_unset=True))
    assert (breakers.max_retries, breakers.max_requests) == (8, 1024)
    assert load_policy_text(MINIMAL, "p.yaml").provider_defaults.circuit_breakers.max_retries == 1024
