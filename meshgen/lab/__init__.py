"""The lab: the gateway that `meshgen build` generates, running on this machine from ``generated/local/``.

`meshgen lab up` and `meshgen lab demo` use ``Lab`` (``run.py``): mock providers (``providers.py``), the
data-plane service (``service.py``) and one real Envoy per region (``envoy.py``), all on loopback ports from the IR.
"""

from meshgen.lab.run import Lab, LabError

__all__ = ["Lab", "LabError"]
