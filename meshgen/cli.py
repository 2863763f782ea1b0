"""`meshgen` command line: parse arguments, call one library function, map errors to exit codes."""

from __future__ import annotations

import contextlib
import enum
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from meshgen import __version__, output
from meshgen import compile as compiler
from meshgen.errors import MeshgenError, PolicyError
from meshgen.policy import load_policy
from meshgen.policy.model import Policy

app = typer.Typer(no_args_is_help=True, add_completion=False, help="LLM traffic as code.")

PolicyArg = Annotated[Path, typer.Argument(help="The policy file.")]


def _fail(error: MeshgenError) -> typer.Exit:
    if isinstance(error, PolicyError):
        for problem in error.problems:
            typer.echo(str(problem), err=True)
        typer.echo(f"{len(error.problems)} problem(s); nothing written.", err=True)
    else:
        typer.echo(f"meshgen: {error}", err=True)
    return typer.Exit(error.exit_code)


class BuildTarget(enum.StrEnum):
    envoy = "envoy"
    istio = "istio"


@app.command()
def build(
    policy: PolicyArg = Path("policies/lab.yaml"),
    out: Annotated[Path, typer.Option("-o", "--out", help="Output directory.")] = Path("generated"),
    check: Annotated[bool, typer.Option("--check", help="Write nothing; exit 3 if OUT is stale.")] = False,
    target: Annotated[
        BuildTarget | None,
        typer.Option("--target", help="Only this target; the other's files in OUT stay as they are."),
    ] = None,
) -> None:
    """Compile POLICY into Envoy bootstraps, the data-plane service's config and Istio manifests under OUT."""
    try:
        _, files = compiler.build(policy, version=__version__, targets=(target.value,) if target else compiler.TARGETS)
        if target is not None and (out / output.MARKER).exists():
            kept = {p: t for p, t in output.read_tree(out).items() if compiler.target_of(p) != target.value}
            files = kept | files
        if check:
            output.check(out, files)
            typer.echo(f"{out} is up to date ({len(files)} files).")
        else:
            output.write(out, files)
            typer.echo(f"wrote {len(files)} files to {out}")
    except MeshgenError as error:
        raise _fail(error) from None


@app.command()
def validate(policy: PolicyArg) -> None:
    """Check POLICY and report every problem, writing nothing."""
    try:
        load_policy(policy)
    except MeshgenError as error:
        raise _fail(error) from None
    typer.echo(f"{policy}: ok")


@app.command()
def schema() -> None:
    """Print the JSON Schema of the policy file (for editors)."""
    typer.echo(json.dumps(Policy.model_json_schema(by_alias=True), indent=2, sort_keys=True))


@app.command(
    "ext-proc",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def ext_proc_cmd(ctx: typer.Context) -> None:
    """Run the data-plane service (same as `python -m ext_proc`); try `meshgen ext-proc --help`."""
    from ext_proc.main import main

    raise typer.Exit(main(list(ctx.args)))


lab_app = typer.Typer(no_args_is_help=True, help="Run the gateway on this machine from generated/local/.")
app.add_typer(lab_app, name="lab")
chaos_app = typer.Typer(no_args_is_help=True, help="Switch the policy's chaos faults in the running lab's Envoys.")
app.add_typer(chaos_app, name="chaos")

GeneratedOpt = Annotated[Path, typer.Option("-g", "--generated", help="generated/ dir; rebuilt when stale.")]
RunDirOpt = Annotated[Path, typer.Option("--run-dir", help="The lab's state and logs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@lab_app.command("up")
def lab_up(
    policy: PolicyArg = Path("policies/lab.yaml"),
    region: Annotated[list[str] | None, typer.Option("--region", "-r", help="Only this region (repeatable).")] = None,
    generated: GeneratedOpt = Path("generated"),
    run_dir: RunDirOpt = Path(".lab"),
    prometheus: Annotated[
        bool, typer.Option("--prometheus/--no-prometheus", help="Run Prometheus too, when it is installed.")
    ] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every process to be healthy.")] = 90.0,
) -> None:
    """Start mock providers, the data-plane service and each region's Envoy in the background, supervised
    (restarted when they exit); return once all are healthy. Idempotent."""
    from meshgen.lab import control

    try:
        result = control.up(
            policy, generated=generated, run_dir=run_dir, regions=region or (), prometheus=prometheus, timeout=timeout
        )
    except MeshgenError as error:
        raise _fail(error) from None
    info = control.status(run_dir)
    pid = info["supervisor"]["pid"] if info["running"] else "?"
    if result.already_running:
        typer.echo(f"lab already running for {result.plan.policy} in {result.plan.run_dir}/ (supervisor pid {pid}).")
        if result.stale:
            typer.echo(  # the running Envoys keep the config they started with
                "It runs an older build of the policy; `meshgen lab down && meshgen lab up` applies the new one."
            )
    else:
        typer.echo(f"lab up for {policy} (supervisor pid {pid}; logs in {result.plan.run_dir}/).")
    typer.echo(f"`meshgen lab status` shows it, `meshgen lab down` stops it.\n\n{control.urls_text(info)}")


@lab_app.command("status")
def lab_status(run_dir: RunDirOpt = Path(".lab"), as_json: JsonOpt = False) -> None:
    """Each process's state, pid and restarts; each region's gateway URL; the lab-only demo API keys.
    Exit 1 when no lab runs."""
    from meshgen.lab import control

    info = control.status(run_dir)
    typer.echo(json.dumps(info, indent=2) if as_json else control.format_status(info))
    raise typer.Exit(0 if info["running"] else 1)


@lab_app.command("down")
def lab_down(run_dir: RunDirOpt = Path(".lab")) -> None:
    """Stop the supervisor and every process of the lab (SIGTERM, then SIGKILL). Idempotent."""
    from meshgen.lab import control

    stopped = control.down(run_dir)
    typer.echo("lab stopped." if stopped else f"no lab running in {run_dir}/.")


@lab_app.command("logs")
def lab_logs(
    process: Annotated[
        str | None, typer.Argument(help="mocks, service, envoy-<region>, prometheus or supervisor.")
    ] = None,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new lines until Ctrl-C.")] = False,
    lines: Annotated[int, typer.Option("-n", "--lines", help="Last N lines of each log (0: all).")] = 50,
    run_dir: RunDirOpt = Path(".lab"),
) -> None:
    """Print a process's log (every process's, prefixed, without PROCESS)."""
    from meshgen.lab import control

    paths = control.log_paths(run_dir)
    if process is not None:
        if process not in paths:
            typer.echo(f"meshgen: no process {process!r}; processes: {', '.join(paths)}", err=True)
            raise typer.Exit(1)
        paths = {process: paths[process]}
    prefix = process is None
    for name, path in paths.items():
        for line in control.tail_lines(path, lines):
            typer.echo(f"{name:<14}| {line}" if prefix else line)
    if follow:
        with contextlib.suppress(KeyboardInterrupt):
            for _ in control.follow_logs(paths, typer.echo, prefix=prefix):
                pass


@lab_app.command("demo")
def lab_demo(
    policy: PolicyArg = Path("policies/lab.yaml"),
    region: Annotated[str, typer.Option("--region", "-r", help="The region to send through.")] = "us-east",
    generated: GeneratedOpt = Path("generated"),
    run_dir: RunDirOpt = Path(".lab"),
) -> None:
    """Send a few requests through the lab and print what happened; exit 1 if any surprised. Uses the lab that
    `meshgen lab up` runs in RUN_DIR, else brings one up for the demo only."""
    from meshgen.lab.demo import demo, demo_running, format_table
    from meshgen.lab.run import Lab

    try:
        results = demo_running(run_dir, region)
        if results is None:
            results = demo(Lab(policy, generated=generated, regions=[region], run_dir=run_dir), region)
    except MeshgenError as error:
        raise _fail(error) from None
    typer.echo(format_table(results))
    failed = sum(not r.ok for r in results)
    typer.echo(f"\n{len(results) - failed}/{len(results)} as expected (logs in {run_dir}/).")
    raise typer.Exit(1 if failed else 0)


FaultArg = Annotated[str, typer.Argument(help="A fault of the policy's chaos: section.")]
ChaosRegionOpt = Annotated[list[str] | None, typer.Option("--region", "-r", help="Only this region (repeatable).")]


def _chaos_switch(fault: str, on: bool, region: list[str] | None, run_dir: Path) -> None:
    from meshgen.lab import chaos

    try:
        done = chaos.switch(run_dir, fault, on, region or ())
    except MeshgenError as error:
        raise _fail(error) from None
    for name, values in done.items():
        typer.echo(f"{name}: {', '.join(f'{k}={v}' for k, v in values.items())}")


@chaos_app.command("on")
def chaos_on(fault: FaultArg, region: ChaosRegionOpt = None, run_dir: RunDirOpt = Path(".lab")) -> None:
    """Switch FAULT on at the policy's percent (every region unless --region)."""
    _chaos_switch(fault, True, region, run_dir)


@chaos_app.command("off")
def chaos_off(fault: FaultArg, region: ChaosRegionOpt = None, run_dir: RunDirOpt = Path(".lab")) -> None:
    """Switch FAULT off (0 %)."""
    _chaos_switch(fault, False, region, run_dir)


@chaos_app.command("status")
def chaos_status(region: ChaosRegionOpt = None, run_dir: RunDirOpt = Path(".lab"), as_json: JsonOpt = False) -> None:
    """Which faults are on, per region, as each Envoy's runtime says."""
    from meshgen.lab import chaos

    try:
        info = chaos.status(run_dir, region or ())
    except MeshgenError as error:
        raise _fail(error) from None
    typer.echo(json.dumps(info, indent=2) if as_json else chaos.format_status(info))


@app.command()
def version() -> None:
    """Print meshgen's version."""
    typer.echo(__version__)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
