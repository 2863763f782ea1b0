"""The IR: one frozen, resolved, target-neutral model of the gateway (see model.py)."""
