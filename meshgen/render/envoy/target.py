"""Where things are, per target: the only difference between `generated/compose/` and `generated/local/`."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from meshgen.ir import model as ir

COMPOSE_LISTENER_PORT = 10000
COMPOSE_ADMIN_PORT = 9901
COMPOSE_SERVICE = ("meshgen-service", 9000)
COMPOSE_SERVICE_GRPC = ("meshgen-service", 9001)
COMPOSE_CHAOS_PORT = 10100
LOOPBACK = "127.0.0.1"


class Target(enum.StrEnum):
    COMPOSE = "compose"
    """Service DNS names and fixed ports, one container per region."""
    LOCAL = "local"
    """Loopback addresses and the ports of `lab.base_port`, every region on this machine."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        return self.host.replace(".", "").isdigit()

    def socket(self) -> dict[str, Any]:
        return {"socket_address": {"address": self.host, "port_value": self.port}}


@dataclass(frozen=True)
class Placement:
    gw: ir.Gateway
    target: Target
    region: str

    def listener(self) -> Address:
        if self.target is Target.LOCAL:
            return Address(LOOPBACK, self.gw.ports.of(f"listener.{self.region}"))
        return Address("0.0.0.0", COMPOSE_LISTENER_PORT)

    def admin(self) -> Address:
        if self.target is Target.LOCAL:
            return Address(LOOPBACK, self.gw.ports.of(f"admin.{self.region}"))
        return Address(LOOPBACK, COMPOSE_ADMIN_PORT)

    def service(self) -> Address:
        if self.target is Target.LOCAL:
            return Address(LOOPBACK, self.gw.ports.of("service"))
        return Address(*COMPOSE_SERVICE)

    def service_grpc(self) -> Address:
        """The data-plane service's gRPC port (the access-log service), beside its ext_authz HTTP port."""
        if self.target is Target.LOCAL:
            return Address(LOOPBACK, self.gw.ports.of("service.grpc"))
        return Address(*COMPOSE_SERVICE_GRPC)

    def chaos_hop(self, cluster: ir.ProviderCluster) -> Address:
        if self.target is Target.LOCAL:
            return Address(LOOPBACK, self.gw.ports.of(f"chaos.{self.region}.{cluster.name}"))
        hops = [c.name for c in self.gw.clusters if c.faults]
        return Address(LOOPBACK, COMPOSE_CHAOS_PORT + hops.index(cluster.name))

    def endpoint(self, endpoint: ir.Endpoint) -> Address:
        if self.target is Target.LOCAL:
            return Address(LOOPBACK, self.gw.ports.of(endpoint.name))
        return Address(endpoint.host, endpoint.port)

    def tls(self, endpoint: ir.Endpoint) -> bool:
        """The local target talks to the lab's mock providers, which speak plain HTTP on loopback."""
        return endpoint.tls and self.target is Target.COMPOSE
