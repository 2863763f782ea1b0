"""Policy file → `Policy`, or one `PolicyError` naming every problem with its file, line and YAML path.

Steps, each collecting problems rather than stopping at the first:

1. YAML is composed into a node tree (PyYAML SafeLoader), which gives the line of every mapping key and
   sequence item (`LineIndex`) and shows duplicate keys, which ``yaml.safe_load`` silently overwrites.
2. `Policy.model_validate` checks the shape; every pydantic error is translated into plain words at the line
   of the deepest part of its path that exists in the file.
3. The cross-reference rules of `checks.py` run. When the shape is wrong they run on the policy with the
   broken parts cut away, so a file with both kinds of mistake reports both.

A YAML syntax error or a top level that is not a mapping stops at step 1: nothing further can be located.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from meshgen.errors import PolicyError, Problem
from meshgen.policy.checks import did_you_mean, run_checks
from meshgen.policy.lines import ROOT, LineIndex, YamlPath
from meshgen.policy.model import HEADER_PATTERN, Policy

__all__ = ["load_policy", "load_policy_text"]

_MERGE_TAG = "tag:yaml.org,2002:merge"
_KEY_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"
_NAME_PATTERN = r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$"
_URL_PATTERN = r"^https?://[^/\s:]+(:\d{1,5})?/?$"
_MAX_PRUNE_ROUNDS = 20

KEY_HASH_HINT = 'store sha256 of the key: printf %s "$KEY" | sha256sum'


def load_policy(path: Path) -> Policy:
    """Read and validate the policy file at ``path``; problems name the file as ``str(path)``."""
    filename = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PolicyError(
            [Problem(filename, 1, ROOT, f"cannot read the policy file: {reason}", None, "MG004")]
        ) from exc
    return load_policy_text(text, filename)


def load_policy_text(text: str, filename: str) -> Policy:
    """Validate policy YAML ``text``; ``filename`` is only used in messages."""
    data, lines, problems = _parse(text, filename)
    try:
        policy: Policy | None = Policy.model_validate(data)
    except ValidationError as exc:
        policy = None
        errors = exc.errors(include_url=False)
        problems += [_translate(error, lines) for error in errors]
        checkable = _prune(data, errors)
    else:
        checkable = policy
    if checkable is not None:
        problems += run_checks(checkable, lines)
    if problems:
        raise PolicyError(sorted(dict.fromkeys(problems), key=_position))
    assert policy is not None
    return policy


def _position(problem: Problem) -> tuple[int, list[str | int]]:
    """Sort key: line, then YAML path with indexes compared as numbers (``[2]`` before ``[10]``)."""
    parts = re.split(r"(\d+)", problem.yaml_path)
    return problem.line, [int(p) if i % 2 else p for i, p in enumerate(parts)]


# --- step 1: YAML with line numbers -------------------------------------------------------------------------


def _python_yaml_error(text: str) -> yaml.YAMLError | None:
    """PyYAML's own scanner words syntax errors better than libyaml (it names the tab, say): ask it again."""
    try:
        yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        return exc
    return None


def _parse(text: str, filename: str) -> tuple[dict[str, Any], LineIndex, list[Problem]]:
    """The document as plain data, its line index, and duplicate-key problems. Raises on syntax errors."""
    # The C loader (libyaml) builds the same node tree with the same marks, ~3× faster on large policies.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        node = loader.get_single_node()
        lines: dict[YamlPath, int] = {}
        keys: dict[YamlPath, tuple[str, ...]] = {}
        duplicates: list[tuple[YamlPath, int, int]] = []
        if node is not None:
            _index(node, (), lines, keys, duplicates, set())
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise PolicyError([_yaml_problem(_python_yaml_error(text) or exc, filename)]) from exc
    finally:
        loader.dispose()

    index = LineIndex(filename, lines, keys)
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {_kind(data)}, not a mapping"
        line = node.start_mark.line + 1 if node is not None else 1
        raise PolicyError(
            [
                index.problem(
                    (),
                    f"the policy file is {kind}",
                    code="MG003",
                    hint="it starts with apiVersion: meshgen/v1, then name, regions, providers, models",
                    line=line,
                )
            ]
        )
    problems = [
        index.problem(
            path,
            f"duplicate key '{path[-1]}' (first on line {first})",
            code="MG002",
            hint="YAML would keep only the last one; merge the two entries",
            line=line,
        )
        for path, line, first in duplicates
    ]
    return data, index, problems


def _index(
    node: yaml.Node,
    path: YamlPath,
    lines: dict[YamlPath, int],
    keys: dict[YamlPath, tuple[str, ...]],
    duplicates: list[tuple[YamlPath, int, int]],
    active: set[int],
) -> None:
    """Record the line of every key and item under ``node``; note duplicate keys."""
    if id(node) in active:  # a recursive alias
        return
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        names: list[str] = []
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            name = str(key_node.value)
            line = key_node.start_mark.line + 1
            if name in names:
                duplicates.append(((*path, name), line, lines[(*path, name)]))
                continue
            names.append(name)
            lines[(*path, name)] = line
            _index(value_node, (*path, name), lines, keys, duplicates, active)
        # `<<: *defaults` adds the keys the mapping does not set itself, at the anchor's lines
        for merge in merges:
            sources = merge.value if isinstance(merge, yaml.SequenceNode) else [merge]
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    continue
                for key_node, value_node in source.value:
                    if isinstance(key_node, yaml.ScalarNode) and str(key_node.value) not in names:
                        name = str(key_node.value)
                        names.append(name)
                        lines[(*path, name)] = key_node.start_mark.line + 1
                        _index(value_node, (*path, name), lines, keys, [], active)
        keys[path] = tuple(names)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _index(item, (*path, i), lines, keys, duplicates, active)
    active.discard(id(node))


def _yaml_problem(exc: yaml.YAMLError, filename: str) -> Problem:
    line = 1
    message = str(exc)
    hint: str | None = None
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        message = exc.problem or exc.context or "unreadable YAML"
        if exc.problem and exc.context:
            started = f" started on line {exc.context_mark.line + 1}" if exc.context_mark else ""
            hint = f"{exc.context}{started}"
        if exc.problem == "but found another document":
            message = "more than one YAML document"
            hint = "a policy file holds one document; remove the '---' line"
        elif "'\\t'" in message:
            hint = "indent with spaces: YAML does not allow tabs"
        elif "mapping values are not allowed" in message:
            hint = "check the indentation, and quote values that contain ': '"
    elif isinstance(exc, yaml.reader.ReaderError):
        message = f"unreadable character at position {exc.position}"
    return Problem(filename, line, ROOT, f"invalid YAML: {message}", hint, "MG001")


# --- step 2: pydantic errors in plain words -----------------------------------------------------------------

_KIND_BY_ERROR = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
}

_MISSING_TOP_HINTS = {
    "apiVersion": "add apiVersion: meshgen/v1",
    "name": "name the policy, e.g. name: my-gateway",
    "regions": "e.g. regions: {us-east: {auth: api-key}}",
    "providers": 'e.g. providers: {openai: {schema: openai, endpoints: [{url: "https://api.openai.com"}]}}',
    "models": "e.g. models: {gpt-4o: {provider: openai}}",
}
_MISSING_HINTS = {
    "models": "list the models the tenant may call, e.g. models: [gpt-4o]",
    "provider": "name the provider serving this model, e.g. provider: openai",
    "schema": "the API the provider speaks: openai or anthropic",
    "endpoints": 'e.g. endpoints: [{url: "https://api.openai.com"}]',
    "url": 'e.g. url: "https://api.openai.com"',
    "keys": 'list the sha256 of each API key: printf %s "$KEY" | sha256sum',
    "target": "e.g. target: {provider: openai}",
}

# field → (message, hint) for an empty list or mapping where at least one entry is required
_EMPTY = {
    "endpoints": (
        "provider has no endpoints",
        'list at least one, e.g. endpoints: [{url: "https://api.openai.com"}]',
    ),
    "keys": ("tenant has no API keys", f"list the sha256 of each key; {KEY_HASH_HINT}"),
    "regions": ("no regions defined", "define at least one, e.g. regions: {us-east: {auth: api-key}}"),
    "providers": ("no providers defined", "define at least one provider"),
    "models": ("no models defined", "define at least one model"),
    "audiences": ("jwt lists no audiences", "list at least one, e.g. audiences: [my-api]"),
}


def _translate(error: ErrorDetails, lines: LineIndex) -> Problem:
    """One pydantic error → one Problem in the user's words."""
    loc = lines.resolve(tuple(error["loc"]))
    kind = error["type"]
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    value = error.get("input")
    field = next((p for p in reversed(loc) if isinstance(p, str) and p != "[key]"), "")

    if kind == "missing":
        parent = loc[:-1]
        hints = _MISSING_TOP_HINTS if not parent else _MISSING_HINTS
        return lines.problem(parent, f"missing field '{loc[-1]}'", code="MG011", hint=hints.get(str(loc[-1])))
    if kind == "extra_forbidden":
        allowed = _field_names(_type_at(loc[:-1]))
        hint = did_you_mean(str(loc[-1]), allowed) or (f"allowed: {', '.join(allowed)}" if allowed else None)
        return lines.problem(loc, f"unknown field '{loc[-1]}'", code="MG010", hint=hint)

    if loc and loc[-1] == "[key]":
        loc = loc[:-1]
        if _key_pattern(loc) == HEADER_PATTERN and kind in ("string_pattern_mismatch", "string_type"):
            return _bad_header(lines, loc, value)
        if kind in ("string_pattern_mismatch", "string_too_long", "string_type"):
            return _bad_name(lines, loc, value)
    if kind == "string_pattern_mismatch":
        pattern = ctx.get("pattern")
        if pattern == HEADER_PATTERN:
            return _bad_header(lines, loc, value)
        if pattern == _KEY_HASH_PATTERN:
            return lines.problem(
                loc,
                "plaintext or malformed API key: only 'sha256:<64 hex>' is accepted",
                code="MG014",
                hint=KEY_HASH_HINT,
            )
        if pattern == _NAME_PATTERN:
            return _bad_name(lines, loc, value)
        if pattern == _URL_PATTERN:
            return lines.problem(
                loc,
                f"bad URL {_show(value, loc)}",
                code="MG012",
                hint="use http(s)://host[:port] without a path, e.g. https://api.openai.com",
            )
        return lines.problem(loc, f"{_show(value, loc)} does not match {pattern}", code="MG012")
    if kind == "string_too_long" and _is_name(loc):
        return _bad_name(lines, loc, value)
    if kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
        if message.startswith("bad duration"):
            message, _, hint = message.partition(": ")
            return lines.problem(loc, message, code="MG013", hint=hint or None)
        return lines.problem(loc, message, code="MG012")
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        hint = did_you_mean(str(value), options) if isinstance(value, str) and len(options) > 1 else None
        return lines.problem(loc, f"expected {ctx.get('expected')}, got {_show(value, loc)}", code="MG012", hint=hint)
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return lines.problem(loc, f"must be {_range(loc, ctx)}, got {_show(value, loc)}", code="MG015")
    if kind == "too_short":
        if ctx.get("min_length") == 1 and field in _EMPTY:
            message, hint = _EMPTY[field]
            return lines.problem(loc, message, code="MG016", hint=hint)
        n = ctx.get("min_length")
        return lines.problem(loc, f"needs at least {n} {_entries(n)}", code="MG016")
    if kind == "too_long":
        n, actual = ctx.get("max_length"), ctx.get("actual_length")
        hint = "a canary is chosen by one header, e.g. header: {X-Model-Version: beta}" if field == "header" else None
        got = f", got {actual}" if actual is not None else ""
        return lines.problem(loc, f"allows at most {n} {_entries(n)}{got}", code="MG016", hint=hint)
    if kind in _KIND_BY_ERROR:
        return lines.problem(loc, f"expected {_KIND_BY_ERROR[kind]}, got {_show(value, loc)}", code="MG012")
    return lines.problem(loc, error["msg"], code="MG012")


def _bad_name(lines: LineIndex, loc: YamlPath, value: object) -> Problem:
    if not isinstance(value, str):
        return lines.problem(
            loc,
            f"invalid name {_show(value, loc)}: names are strings",
            code="MG017",
            hint=f"quote it: '{_show(value, loc)}'",
        )
    suggestion = re.sub(r"[^a-z0-9.-]+", "-", str(value).lower()).strip("-.")[:63].strip("-.")
    hint = "use lowercase letters, digits, '-' and '.'"
    if suggestion and suggestion != value:
        hint += f", e.g. '{suggestion}'"
    if isinstance(value, str) and len(value) > 63:
        return lines.problem(loc, f"name longer than 63 characters: {_show(value, loc)}", code="MG017", hint=hint)
    return lines.problem(loc, f"invalid name {_show(value, loc)}", code="MG017", hint=hint)


def _bad_header(lines: LineIndex, loc: YamlPath, value: object) -> Problem:
    suggestion = re.sub(r"[^A-Za-z0-9-]+", "-", str(value)).strip("-")
    example = suggestion if suggestion and suggestion != value else "X-Model-Version"
    hint = f"use letters, digits and '-', e.g. '{example}'"
    if "_" in str(value):
        hint += "; Envoy drops headers with '_'"
    return lines.problem(loc, f"invalid header name {_show(value, loc)}", code="MG018", hint=hint)


def _show(value: object, loc: YamlPath) -> str:
    """A value as the user wrote it; never echoes what may be a plaintext API key."""
    if loc[:1] == ("tenants",) and "keys" in loc and value is not None:
        return f"a {_kind(value)} (not shown: it may be a key)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing (null)"
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, int | float):
        return _number(value)
    return f"a {_kind(value)}"


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def _number(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _entries(n: object) -> str:
    return "entry" if n == 1 else "entries"


def _range(loc: YamlPath, ctx: Mapping[str, Any]) -> str:
    """'between 0 and 100' from the field's own bounds, else from the one bound pydantic reports."""
    bounds: dict[str, object] = {}
    for meta in _constraints(loc):
        for name in ("ge", "gt", "le", "lt"):
            if getattr(meta, name, None) is not None:
                bounds[name] = getattr(meta, name)
    if not bounds:
        bounds = {name: ctx[name] for name in ("ge", "gt", "le", "lt") if name in ctx}
    if "ge" in bounds and "le" in bounds:
        return f"between {_number(bounds['ge'])} and {_number(bounds['le'])}"
    words = {"ge": "at least", "gt": "greater than", "le": "at most", "lt": "less than"}
    return " and ".join(f"{words[name]} {_number(bound)}" for name, bound in bounds.items())


# --- the model's structure, for hints -----------------------------------------------------------------------


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional: ``Annotated[X, …] | None`` → X."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _model_field(model: type[BaseModel], name: object) -> FieldInfo | None:
    for field_name, info in model.model_fields.items():
        if name in (field_name, info.alias):
            return info
    return None


def _walk(loc: Sequence[object]) -> tuple[Any, FieldInfo | None]:
    """The (still wrapped) type at ``loc`` in `Policy`, and its field info if ``loc`` ends at a field."""
    tp: Any = Policy
    info: FieldInfo | None = None
    for part in loc:
        inner = _unwrap(tp)
        info = None
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            info = _model_field(inner, part)
            if info is None:
                return None, None
            tp = info.annotation
        elif typing.get_origin(inner) is dict:
            tp = typing.get_args(inner)[0 if part == "[key]" else 1]
        elif typing.get_origin(inner) is list:
            tp = typing.get_args(inner)[0]
        else:
            return None, None
    return tp, info


def _type_at(loc: Sequence[object]) -> Any:
    return _unwrap(_walk(loc)[0])


def _field_names(tp: Any) -> list[str]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [info.alias or name for name, info in tp.model_fields.items()]
    return []


def _constraints(loc: Sequence[object]) -> list[object]:
    tp, info = _walk(loc)
    found: list[object] = list(info.metadata) if info is not None else []
    if typing.get_origin(tp) is typing.Annotated:
        for meta in typing.get_args(tp)[1:]:
            found += list(meta.metadata) if isinstance(meta, FieldInfo) else [meta]
    return found


def _key_pattern(loc: Sequence[object]) -> str | None:
    """The pattern the keys of the mapping holding ``loc`` must match, if any."""
    inner = _type_at(loc[:-1])
    if typing.get_origin(inner) is not dict:
        return None
    key = typing.get_args(inner)[0]
    metas = typing.get_args(key)[1:] if typing.get_origin(key) is typing.Annotated else ()
    return next((m.pattern for m in metas if isinstance(getattr(m, "pattern", None), str)), None)


def _is_name(loc: Sequence[object]) -> bool:
    tp, info = _walk(loc)
    metas = list(info.metadata) if info is not None else []
    if typing.get_origin(tp) is typing.Annotated:
        metas += list(typing.get_args(tp)[1:])
    return any(getattr(m, "pattern", None) == _NAME_PATTERN for m in metas)


# --- step 3: cut broken parts away so the cross-reference rules can still run -------------------------------


def _prune(data: dict[str, Any], errors: list[ErrorDetails]) -> Policy | None:
    """A Policy from ``data`` without the parts pydantic rejected, for the cross-reference rules.

    Broken entries are cut away (a missing field: its whole entry); a required top-level value is replaced
    by a stand-in that the rules never see. Names cut away stay known through the line index.
    """
    data = copy.deepcopy(data)
    for _ in range(_MAX_PRUNE_ROUNDS):
        cut: list[YamlPath] = []
        for error in errors:
            path = _cut_path(data, error)
            top = str(error["loc"][0]) if error["loc"] else ""
            if len(path) >= 2 or top not in _STAND_INS:
                cut.append(path or (top,))
            else:
                data[top] = copy.deepcopy(_STAND_INS[top])
        _delete(data, cut)
        try:
            policy = Policy.model_validate(data)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            continue
        for section in (policy.regions, policy.providers, policy.models):
            section.pop(_STAND_IN, None)
        return policy
    return None


_STAND_IN = "meshgen-stand-in"
_STAND_INS: dict[str, object] = {
    "apiVersion": "meshgen/v1",
    "name": _STAND_IN,
    "regions": {_STAND_IN: {}},
    "providers": {_STAND_IN: {"schema": "openai", "endpoints": [{"url": "http://stand-in"}]}},
    "models": {_STAND_IN: {"provider": _STAND_IN}},
}


def _cut_path(data: object, error: ErrorDetails) -> YamlPath:
    """The deepest existing path whose removal drops the error (a missing field: its parent entry).

    A broken list item takes its whole list with it, so the indexes the rules report stay those of the file.
    """
    loc = tuple(error["loc"])
    if error["type"] == "missing":
        loc = loc[:-1]
    if loc and loc[-1] == "[key]":
        loc = loc[:-1]
    found: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            break
        found.append(part)
    while found and isinstance(found[-1], int):
        found.pop()
    return tuple(found)


def _delete(data: dict[str, Any], paths: list[YamlPath]) -> None:
    """Remove each mapping entry at ``paths`` (shortest first; those under a removed one are gone already)."""
    for path in sorted(set(paths), key=len):
        node: Any = data
        for part in path[:-1]:
            if isinstance(node, dict):
                node = node.get(part)
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
            else:
                node = None
        if isinstance(node, dict):
            node.pop(path[-1], None)
