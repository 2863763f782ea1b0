"""Envoy bootstrap renderer: one bootstrap per region and target."""

from meshgen.render.envoy.bootstrap import render_envoy
from meshgen.render.envoy.target import Target

__all__ = ["Target", "render_envoy"]
