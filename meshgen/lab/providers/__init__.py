"""The lab's mock LLM providers: one header-steerable mock listening on many ports at once.

`meshgen lab up` and the Compose file run it as a process of its own (``__main__.py``)::

    python -m meshgen.lab.providers --listen provider.openai.us-east.ep0=18101 [--listen LABEL=PORT ...] \\
        [--host 127.0.0.1] --admin-port 18100 [--require-auth GLOB[=KEY]] [--strict-schema GLOB]

and the tests in a background thread of their own process::

    with MockProviders({"provider.openai.us-east.ep0": 18101, "provider.ollama.us-east.ep0": 18102}) as up:
        ...send through Envoy with header  x-mock: status=503@provider.openai.*;delay_ms=50
        assert up.count("provider.ollama.us-east.ep0") == 1

Each port carries a label (``provider.openai.us-east.ep0``) so a test can assert *which* upstream a request
reached through the real Envoy, with which headers and body. It speaks OpenAI, Anthropic and Ollama by path
(``answers.py``); the ``x-mock`` request header and the admin API's global faults steer each answer (grammar and
precedence: ``mock_header.py``; admin API: ``admin.py``, its client ``MockAdmin``). Every answer carries
``x-served-by: <label>``. ``GET /healthz`` answers 200 on every port and is not recorded.
"""

from meshgen.lab.mock_header import Behaviour, MockHeaderError, parse_mock_header
from meshgen.lab.providers.client import MockAdmin, MockAdminError
from meshgen.lab.providers.server import Fault, MockProviders, RecordedRequest

MockUpstream = MockProviders
"""The name the test kit has always used."""

__all__ = [
    "Behaviour",
    "Fault",
    "MockAdmin",
    "MockAdminError",
    "MockHeaderError",
    "MockProviders",
    "MockUpstream",
    "RecordedRequest",
    "parse_mock_header",
]
