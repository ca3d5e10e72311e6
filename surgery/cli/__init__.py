"""The `surgery` command line: one typer app, one module per command group."""

from surgery.cli.main import app, main

__all__ = ["app", "main"]
