"""Test kit: real Envoy, mock LLM providers, free ports, required programs.

Import from here: ``from tests.support import EnvoyProcess, MockUpstream, free_ports, require_binary``.
"""

from tests.support.envoy import EnvoyError, EnvoyProcess, envoy_binary, envoy_validate
from tests.support.ports import free_ports
from tests.support.tools import find_binary, in_ci, require_binary
from tests.support.upstream import (
    Behaviour,
    MockHeaderError,
    MockUpstream,
    RecordedRequest,
    parse_mock_header,
)

__all__ = [
    "Behaviour",
    "EnvoyError",
    "EnvoyProcess",
    "MockHeaderError",
    "MockUpstream",
    "RecordedRequest",
    "envoy_binary",
    "envoy_validate",
    "find_binary",
    "free_ports",
    "in_ci",
    "parse_mock_header",
    "require_binary",
]
