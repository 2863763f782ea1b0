"""Test kit: real Envoy, mock LLM providers, free ports, required programs.

The Envoy runner and the mock providers are product code (``meshgen.lab``: `meshgen lab up` runs them too);
they are re-exported here under the names the tests have always used.

Import from here: ``from tests.support import EnvoyProcess, MockUpstream, free_ports, require_binary``.
"""

from meshgen.lab.providers import (
    Behaviour,
    MockHeaderError,
    MockUpstream,
    RecordedRequest,
    parse_mock_header,
)
from tests.support.envoy import EnvoyError, EnvoyProcess, envoy_binary, envoy_validate
from tests.support.ports import free_ports
from tests.support.tools import find_binary, in_ci, require_binary

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
