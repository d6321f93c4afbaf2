"""The `ctrflow` command (filled in as the steps land)."""

import click


@click.group()
def main() -> None:
    """ctrflow: validate, features, train, register, serve, monitor."""
