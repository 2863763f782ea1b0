"""Rules across the policy file that pydantic cannot see field by field: references, cycles, duplicates.

Each rule is a pure function ``check_<rule>(policy, lines) -> list[Problem]``; `run_checks` runs them all,
so one run reports every problem. Names defined in the file count as defined even when their entry has a shape
error of its own (``lines`` knows every key in the file): one mistake is reported once, not at each reference.

Error codes (stable; docs link to them):

=======  ==========================================================================================
Code     Meaning
=======  ==========================================================================================
MG001    YAML syntax error
MG002    duplicate mapping key (YAML would silently keep the last one)
MG003    the file is empty or its top level is not a mapping
MG004    the file cannot be read (missing, not UTF-8)
MG010    unknown field
MG011    missing required field
MG012    bad value (wrong type, not one of the allowed words, malformed URL, …)
MG013    bad duration (``5 seconds`` instead of ``5s``)
MG014    plaintext or malformed API key (only ``sha256:<64 hex>`` is accepted)
MG015    number out of range (canary weight 150, abort 600, …)
MG016    list or mapping with too few or too many entries (``endpoints: []``, …)
MG017    invalid name (names are lowercase DNS labels: ``a-z 0-9 - .``)
MG018    invalid header name (letters, digits and ``-``; no ``_``: Envoy drops such headers)
MG101    unknown model (failover, canary, mirror, downgrade, tenant models)
MG102    unknown provider (``models.*.provider``, ``chaos.*.target.provider``)
MG103    unknown region (``providers.*.endpoints[*].region``, ``chaos.*.target.region``)
MG104    failover cycle (``a → b → a``)
MG105    a model fails over, canaries, mirrors or downgrades to itself
MG106    the same model listed twice in one failover list
MG107    empty failover list
MG108    downgrade to a model that is not cheaper
MG109    ``hedge.after`` and ``retry.per_try_timeout`` both set (a hedge is the per-try timeout)
MG110    ``hedge.after`` or ``retry.per_try_timeout`` not shorter than the model's effective timeout
MG121    one provider's endpoints in one region (or without one) mix ``http://`` and ``https://``
MG201    the same API key hash twice (across tenants or within one)
MG202    tenant allowed no model (``models: []``)
MG301    region with ``auth: jwt`` but no ``jwt`` block
MG302    region with a ``jwt`` block but another ``auth``
MG311    chaos fault with neither ``delay`` nor ``abort``
MG312    chaos fault targets a region where its provider has no endpoint (it would hit nothing)
MG313    a fault and retries on one Istio route (Istio drops the retries, istio/istio#13705); raised by the
         Istio renderer's ``check_fault_hops``: faults go on the provider's hop, retries on the model's route
MG401    header the gateway strips from clients (``x-meshgen-*``, ``x-envoy-*``) used for routing
=======  ==========================================================================================
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

from meshgen.errors import Problem
from meshgen.policy.lines import LineIndex
from meshgen.policy.model import RESERVED_HEADER_PREFIXES, Policy

__all__ = [
    "CHECKS",
    "check_chaos_faults",
    "check_chaos_regions",
    "check_downgrade_price",
    "check_duplicate_key_hashes",
    "check_failover_cycles",
    "check_failover_lists",
    "check_hedge_timeouts",
    "check_mixed_schemes",
    "check_model_references",
    "check_provider_references",
    "check_region_auth",
    "check_region_references",
    "check_reserved_headers",
    "check_self_references",
    "check_tenant_models",
    "did_you_mean",
    "run_checks",
]

Check = Callable[[Policy, LineIndex], list[Problem]]


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """``"did you mean 'claude-sonnet'?"`` for the closest choice, or None when nothing is close.

    Closeness is difflib's ratio (as in `difflib.get_close_matches`, cutoff 0.6); a tie goes to the earlier
    choice.
    """
    best: tuple[float, str] | None = None
    matcher = difflib.SequenceMatcher(b=word)
    for choice in choices:
        matcher.set_seq1(choice)
        score = matcher.ratio()
        if score >= 0.6 and (best is None or score > best[0]):
            best = (score, choice)
    return f"did you mean '{best[1]}'?" if best else None


def _unknown_hint(word: str, known: list[str], kind: str) -> str:
    suggestion = did_you_mean(word, known)
    if suggestion:
        return suggestion
    if not known:
        return f"no {kind}s are defined"
    return f"defined {kind}s: " + ", ".join(known)


def _unusable(lines: LineIndex, section: str) -> bool:
    """The section is in the file but not a mapping: its own error is reported; references go unchecked."""
    return lines.has((section,)) and not lines.is_mapping((section,))


def _defined(policy_names: Iterable[str], lines: LineIndex, section: str) -> list[str]:
    """Names under ``section``: every key in the file, in file order, then any only the model holds."""
    names = list(lines.children((section,)))
    names += [n for n in policy_names if n not in names]
    return names


def _model_refs(policy: Policy) -> Iterable[tuple[tuple[str | int, ...], str]]:
    """Every place a model names another model: (path, name), in a fixed order."""
    for name, spec in policy.models.items():
        for i, target in enumerate(spec.failover or []):
            yield ("models", name, "failover", i), target
        if spec.canary:
            yield ("models", name, "canary", "model"), spec.canary.model
        if spec.mirror:
            yield ("models", name, "mirror", "model"), spec.mirror.model
        if spec.downgrade:
            yield ("models", name, "downgrade"), spec.downgrade


Ref = tuple[tuple[str | int, ...], str]
"""A name the policy uses, and the YAML path where it uses it."""


def _unknown(policy: Policy, lines: LineIndex, section: str, refs: list[Ref], *, kind: str, code: str) -> list[Problem]:
    """A problem for every reference to a name that `section` does not define (with a did-you-mean)."""
    if _unusable(lines, section):
        return []
    known = _defined(getattr(policy, section), lines, section)
    return [
        lines.problem(path, f"unknown {kind} '{name}'", code=code, hint=_unknown_hint(name, known, kind))
        for path, name in refs
        if name not in known
    ]


def check_model_references(policy: Policy, lines: LineIndex) -> list[Problem]:
    """Failover targets, canary/mirror models, downgrades and tenant models must be defined models (MG101)."""
    refs = list(_model_refs(policy))
    for tenant_name, tenant in policy.tenants.items():
        refs += [(("tenants", tenant_name, "models", i), m) for i, m in enumerate(tenant.models)]
    return _unknown(policy, lines, "models", refs, kind="model", code="MG101")


def check_provider_references(policy: Policy, lines: LineIndex) -> list[Problem]:
    """``models.*.provider`` and ``chaos.*.target.provider`` must be defined providers (MG102)."""
    refs: list[Ref] = [(("models", name, "provider"), spec.provider) for name, spec in policy.models.items()]
    refs += [(("chaos", name, "target", "provider"), f.target.provider) for name, f in policy.chaos.items()]
    return _unknown(policy, lines, "providers", refs, kind="provider", code="MG102")


def check_region_references(policy: Policy, lines: LineIndex) -> list[Problem]:
    """Endpoint regions and chaos target regions must be defined regions (MG103)."""
    refs: list[Ref] = [
        (("providers", name, "endpoints", i, "region"), ep.region)
        for name, provider in policy.providers.items()
        for i, ep in enumerate(provider.endpoints)
        if ep.region is not None
    ]
    refs += [
        (("chaos", name, "target", "region"), f.target.region)
        for name, f in policy.chaos.items()
        if f.target.region is not None
    ]
    return _unknown(policy, lines, "regions", refs, kind="region", code="MG103")


def check_self_references(policy: Policy, lines: LineIndex) -> list[Problem]:
    """A model must not fail over, canary, mirror or downgrade to itself (MG105)."""
    hints = {
        "failover": "remove it: a model's own endpoints are always tried first",
        "canary": "a canary must be another model, e.g. gpt-4o-beta",
        "mirror": "a mirror must be another model; mirroring to itself doubles the traffic",
        "downgrade": "a downgrade must be a cheaper model",
    }
    problems = []
    for path, target in _model_refs(policy):
        if target == path[1]:
            kind = str(path[2])
            problems.append(lines.problem(path, _SELF[kind].format(target), code="MG105", hint=hints[kind]))
    return problems


_SELF = {
    "failover": "model '{}' fails over to itself",
    "canary": "model '{}' is its own canary",
    "mirror": "model '{}' mirrors to itself",
    "downgrade": "model '{}' downgrades to itself",
}


def check_failover_lists(policy: Policy, lines: LineIndex) -> list[Problem]:
    """A failover list is not empty (MG107) and lists each model once (MG106)."""
    problems = []
    for name, spec in policy.models.items():
        if spec.failover is None:
            continue
        if not spec.failover and not lines.has(("models", name, "failover", 0)):
            problems.append(
                lines.problem(
                    ("models", name, "failover"),
                    "empty failover list",
                    code="MG107",
                    hint="remove the field or list targets, e.g. failover: [claude-sonnet]",
                )
            )
        first: dict[str, int] = {}
        for i, target in enumerate(spec.failover):
            if target in first:
                problems.append(
                    lines.problem(
                        ("models", name, "failover", i),
                        f"'{target}' is listed twice (first at failover[{first[target]}])",
                        code="MG106",
                        hint="remove the repeated entry",
                    )
                )
            else:
                first[target] = i
    return problems


def check_failover_cycles(policy: Policy, lines: LineIndex) -> list[Problem]:
    """Failover lists must not lead back to where they started (MG104); self-loops are MG105's."""
    graph = {
        name: [t for t in dict.fromkeys(spec.failover or []) if t in policy.models and t != name]
        for name, spec in policy.models.items()
    }
    order = {name: i for i, name in enumerate(_defined(policy.models, lines, "models"))}
    seen: set[tuple[str, ...]] = set()
    problems = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        stack.append(node)
        for nxt in graph[node]:
            if nxt in stack:
                cycle = stack[stack.index(nxt) :]
                start = min(range(len(cycle)), key=lambda i: order.get(cycle[i], len(order)))
                cycle = cycle[start:] + cycle[:start]
                if tuple(cycle) not in seen:
                    seen.add(tuple(cycle))
                    head, second = cycle[0], cycle[1]
                    index = (policy.models[head].failover or []).index(second)
                    problems.append(
                        lines.problem(
                            ("models", head, "failover", index),
                            "failover cycle: " + " → ".join([*cycle, head]),
                            code="MG104",
                            hint="failover must not lead back to a model already tried; remove one entry",
                        )
                    )
            elif nxt not in done:
                visit(nxt, stack, done)
        stack.pop()
        done.add(node)

    done: set[str] = set()
    for name in sorted(graph, key=lambda n: order.get(n, len(order))):
        if name not in done:
            visit(name, [], done)
    return problems


def check_downgrade_price(policy: Policy, lines: LineIndex) -> list[Problem]:
    """When both models have a price, a downgrade must not cost more per token (MG108)."""
    problems = []
    for name, spec in policy.models.items():
        target = policy.models.get(spec.downgrade or "")
        if target is None or spec.price is None or target.price is None or target is spec:
            continue
        if (
            target.price.input_per_mtok > spec.price.input_per_mtok
            or target.price.output_per_mtok > spec.price.output_per_mtok
        ):
            problems.append(
                lines.problem(
                    ("models", name, "downgrade"),
                    f"downgrade '{spec.downgrade}' costs more than '{name}'",
                    code="MG108",
                    hint="a downgrade serves tenants whose budget is spent; pick a cheaper model",
                )
            )
    return problems


def check_duplicate_key_hashes(policy: Policy, lines: LineIndex) -> list[Problem]:
    """Each API key hash belongs to one tenant, once (MG201)."""
    owner: dict[str, tuple[str, int]] = {}
    problems = []
    for tenant_name, tenant in policy.tenants.items():
        for i, key in enumerate(tenant.keys):
            if key not in owner:
                owner[key] = (tenant_name, i)
                continue
            first_tenant, first_i = owner[key]
            where = f"keys[{first_i}]" if first_tenant == tenant_name else f"tenants.{first_tenant}.keys[{first_i}]"
            problems.append(
                lines.problem(
                    ("tenants", tenant_name, "keys", i),
                    f"duplicate key hash (also at {where})",
                    code="MG201",
                    hint="an API key identifies exactly one tenant; remove one of them",
                )
            )
    return problems


def check_tenant_models(policy: Policy, lines: LineIndex) -> list[Problem]:
    """A tenant must be allowed at least one model (MG202)."""
    example = next(iter(policy.models), "gpt-4o")
    return [
        lines.problem(
            ("tenants", name, "models"),
            f"tenant '{name}' is allowed no model",
            code="MG202",
            hint=f"list the models it may call, e.g. models: [{example}]",
        )
        for name, tenant in policy.tenants.items()
        if not tenant.models and not lines.has(("tenants", name, "models", 0))
    ]


def check_region_auth(policy: Policy, lines: LineIndex) -> list[Problem]:
    """``auth: jwt`` needs a ``jwt`` block (MG301); a ``jwt`` block needs ``auth: jwt`` (MG302)."""
    problems = []
    for name, region in policy.regions.items():
        if region.auth == "jwt" and region.jwt is None and not lines.has(("regions", name, "jwt")):
            problems.append(
                lines.problem(
                    ("regions", name, "auth"),
                    "auth: jwt needs a jwt block",
                    code="MG301",
                    hint="add jwt: {issuer: https://auth.example.com, audiences: [my-api]}",
                )
            )
        elif region.auth != "jwt" and region.jwt is not None:
            problems.append(
                lines.problem(
                    ("regions", name, "jwt"),
                    f"jwt block is ignored with auth: {region.auth}",
                    code="MG302",
                    hint="set auth: jwt or remove the jwt block",
                )
            )
    return problems


def check_chaos_faults(policy: Policy, lines: LineIndex) -> list[Problem]:
    """A fault must inject something: a delay, an abort or both (MG311).

    A field that is in the file but broken counts as present: its own problem is reported already.
    """
    return [
        lines.problem(
            ("chaos", name),
            "fault has neither delay nor abort",
            code="MG311",
            hint="add delay: 5s, abort: 503, or both",
        )
        for name, fault in policy.chaos.items()
        if fault.delay is None
        and fault.abort is None
        and not lines.has(("chaos", name, "delay"))
        and not lines.has(("chaos", name, "abort"))
    ]


def _duration(ms: int) -> str:
    """Milliseconds in the file's notation, in the largest unit that divides them: 30000 → '30s'."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def check_hedge_timeouts(policy: Policy, lines: LineIndex) -> list[Problem]:
    """A model sets a hedge or a per-try timeout, not both (MG109); either is shorter than its timeout (MG110).

    The effective timeout is the model's ``timeout``, else its provider's, else ``provider_defaults.timeout``.
    """
    problems = []
    for name, spec in policy.models.items():
        hedge = spec.hedge.after if spec.hedge else None
        per_try = spec.retry.per_try_timeout
        if hedge is not None and per_try is not None:
            problems.append(
                lines.problem(
                    ("models", name, "hedge"),
                    "hedge and retry.per_try_timeout are both set",
                    code="MG109",
                    hint="a hedge is the per-try timeout: keep hedge.after or retry.per_try_timeout, not both",
                )
            )
        provider = policy.providers.get(spec.provider)
        if spec.timeout is not None:
            timeout, source = spec.timeout, f"models.{name}.timeout"
        elif provider is not None and provider.timeout is not None:
            timeout, source = provider.timeout, f"providers.{spec.provider}.timeout"
        elif provider is not None:
            timeout, source = policy.provider_defaults.timeout, "provider_defaults.timeout"
        else:
            continue  # unknown provider: MG102
        for path, value, what in (
            (("models", name, "hedge", "after"), hedge, "hedge"),
            (("models", name, "retry", "per_try_timeout"), per_try, "per-try timeout"),
        ):
            if value is not None and value >= timeout:
                problems.append(
                    lines.problem(
                        path,
                        f"{_duration(value)} is not shorter than the model's timeout of {_duration(timeout)}, "
                        f"set by {source}",
                        code="MG110",
                        hint=f"the {what} could never fire; make it shorter than {_duration(timeout)}",
                    )
                )
    return problems


def check_mixed_schemes(policy: Policy, lines: LineIndex) -> list[Problem]:
    """A provider's endpoints in one region (or all without one) share a scheme (MG121): one cluster, one TLS."""
    problems = []
    for name, provider in policy.providers.items():
        first: dict[str | None, tuple[int, str]] = {}
        for i, endpoint in enumerate(provider.endpoints):
            scheme = endpoint.url.split("://", 1)[0]
            if endpoint.region not in first:
                first[endpoint.region] = (i, scheme)
                continue
            first_i, first_scheme = first[endpoint.region]
            if scheme != first_scheme:
                where = f"in region '{endpoint.region}'" if endpoint.region else "among endpoints without a region"
                problems.append(
                    lines.problem(
                        ("providers", name, "endpoints", i, "url"),
                        f"{scheme}:// mixed with {first_scheme}:// (endpoints[{first_i}]) {where}",
                        code="MG121",
                        hint="a provider's endpoints in one region form one cluster with one TLS setting; "
                        "use one scheme for all of them",
                    )
                )
    return problems


def check_chaos_regions(policy: Policy, lines: LineIndex) -> list[Problem]:
    """A fault aimed at a region hits the target provider's endpoints there: there must be some (MG312).

    Unknown providers and regions are MG102's and MG103's.
    """
    known = _defined(policy.regions, lines, "regions")
    problems = []
    for name, fault in policy.chaos.items():
        region = fault.target.region
        provider = policy.providers.get(fault.target.provider)
        if region is None or provider is None or region not in known:
            continue
        placed = list(dict.fromkeys(ep.region for ep in provider.endpoints if ep.region is not None))
        if region in placed:
            continue
        if placed:
            hint = f"the fault would hit nothing; its endpoints are in {', '.join(placed)}: aim there or remove region"
        else:
            hint = "the fault would hit nothing; its endpoints have no region: remove region to hit them"
        problems.append(
            lines.problem(
                ("chaos", name, "target", "region"),
                f"provider '{fault.target.provider}' has no endpoint in region '{region}'",
                code="MG312",
                hint=hint,
            )
        )
    return problems


def check_reserved_headers(policy: Policy, lines: LineIndex) -> list[Problem]:
    """Headers the policy routes on must not be ones the gateway strips from clients (MG401)."""
    refs: list[tuple[tuple[str | int, ...], str, str]] = []
    for name, spec in policy.models.items():
        if spec.canary:
            refs += [(("models", name, "canary", "header", h), h, "X-Model-Version") for h in spec.canary.header]
        if spec.affinity:
            refs.append((("models", name, "affinity", "header"), spec.affinity.header, "x-session-id"))
    for name, tenant in policy.tenants.items():
        if tenant.non_critical:
            refs.append((("tenants", name, "non_critical", "header"), tenant.non_critical.header, "x-priority"))
    prefixes = " and ".join(f"{p}*" for p in RESERVED_HEADER_PREFIXES)
    return [
        lines.problem(
            path,
            f"header '{header}' is stripped from client requests, so this could never match",
            code="MG401",
            hint=f"the gateway removes {prefixes} headers before routing; use another name, e.g. {example}",
        )
        for path, header, example in refs
        if header.lower().startswith(RESERVED_HEADER_PREFIXES)
    ]


CHECKS: tuple[Check, ...] = (
    check_model_references,
    check_provider_references,
    check_region_references,
    check_self_references,
    check_failover_lists,
    check_failover_cycles,
    check_downgrade_price,
    check_hedge_timeouts,
    check_mixed_schemes,
    check_duplicate_key_hashes,
    check_tenant_models,
    check_region_auth,
    check_chaos_faults,
    check_chaos_regions,
    check_reserved_headers,
)


def run_checks(policy: Policy, lines: LineIndex) -> list[Problem]:
    """Every problem every rule finds, in the order of ``CHECKS`` (the loader sorts them by line)."""
    return [problem for check in CHECKS for problem in check(policy, lines)]
