"""Benchmark (not a test): how long `meshgen build` takes to compile policies of growing size.

For each size N (default 10, 100 and 1,000) a realistic policy with N tenants *and* N models is generated
and written to a temporary directory: 3 regions (api-key, jwt, mtls), 4 providers with endpoints placed
in regions (one global), models spread over the providers with failover lists (always to later models, so
no cycles), canaries, mirrors, hedges, downgrades to cheaper models, affinity, a few chaos faults and SLOs;
tenants with 1-2 ``sha256:`` key hashes each (unique across tenants), a handful of allowed models, limits
and alerts.

What is timed is the path the CLI takes for `meshgen build`, minus writing the files:
``meshgen.compile.build`` (load + validate + IR + render + serialize)
(the text of every file). Each size is the best (min) of several runs measured with `time.perf_counter`;
large sizes run fewer times when one run is slow (see ``--budget``).

The table shows N, seconds, seconds per unit (seconds / N) and growth: the time ratio to the previous size
divided by the size ratio, so ``<= 1.0`` means no worse than linear.

Goal: 1,000 tenants + 1,000 models compile in under 2 s on a 2-core machine, and growth is no worse than
linear.

    .venv/bin/python bench/compile.py                 # table
    .venv/bin/python bench/compile.py --json          # {"tenants": {"10": s, "100": s, "1000": s}, ...}
    .venv/bin/python bench/compile.py --sizes 10,100 --runs 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from meshgen import __version__
from meshgen.compile import build
from meshgen.errors import PolicyError

GOAL_SIZE = 1000
GOAL_SECONDS = 2.0

REGIONS: dict[str, Any] = {
    "us-east": {"auth": "api-key"},
    "us-west": {"auth": "jwt", "jwt": {"issuer": "https://auth.bench.local", "audiences": ["bench"]}},
    "europe": {"auth": "mtls"},
}

PROVIDERS: dict[str, Any] = {
    "openai": {
        "schema": "openai",
        "endpoints": [
            {"url": "https://api.openai.com", "region": "us-east"},
            {"url": "https://eu.api.openai.com", "region": "europe"},
        ],
        "api_key_env": "OPENAI_API_KEY",
    },
    "anthropic": {
        "schema": "anthropic",
        "endpoints": [{"url": "https://api.anthropic.com"}],
        "api_key_env": "ANTHROPIC_API_KEY",
    },
    "ollama": {
        "schema": "openai",
        "endpoints": [
            {"url": "http://ollama-east:11434", "region": "us-east"},
            {"url": "http://ollama-west:11434", "region": "us-west", "weight": 2},
        ],
        "timeout": "60s",
    },
    "mistral": {
        "schema": "openai",
        "endpoints": [
            {"url": "https://api.mistral.ai", "region": "europe"},
            {"url": "https://us.api.mistral.ai", "region": "us-west"},
        ],
        "api_key_env": "MISTRAL_API_KEY",
        "outlier": {"consecutive_5xx": 5, "interval": "5s", "ejection": "60s", "max_ejection_percent": 50},
    },
}
PROVIDER_NAMES = list(PROVIDERS)


def model_name(i: int) -> str:
    return f"model-{i:05d}"


def tenant_name(i: int) -> str:
    return f"tenant-{i:05d}"


def key_hash(i: int, k: int) -> str:
    seed = f"key-{i}" if k == 0 else f"key-{i}-{k}"
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def make_model(i: int, n: int, rng: random.Random) -> dict[str, Any]:
    """Model i of n. Every reference points at a later model, so failover graphs are acyclic."""
    spec: dict[str, Any] = {"provider": PROVIDER_NAMES[i % len(PROVIDER_NAMES)]}
    if i % 2 == 0:
        spec["upstream_name"] = f"upstream-{i}"
    later = list(range(i + 1, n))
    if later and i % 3 != 2:
        spec["failover"] = [model_name(j) for j in rng.sample(later[:20], min(len(later), rng.randint(1, 3)))]
        if i % 4 == 0:
            spec["hedge"] = {"after": "2s"}
    if len(later) >= 1 and i % 10 == 0:
        spec["canary"] = {
            "model": model_name(later[0]),
            "weight": rng.choice([5, 10, 25]),
            "header": {"X-Model-Version": "beta"},
        }
    if len(later) >= 2 and i % 15 == 0:
        spec["mirror"] = {"model": model_name(later[1]), "percent": rng.choice([10, 50, 100])}
    # Prices fall with the index, so a downgrade to a later model is always cheaper.
    spec["price"] = {"input_per_mtok": round((n - i) * 0.01, 4), "output_per_mtok": round((n - i) * 0.04, 4)}
    if later and i % 5 == 0:
        spec["downgrade"] = model_name(later[-1] if len(later) < 3 else later[2])
    if i % 12 == 0:
        spec["affinity"] = {"header": "x-session-id"}
    if i % 6 == 1:
        spec["retry"] = {"attempts": 3, "per_try_timeout": "10s"}
    if i % 9 == 4:
        spec["timeout"] = "45s"
    return spec


def make_tenant(i: int, n: int, rng: random.Random) -> dict[str, Any]:
    tenant: dict[str, Any] = {
        "keys": [key_hash(i, k) for k in range(1 + i % 2)],
        "models": [model_name(j) for j in sorted(rng.sample(range(n), min(n, rng.randint(3, 6))))],
        "limits": {"rpm": 60 + i % 600, "tpm": 40_000 + 100 * i, "tpd": 2_000_000, "usd_per_day": 5 + i % 50},
    }
    if i % 3 == 0:
        tenant["alerts_at"] = [0.5, 0.8, 1.0]
    if i % 4 == 0:
        tenant["non_critical"] = {"header": "x-priority", "value": "low", "queue_max_wait": "20s"}
    return tenant


def make_policy(n: int, seed: int = 0) -> dict[str, Any]:
    """A policy with ``n`` tenants and ``n`` models (deterministic for a given seed)."""
    rng = random.Random(seed)
    return {
        "apiVersion": "meshgen/v1",
        "name": f"bench-{n}",
        "service": {"timeout": "250ms", "failure_mode": "closed", "store": "sqlite"},
        "regions": REGIONS,
        "provider_defaults": {
            "timeout": "30s",
            "connect_timeout": "2s",
            "outlier": {
                "consecutive_5xx": 3,
                "interval": "10s",
                "ejection": "30s",
                "max_ejection_percent": 90,
            },
        },
        "providers": PROVIDERS,
        "models": {model_name(i): make_model(i, n, rng) for i in range(n)},
        "tenants": {tenant_name(i): make_tenant(i, n, rng) for i in range(n)},
        "chaos": {
            "openai-slow": {"target": {"provider": "openai"}, "delay": "5s", "percent": 100},
            "openai-errors": {"target": {"provider": "openai"}, "abort": 500, "percent": 20},
            "mistral-eu-throttle": {"target": {"provider": "mistral", "region": "europe"}, "abort": 429},
        },
        "slos": {
            "chat-availability": {"objective": 99.5, "window": "30d"},
            "chat-latency": {"objective": 95, "threshold": "2s", "window": "30d"},
        },
        "lab": {"base_port": 18000},
    }


def write_policy(n: int, directory: Path) -> Path:
    path = directory / f"bench-{n}.yaml"
    path.write_text(yaml.safe_dump(make_policy(n), sort_keys=False, width=120))
    return path


def compile_once(path: Path) -> tuple[float, int]:
    """Seconds for compile + serialize (what `meshgen build` does before writing), and the file count."""
    start = time.perf_counter()
    _, files = build(path, version=__version__)
    return time.perf_counter() - start, len(files)


def measure(path: Path, runs: int, budget: float) -> tuple[float, int]:
    """Best of up to ``runs`` runs; stops early once ``budget`` seconds are spent (always at least one)."""
    best = float("inf")
    spent = 0.0
    done = 0
    while done < runs and (done == 0 or spent < budget):
        seconds, _files = compile_once(path)
        best = min(best, seconds)
        spent += seconds
        done += 1
    return best, done


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError("sizes must be positive integers")
    return sorted(set(sizes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=[10, 100, 1000], help="e.g. 10,100,1000")
    parser.add_argument("--runs", type=int, default=3, help="runs per size; the best one counts (default 3)")
    parser.add_argument(
        "--budget",
        type=float,
        default=20.0,
        help="stop repeating a size after this many seconds (default 20).",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)

    results: dict[int, float] = {}
    runs: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="meshgen-bench-") as tmp:
        try:
            # Warm-up: first-use costs (imports, pydantic and yaml caches) are not timed.
            compile_once(write_policy(3, Path(tmp)))
            for n in args.sizes:
                path = write_policy(n, Path(tmp))
                results[n], runs[n] = measure(path, max(args.runs, 1), args.budget)
                if not args.json:
                    print(f"  N={n}: best {results[n]:.3f} s of {runs[n]} run(s)", file=sys.stderr)
        except PolicyError as error:
            for problem in error.problems[:20]:
                print(problem, file=sys.stderr)
            print("the generated policy is invalid: fix bench/compile.py's generator", file=sys.stderr)
            return 1

    growth: dict[int, float | None] = {}
    previous: int | None = None
    for n in args.sizes:
        growth[n] = None if previous is None else (results[n] / results[previous]) / (n / previous)
        previous = n

    if args.json:
        report = {
            "tenants": {str(n): round(s, 6) for n, s in results.items()},
            "models": {str(n): round(s, 6) for n, s in results.items()},
            "per_unit": {str(n): s / n for n, s in results.items()},
            "growth": {str(n): None if g is None else round(g, 4) for n, g in growth.items()},
            "runs": {str(n): r for n, r in runs.items()},
            "goal": {"size": GOAL_SIZE, "seconds": GOAL_SECONDS},
        }
        print(json.dumps(report))
        return 0

    print(f"{'N (tenants = models)':>22}  {'seconds':>9}  {'s / unit':>10}  {'growth (<=1 linear)':>20}")
    for n in args.sizes:
        g = "-" if growth[n] is None else f"{growth[n]:.2f}"
        print(f"{n:>22}  {results[n]:>9.3f}  {results[n] / n:>10.6f}  {g:>20}")
    if GOAL_SIZE in results:
        verdict = "meets" if results[GOAL_SIZE] < GOAL_SECONDS else "MISSES"
        print(f"goal: N={GOAL_SIZE} under {GOAL_SECONDS:g} s -> {verdict} ({results[GOAL_SIZE]:.3f} s)")
    worst = max((g for g in growth.values() if g is not None), default=None)
    if worst is not None:
        print(f"worst growth {worst:.2f}: {'no worse than linear' if worst <= 1.0 else 'SUPER-LINEAR'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
