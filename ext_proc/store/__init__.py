"""Token and cost ledger stores: ``base.py`` says what they promise; SQLite (one process) and Redis (replicas)."""
