"""The lab: the gateway that `meshgen build` generates, running on this machine from ``generated/local/``.

`meshgen lab up | status | down | logs` (``control.py``) run mock providers, the data-plane service (``service.py``)
and one real Envoy per region (``envoy.py``) as background processes under a supervisor (``supervisor.py``) that
restarts them; `meshgen chaos` (``chaos.py``) switches their faults. ``Lab`` (``run.py``) runs the same parts for
the length of a ``with`` block (`meshgen lab demo` without a running lab, and tests). Every port comes from the IR.
"""

from meshgen.lab.run import Lab, LabError

__all__ = ["Lab", "LabError"]
