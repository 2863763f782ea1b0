"""The service.json contract: what loads, and the exact message for what does not."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from ext_proc.config import ConfigError, Limits, ServiceConfig, load_config
from tests.ext_proc.kit import config_dict, sha256_hex, write_config

Edit = Callable[[dict[str, Any]], None]


def test_loads_the_documented_example(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    assert config.policy == "ai-chaos-lab"
    assert config.failure_mode == "closed"
    team_a = config.tenants["team-a"]
    assert team_a.models == ("gpt-4o", "gpt-4o-mini")
    assert team_a.limits == Limits(rpm=600, tpm=100000, tpd=None, usd_per_day=50.0)
    assert team_a.non_critical is not None and team_a.non_critical.queue_max_wait_ms == 20000
    assert config.models["gpt-4o"].price is not None and config.models["gpt-4o"].price.output_per_mtok == 10.0
    assert config.models["llama3"].price is None and config.models["llama3"].downgrade is None
    assert config.tenants["team-b"].limits == Limits()
    assert config.max_request_bytes == 8 * 1024 * 1024  # absent: Envoy's ext_authz cap


def test_max_request_bytes(tmp_path: Path) -> None:
    doc = config_dict()
    doc["max_request_bytes"] = 1024
    assert load_config(write_config(tmp_path, doc)).max_request_bytes == 1024


def test_round_trips_and_is_frozen(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    again = ServiceConfig.model_validate_json(config.model_dump_json())
    assert again == config
    with pytest.raises(ValidationError):
        config.policy = "other"  # type: ignore[misc]


def _set(path: str, value: Any) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


def _delete(key: str) -> Edit:
    return lambda doc: doc.pop(key)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _set("schema_version", 2),
            "schema_version is 2, this service reads schema_version 1; "
            "rebuild the config with a meshgen that matches this service",
        ),
        (_set("schema_version", "1"), "schema_version is '1', this service reads schema_version 1;"),
        (_delete("schema_version"), "schema_version is missing; this service reads schema_version 1"),
        (_set("surprise", True), "invalid config:\n  surprise: Extra inputs are not permitted"),
        (
            _set("failure_mode", "maybe"),
            "invalid config:\n  failure_mode: Input should be 'open' or 'closed'",
        ),
        (
            _set("tenants/team-a/key_hashes/1", "ABC"),
            "invalid config:\n  tenants.team-a.key_hashes[1]: String should match pattern '^[0-9a-f]{64}$'",
        ),
        (
            _set("tenants/team-a/limits/rpm", 0),
            "invalid config:\n  tenants.team-a.limits.rpm: Input should be greater than or equal to 1",
        ),
        (
            _set("tenants/team a", {"key_hashes": [sha256_hex("k")], "models": []}),
            "invalid config:\n  tenants.team a (the name): String should match pattern",
        ),
        (
            _set("models/gpt-4o/max_tokens_default", None),
            "invalid config:\n  models.gpt-4o.max_tokens_default: Input should be a valid integer",
        ),
        (
            _set("tenants/team-a/models/1", "gpt-5"),
            "invalid config:\n  tenants.team-a.models[1]: unknown model 'gpt-5'",
        ),
        (
            _set("models/gpt-4o/downgrade", "gpt-3"),
            "invalid config:\n  models.gpt-4o.downgrade: unknown model 'gpt-3'",
        ),
        (
            _set("max_request_bytes", 1023),
            "invalid config:\n  max_request_bytes: Input should be greater than or equal to 1024",
        ),
        (
            _set("max_request_bytes", 8 * 1024 * 1024 + 1),
            "invalid config:\n  max_request_bytes: Input should be less than or equal to 8388608",
        ),
        (
            _set("tenants/team-b/key_hashes", [sha256_hex("x"), sha256_hex("sk-team-a-second-key")]),
            "invalid config:\n  tenants.team-b.key_hashes[1]: key hash already used by tenant 'team-a'",
        ),
    ],
    ids=[
        "schema-version-2",
        "schema-version-string",
        "schema-version-missing",
        "extra-field",
        "failure-mode",
        "key-hash-not-hex",
        "rpm-zero",
        "tenant-name",
        "max-tokens-null",
        "tenant-unknown-model",
        "downgrade-unknown-model",
        "max-request-bytes-too-small",
        "max-request-bytes-too-large",
        "key-shared-by-tenants",
    ],
)
def test_invalid_config_message(tmp_path: Path, edit: Edit, message: str) -> None:
    doc = config_dict()
    edit(doc)
    path = write_config(tmp_path, doc)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: {message}")


def test_every_problem_is_reported(tmp_path: Path) -> None:
    doc = config_dict()
    doc["tenants"]["team-a"]["models"].append("nope")
    doc["models"]["gpt-4o"]["downgrade"] = "zz"
    path = write_config(tmp_path, doc)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (
        f"{path}: invalid config:\n"
        "  models.gpt-4o.downgrade: unknown model 'zz'\n"
        "  tenants.team-a.models[2]: unknown model 'nope'"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "{bad",
            "not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        ("[1]", "the top level must be a JSON object, not list"),
        ("", "not valid JSON: Expecting value: line 1 column 1 (char 0)"),
    ],
    ids=["bad-json", "array", "empty"],
)
def test_unparsable_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "service.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: {message}"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: cannot read the config file: No such file or directory"


def test_schema_has_version_one() -> None:
    schema = ServiceConfig.model_json_schema()
    assert schema["properties"]["schema_version"]["const"] == 1
    assert schema["additionalProperties"] is False
    assert json.dumps(schema)  # serialisable for `meshgen schema`
