"""`meshgen` command line: parse arguments, call one library function, map errors to exit codes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from meshgen import __version__, output
from meshgen.compile import compile_policy
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
        files = output.serialize(compile_policy(policy), source=policy.as_posix(), version=__version__)
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


@app.command()
def version() -> None:
    """Print meshgen's version."""
    typer.echo(__version__)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
