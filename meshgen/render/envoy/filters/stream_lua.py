"""Lua on the streaming routes that are only counted: what ext_proc's request messages used to do, without a
round trip into Python (each ext_proc message costs ~0.1 ms of CPU and its latency before the first token).

- OpenAI: asks the provider for the stream's usage (`stream_options.include_usage`) unless the client did, and
  fixes content-length; says in `meshgen.stream.hide_usage` whether the client must not see that usage event.
- Both schemas: the request id and the request's start (`start_ms`) in `meshgen.stream`, which ext_proc reads
  with the first response chunk (ext_proc/processor.py).

The body is JSON that admission has already parsed; the script edits it as text, only at the top: a
`"stream_options"` key can only sit where a key does, since JSON escapes every quote inside a string. A nested
object with a key of that name (a tool's schema) could mislead it; then the provider reports no usage and the
stream is settled as an estimate, marked so — never silently. The filter is off on every other route.
"""

from __future__ import annotations

from typing import Any, Final

from meshgen.render.envoy.filters.ext_proc import STREAM_NAMESPACE as NAMESPACE
from meshgen.render.envoy.filters.ext_proc import Schema
from meshgen.render.envoy.types import API, filter_

NAME = "envoy.filters.http.lua"
_PER_ROUTE = f"{API}.extensions.filters.http.lua.v3.LuaPerRoute"

_STAMP: Final = f"""
local function stamp(h, hide)
  local meta = h:streamInfo():dynamicMetadata()
  meta:set("{NAMESPACE}", "start_ms", h:timestamp())
  meta:set("{NAMESPACE}", "request_id", h:headers():get("x-request-id") or "")
  meta:set("{NAMESPACE}", "hide_usage", hide)
end
"""

_OPENAI: Final = (
    _STAMP
    + """
local ASK = '"include_usage":true'

local function ask_usage(s)
  if string.find(s, '"include_usage"%s*:%s*true') then
    return nil
  end
  local out, n = string.gsub(s, '"include_usage"%s*:%s*false', ASK, 1)
  if n > 0 then
    return out
  end
  local at = select(2, string.find(s, '"stream_options"%s*:%s*{'))
  if at then
    local sep = string.find(s, '^%s*}', at + 1) and '' or ','
    return string.sub(s, 1, at) .. ASK .. sep .. string.sub(s, at + 1)
  end
  out, n = string.gsub(s, '"stream_options"%s*:%s*null', '"stream_options":{' .. ASK .. '}', 1)
  if n > 0 then
    return out
  end
  at = string.find(s, '{', 1, true)
  if not at then
    return nil
  end
  return string.sub(s, 1, at) .. '"stream_options":{' .. ASK .. '},' .. string.sub(s, at + 1)
end

function envoy_on_request(h)
  local body = h:body(true)
  local asked = ask_usage(body:getBytes(0, body:length()))
  if asked then
    body:setBytes(asked)
    h:headers():replace("content-length", tostring(#asked))
  end
  stamp(h, asked and "1" or "0")
end
"""
)

_ANTHROPIC: Final = (
    _STAMP
    + """
function envoy_on_request(h)
  stamp(h, "0")
end
"""
)

_SCRIPTS: Final[dict[Schema, str]] = {"openai": _OPENAI, "anthropic": _ANTHROPIC}


def _script_name(schema: Schema) -> str:
    return f"meshgen.stream.{schema}"


def stream_lua_filter() -> dict[str, Any]:
    """The filter, placed before ext_proc: no script runs unless a route names one."""
    return filter_(
        NAME,
        f"{API}.extensions.filters.http.lua.v3.Lua",
        {"source_codes": {_script_name(s): {"inline_string": code} for s, code in sorted(_SCRIPTS.items())}},
    )


def off() -> dict[str, Any]:
    """The virtual host's default."""
    return {NAME: {"@type": _PER_ROUTE, "disabled": True}}


def on(schema: Schema) -> dict[str, Any]:
    """A counted streaming route's script."""
    return {NAME: {"@type": _PER_ROUTE, "name": _script_name(schema)}}
