"""`meshgen` command line: parse arguments, call one library function, map errors to exit codes."""

from __future__ import annotations

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


@app.command()
def build(
    policy: PolicyArg = Path("policies/lab.yaml"),
    out: Annotated[Path, typer.Option("-o", "--out", help="Output directory.")] = Path("generated"),
    check: Annotated[bool, typer.Option("--check", help="Write nothing; exit 3 if OUT is stale.")] = False,
) -> None:
    """Compile POLICY into Envoy bootstraps and the data-plane service's config under OUT."""
    try:
        _, files = compiler.build(policy, version=__version__)
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

GeneratedOpt = Annotated[Path, typer.Option("-g", "--generated", help="generated/ dir; rebuilt when stale.")]
RunDirOpt = Annotated[Path, typer.Option("--run-dir", help="Where the logs go.")]


@lab_app.command("up")
def lab_up(
    policy: PolicyArg = Path("policies/lab.yaml"),
    region: Annotated[list[str] | None, typer.Option("--region", "-r", help="Only this region (repeatable).")] = None,
    generated: GeneratedOpt = Path("generated"),
    run_dir: RunDirOpt = Path(".lab"),
) -> None:
    """Run mock providers, the data-plane service and each region's Envoy until Ctrl-C."""
    from meshgen.lab.demo import try_it
    from meshgen.lab.run import Lab, up

    def ready(lab: Lab) -> None:
        typer.echo(f"lab up for {policy} (logs in {run_dir}/); Ctrl-C stops it.\n\n{try_it(lab)}")

    try:
        gone = up(Lab(policy, generated=generated, regions=region or (), run_dir=run_dir), ready)
    except MeshgenError as error:
        raise _fail(error) from None
    if gone:
        typer.echo(f"stopped: {', '.join(gone)} exited on its own; see {run_dir}/", err=True)
        raise typer.Exit(1)
    typer.echo("lab stopped.")


@lab_app.command("demo")
def lab_demo(
    policy: PolicyArg = Path("policies/lab.yaml"),
    region: Annotated[str, typer.Option("--region", "-r", help="The region to send through.")] = "us-east",
    generated: GeneratedOpt = Path("generated"),
    run_dir: RunDirOpt = Path(".lab"),
) -> None:
    """Bring the lab up, send a few requests through it, print what happened; exit 1 if any surprised."""
    from meshgen.lab.demo import demo, format_table
    from meshgen.lab.run import Lab

    try:
        results = demo(Lab(policy, generated=generated, regions=[region], run_dir=run_dir), region)
    except MeshgenError as error:
        raise _fail(error) from None
    typer.echo(format_table(results))
    failed = sum(not r.ok for r in results)
    typer.echo(f"\n{len(results) - failed}/{len(results)} as expected (logs in {run_dir}/).")
    raise typer.Exit(1 if failed else 0)


@app.command()
def version() -> None:
    """Print meshgen's version."""
    typer.echo(__version__)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
