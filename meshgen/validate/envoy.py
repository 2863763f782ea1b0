"""Checks a bootstrap twice: strictly against Envoy's protos, then with the real `envoy --mode validate`."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from meshgen.errors import RenderError

# Every typed_config we emit must be registered in the proto pool before ParseDict can check it.
_EXTENSION_MODULES = (
    "envoy.config.bootstrap.v3.bootstrap_pb2",
    "envoy.config.trace.v3.opentelemetry_pb2",
    "envoy.extensions.access_loggers.grpc.v3.als_pb2",
    "envoy.extensions.access_loggers.stream.v3.stream_pb2",
    "envoy.extensions.clusters.aggregate.v3.cluster_pb2",
    "envoy.extensions.filters.http.ext_authz.v3.ext_authz_pb2",
    "envoy.extensions.filters.http.ext_proc.v3.ext_proc_pb2",
    "envoy.extensions.filters.http.fault.v3.fault_pb2",
    "envoy.extensions.filters.http.json_to_metadata.v3.json_to_metadata_pb2",
    "envoy.extensions.filters.http.local_ratelimit.v3.local_rate_limit_pb2",
    "envoy.extensions.filters.http.lua.v3.lua_pb2",
    "envoy.extensions.filters.http.rbac.v3.rbac_pb2",
    "envoy.extensions.filters.http.router.v3.router_pb2",
    "envoy.extensions.filters.http.upstream_codec.v3.upstream_codec_pb2",
    "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    "envoy.extensions.http.early_header_mutation.header_mutation.v3.header_mutation_pb2",
    "envoy.extensions.resource_monitors.downstream_connections.v3.downstream_connections_pb2",
    "envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2",
    "envoy.extensions.retry.priority.previous_priorities.v3.previous_priorities_config_pb2",
    "envoy.extensions.transport_sockets.tls.v3.tls_pb2",
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
)


def parse_bootstrap(data: dict[str, Any]) -> None:
    """Raise RenderError unless `data` parses into envoy.config.bootstrap.v3.Bootstrap (unknown fields refused)."""
    from google.protobuf import json_format

    modules = [importlib.import_module(m) for m in _EXTENSION_MODULES]
    try:
        json_format.ParseDict(data, modules[0].Bootstrap())
    except json_format.ParseError as error:
        raise RenderError(f"bootstrap does not parse as Envoy's proto: {error}") from error


def envoy_binary() -> str | None:
    beside = Path(sys.executable).with_name("envoy")
    return str(beside) if beside.exists() else shutil.which("envoy")


def envoy_validate(config: Path, *, binary: str) -> None:
    """`envoy --mode validate`; deprecated fields count as failures, since the next Envoy may drop them."""
    result = subprocess.run(
        [binary, "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0 or "Deprecated field" in output:
        raise RenderError(f"envoy rejected {config}:\n{output[-3000:]}")
