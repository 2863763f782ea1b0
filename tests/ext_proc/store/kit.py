"""Types the store tests share (the fixtures are in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from ext_proc.store.base import Store

OpenStore = Callable[[], AbstractAsyncContextManager[Store]]
"""``open_store()``: a new store on the test's ledger, closed when its ``async with`` ends."""
