"""The policy file: its model (`Policy`), loading with line numbers, and the cross-reference checks."""

from meshgen.policy.load import load_policy, load_policy_text
from meshgen.policy.model import Policy

__all__ = ["Policy", "load_policy", "load_policy_text"]
