"""The `tune` command group. Start-up must stay instant: import nothing heavy at module level."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tune-cli", prog_name="tune")
def cli() -> None:
    """tune: fine-tune Llama-2-class models with PyTorch."""


def main() -> None:
    cli()
