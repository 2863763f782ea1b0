"""meshgen: LLM traffic as code. One policy file compiled into Envoy, Istio and the data-plane service's config."""

from meshgen.compile import compile_policy

__version__ = "0.1.0"
__all__ = ["__version__", "compile_policy"]
