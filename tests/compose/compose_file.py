"""Reading docker-compose.yml and the generated/compose/ configs it runs: shared by the file test and the up test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "COMPOSE_FILE",
    "ROOT",
    "addressed_upstreams",
    "bootstrap_ports",
    "envoy_bootstrap",
    "listen_ports",
    "load_compose",
    "mounts",
]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: not a mapping"
    return data


def mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(host path, container path) of every bind mount written ``./host:/container[:mode]``."""
    for volume in service.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        if source.startswith(("./", "/", "../")):
            yield source, rest.partition(":")[0]


def envoy_bootstrap(service: dict[str, Any]) -> Path | None:
    """The generated bootstrap an Envoy service mounts at the path its ``-c`` names."""
    command = [str(a) for a in service.get("command", [])]
    if "-c" not in command:
        return None
    config = command[command.index("-c") + 1]
    for source, target in mounts(service):
        if target == config:
            return (ROOT / source).resolve()
    return None


def listen_ports(service: dict[str, Any]) -> dict[int, str]:
    """Port → what listens there, from the command line (``--port``, ``--grpc-port``, ``--admin-port``, and the
    mocks' ``--listen LABEL=PORT``)."""
    command = [str(a) for a in service.get("command", [])]
    out: dict[int, str] = {}
    for flag, value in zip(command, command[1:], strict=False):
        if flag in {"--port", "--grpc-port", "--admin-port"}:
            out[int(value)] = flag
        elif flag == "--listen":
            label, _, port = value.rpartition("=")
            out[int(port)] = label
    return out


def _socket_ports(node: Any) -> Iterator[int]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "socket_address" and isinstance(value, dict):
                yield int(value["port_value"])
            else:
                yield from _socket_ports(value)
    elif isinstance(node, list):
        for item in node:
            yield from _socket_ports(item)


def bootstrap_ports(bootstrap: dict[str, Any]) -> set[int]:
    """Every port an Envoy bootstrap listens on: admin and listeners (gateway and chaos hops)."""
    ports = set(_socket_ports(bootstrap.get("admin", {})))
    for listener in bootstrap.get("static_resources", {}).get("listeners", []):
        ports.add(int(listener["address"]["socket_address"]["port_value"]))
    return ports


def addressed_upstreams(bootstrap: dict[str, Any]) -> dict[tuple[str, int], str]:
    """(DNS name, port) → endpoint name (or cluster name) of every plain-HTTP endpoint the bootstrap addresses by
    name: what Compose must serve. TLS endpoints are the real providers on the internet; IPs are loopback hops."""
    out: dict[tuple[str, int], str] = {}
    for cluster in bootstrap.get("static_resources", {}).get("clusters", []):
        if "transport_socket" in cluster:
            continue
        for locality in cluster.get("load_assignment", {}).get("endpoints", []):
            for lb_endpoint in locality.get("lb_endpoints", []):
                endpoint = lb_endpoint["endpoint"]
                address = endpoint["address"]["socket_address"]
                host = str(address["address"])
                if host.replace(".", "").isdigit():
                    continue
                meta = lb_endpoint.get("metadata", {}).get("filter_metadata", {}).get("meshgen", {})
                out[(host, int(address["port_value"]))] = str(meta.get("endpoint", cluster["name"]))
    return out
