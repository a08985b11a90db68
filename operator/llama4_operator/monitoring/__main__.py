"""`python -m llama4_operator.monitoring [--check] [--root DIR]`: regenerate or check."""

from __future__ import annotations

from pathlib import Path

import click

from llama4_operator.monitoring import generate


@click.command()
@click.option("--check", is_flag=True, help="Fail if a committed file differs; write nothing.")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Repository root.",
)
def main(check: bool, root: Path) -> None:
    """Write the Grafana dashboards and Prometheus rules under monitoring/ and the chart."""
    if check:
        drifted = generate.stale(root)
        if drifted:
            names = ", ".join(str(p) for p in drifted)
            raise click.ClickException(
                f"out of date: {names}; run `python -m llama4_operator.monitoring`"
            )
        click.echo("monitoring files are up to date")
        return
    for path in generate.write(root):
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
