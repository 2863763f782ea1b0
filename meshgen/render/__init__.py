"""Renderers: pure functions IR → documents. No I/O, no clock, no randomness."""
