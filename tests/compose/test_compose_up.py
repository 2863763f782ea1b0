"""`docker-compose up` of the repo's docker-compose.yml, for real, in a private Docker engine (about 2 minutes).

No registry here, so a small override file (written by this test) swaps in local images built from the repo's
Dockerfiles on a debootstrap'd Debian (engine.py) and puts every container on the host's network
(``network_mode: host``, ``extra_hosts`` mapping the service names to 127.0.0.1; the engine has no bridge).
Everything else — commands, mounts of generated/compose/, health checks, restart policies — is the file users run.
Published ``ports`` are the one thing dropped: Docker refuses them with host networking, where the containers'
own ports are the host's.

On the host's network, containers whose ports collide cannot run side by side: generated/compose/ gives every
region's Envoy the same ports (10000, admin 9901, chaos hops 101xx) and both Ollama mocks 11434, so the test runs
the services whose ports are disjoint, in file order (today: the data-plane service, ollama-east, envoy-us-east;
ollama-west's name then maps to ollama-east's mock) and says which it left out; the other regions' Envoys then run
each in turn, alone. Those ports must be free here.

It proves: a chat completion through Envoy + the data-plane service + the mock in containers gets 200 and its
tokens are counted (the service's /metrics); the service killed as a crash is (SIGKILL to its process: Docker
treats `docker kill` as a manual stop, which no restart policy undoes) comes back by its restart policy, serves
again and still has its ledger (the `ledger` volume); every region's Envoy gets healthy in its container and
answers (its tokens counted when it takes the lab's API key); `down -v` leaves no container, volume or network of
the project.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.compose.compose_file import COMPOSE_FILE, bootstrap_ports, envoy_bootstrap, listen_ports, load_compose
from tests.compose.engine import BASE_IMAGE, Dockerd, base_rootfs, download_wheels, envoy_context, serve_directory
from tests.support.tools import require_binary

pytestmark = pytest.mark.slow

ENVOY_IMAGE = "meshgen-test/envoy:dev"
ENVOY_DOCKERFILE = Path(__file__).with_name("envoy.Dockerfile")
# policies/lab.yaml: the lab's key of tenant dev-team, which may use llama3 (served by the Ollama mocks)
API_KEY = "sk-lab-dev"
MODEL = "llama3"
TENANT = "dev-team"


def _local_image(name: str, service: dict[str, Any]) -> str:
    if name.startswith("envoy-"):
        return ENVOY_IMAGE
    return "meshgen-test/" + str(service["image"]).split("/", 1)[-1]


def local_override(compose: dict[str, Any], wheels_url: str) -> dict[str, Any]:
    """Local images, built offline; every container on the host's network, the service names on loopback."""
    hosts = [f"{name}:127.0.0.1" for name in compose["services"]]
    services: dict[str, Any] = {}
    for name, service in compose["services"].items():
        services[name] = {"image": _local_image(name, service), "network_mode": "host", "extra_hosts": hosts}
        if "build" in service:
            args = {"BASE_IMAGE": BASE_IMAGE, "PIP_INSTALL_ARGS": f"--no-index --find-links={wheels_url}"}
            services[name]["build"] = {"network": "host", "args": args}
    return {"services": services}


def service_ports(name: str, service: dict[str, Any]) -> set[int]:
    bootstrap = envoy_bootstrap(service)
    if bootstrap is not None:
        return bootstrap_ports(yaml.safe_load(bootstrap.read_text()))
    return set(listen_ports(service))


def host_network_plan(compose: dict[str, Any]) -> tuple[dict[str, set[int]], dict[str, str]]:
    """Services that fit side by side on one network namespace (others before Envoys, file order), and why the
    rest were left out."""
    services = compose["services"]
    # Services behind a profile (the OTLP collector) are not started by a plain `up`, nor here.
    order = sorted((n for n in services if not services[n].get("profiles")), key=lambda n: n.startswith("envoy-"))
    chosen: dict[str, set[int]] = {}
    left_out: dict[str, str] = {}
    for name in order:
        ports = service_ports(name, services[name])
        clash = {other: sorted(ports & taken) for other, taken in chosen.items() if ports & taken}
        if clash:
            left_out[name] = f"ports {clash} taken by {', '.join(clash)}"
        else:
            chosen[name] = ports
    return chosen, left_out


def _busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a listener, not a past run's TIME_WAIT, is busy
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _request(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json", "authorization": f"Bearer {API_KEY}"} if body else {}
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()
    except OSError as error:  # connection refused/reset while a container restarts
        return 0, {}, str(error).encode()


def _chat(gateway: str) -> tuple[int, dict[str, str], bytes]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello from compose"}]}
    return _request(f"{gateway}/v1/chat/completions", body)


def _tokens(metrics_url: str) -> dict[str, float]:
    """meshgen_tokens_total of the test's tenant and model, by type."""
    status, _, text = _request(metrics_url)
    assert status == 200, text
    pattern = re.compile(r"^meshgen_tokens_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.MULTILINE)
    out: dict[str, float] = {}
    for match in pattern.finditer(text.decode()):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels.get("tenant") == TENANT and labels.get("model") == MODEL:
            out[labels["type"]] = out.get(labels["type"], 0.0) + float(match["value"])
    return out


def _budget_used(metrics_url: str) -> float | None:
    """meshgen_budget_used_ratio of the test's tenant: the ledger's day total over its daily limit."""
    status, _, text = _request(metrics_url)
    assert status == 200, text
    match = re.search(rf'^meshgen_budget_used_ratio\{{tenant="{TENANT}"\}} (\S+)$', text.decode(), re.MULTILINE)
    return float(match[1]) if match else None


def _eventually(what: str, check: Any, timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})")


@pytest.fixture
def engine() -> Iterator[Dockerd]:
    dockerd = require_binary("dockerd")
    docker = require_binary("docker")
    root = Path(tempfile.mkdtemp(prefix="mgd-", dir="/tmp"))  # short: containerd's socket paths
    with Dockerd(dockerd, docker, root) as running:
        yield running


def test_compose_up_serves_counts_restarts_and_down_cleans(engine: Dockerd, tmp_path: Path) -> None:
    compose_bin = require_binary("docker-compose")
    debootstrap = require_binary("debootstrap")
    compose = load_compose()
    chosen, left_out = host_network_plan(compose)
    print(f"host networking runs {sorted(chosen)}; left out: {left_out}")
    busy = sorted(p for ports in chosen.values() for p in ports if _busy(p))
    assert not busy, f"ports {busy} are in use on this machine; docker-compose.yml's services need them"
    envoys = [name for name in chosen if name.startswith("envoy-")]
    assert envoys and "meshgen-service" in chosen, f"nothing to run: {left_out}"

    project = f"meshgen-compose-{os.getpid()}"
    engine.run("import", str(base_rootfs(debootstrap)), BASE_IMAGE, timeout=180)
    engine.run("build", "-q", "--network=host", f"--build-arg=BASE_IMAGE={BASE_IMAGE}", "-t", ENVOY_IMAGE,
               "-f", str(ENVOY_DOCKERFILE), str(envoy_context(tmp_path / "envoy")), timeout=180)  # fmt: skip
    download_wheels(tmp_path / "wheels")
    with serve_directory(tmp_path / "wheels") as wheels_url:
        override = tmp_path / "docker-compose.local.yml"
        override.write_text(yaml.safe_dump(local_override(compose, wheels_url), sort_keys=False))
        built = sorted({_local_image(n, s): n for n, s in compose["services"].items() if "build" in s}.values())
        engine.compose(compose_bin, project, [COMPOSE_FILE, override], "build", *built, timeout=600)
        merged = yaml.safe_load(engine.compose(compose_bin, project, [COMPOSE_FILE, override], "config").stdout)
    for service in merged["services"].values():
        service.pop("ports", None)  # published ports are refused with network_mode: host
    run_file = tmp_path / "docker-compose.run.yml"
    run_file.write_text(yaml.safe_dump(merged, sort_keys=False))

    def compose_cmd(*args: str, timeout: float = 180.0) -> str:
        return engine.compose(compose_bin, project, [run_file], *args, timeout=timeout).stdout

    def container(service: str) -> str:
        return compose_cmd("ps", "-q", service).strip()

    def inspect(service: str) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(engine.run("inspect", container(service)).stdout)[0]
        return state

    def healthy(*names: str) -> list[str]:
        states = {name: inspect(name)["State"].get("Health", {}).get("Status") for name in names}
        return [] if any(s != "healthy" for s in states.values()) else sorted(states)

    def gateway_of(envoy: str) -> str:
        bootstrap = yaml.safe_load(envoy_bootstrap(compose["services"][envoy]).read_text())  # type: ignore[union-attr]
        port = next(
            listener["address"]["socket_address"]["port_value"]
            for listener in bootstrap["static_resources"]["listeners"]
            if listener["name"].startswith("gateway.")
        )
        return f"http://127.0.0.1:{port}"

    try:
        compose_cmd("up", "-d", *chosen)
        _eventually("every container healthy", lambda: healthy(*chosen), timeout=90)
        for name in chosen:
            assert inspect(name)["HostConfig"]["NetworkMode"] == "host", name
            assert inspect(name)["NetworkSettings"]["Networks"].keys() == {"host"}, f"{name} got another network"

        gateway = gateway_of(envoys[0])
        service_port = next(
            p for p, flag in listen_ports(compose["services"]["meshgen-service"]).items() if flag == "--port"
        )
        metrics = f"http://127.0.0.1:{service_port}/metrics"

        status, headers, body = _chat(gateway)
        assert status == 200, body
        usage = json.loads(body)["usage"]
        assert headers.get("x-served-by", "").startswith("provider.ollama."), headers
        want = {"input": float(usage["prompt_tokens"]), "output": float(usage["completion_tokens"])}
        _eventually("tokens counted by the service", lambda: _tokens(metrics) == want, timeout=15)
        used_before = _budget_used(metrics)
        assert used_before, "the tenant's day budget shows no use"

        # a crash, as Docker sees one: the service's process dies by SIGKILL (from this host's pid namespace)
        before = inspect("meshgen-service")
        os.kill(before["State"]["Pid"], signal.SIGKILL)
        _eventually(
            "restart policy restarts the killed service",
            lambda: (
                inspect("meshgen-service")["RestartCount"] > before["RestartCount"]
                and inspect("meshgen-service")["State"]["Pid"] not in (0, before["State"]["Pid"])
            ),
            timeout=30,
        )
        status, _, body = _eventually("a 200 after the restart", lambda: (r := _chat(gateway))[0] == 200 and r, 60)
        usage = json.loads(body)["usage"]
        want = {"input": float(usage["prompt_tokens"]), "output": float(usage["completion_tokens"])}
        _eventually("the restarted service counts tokens", lambda: _tokens(metrics) == want, timeout=15)
        # the ledger lives in the `ledger` volume: the restarted service still knows the first request's tokens
        assert _budget_used(metrics) == pytest.approx(2 * used_before), "the ledger did not survive the restart"

        # the other regions' Envoys need the same ports on the host's network: each in turn, alone
        compose_cmd("stop", "-t", "5", *envoys)
        for envoy in (name for name in left_out if name.startswith("envoy-")):
            compose_cmd("up", "-d", "--no-deps", envoy)
            _eventually(f"{envoy} healthy", lambda: healthy(envoy), timeout=60)  # noqa: B023 (called at once)
            before_tokens = _tokens(metrics)
            status, headers, body = _chat(gateway_of(envoy))
            assert headers.get("server") == "envoy", (envoy, status, body)
            if status == 200:  # api-key regions; JWT and mTLS regions answer 401/403 to a bare key
                usage = json.loads(body)["usage"]
                want = {
                    "input": before_tokens.get("input", 0.0) + usage["prompt_tokens"],
                    "output": before_tokens.get("output", 0.0) + usage["completion_tokens"],
                }
                _eventually(f"tokens through {envoy} counted", lambda: _tokens(metrics) == want, timeout=15)  # noqa: B023
            print(f"{envoy}: healthy, chat completion {status}")
            compose_cmd("stop", "-t", "5", envoy)
    except BaseException:
        print(engine.compose(compose_bin, project, [run_file], "logs", "--tail=40", check=False).stdout)
        raise
    finally:
        engine.compose(compose_bin, project, [run_file], "down", "-v", "--remove-orphans", "-t", "5", check=False)

    label = f"label=com.docker.compose.project={project}"
    assert engine.run("ps", "-aq", "--filter", label).stdout.split() == []
    assert engine.run("volume", "ls", "-q", "--filter", label).stdout.split() == []
    assert engine.run("network", "ls", "-q", "--filter", label).stdout.split() == []
