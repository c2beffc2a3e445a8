"""The `tune` command. Start-up must stay instant: nothing heavy is imported at module level;
each command imports what it needs inside its body.

Two ways in: click subcommands (`tune config cp ...`), and the torchrun-style launch
`tune --nnodes 1 --nproc_per_node 2 full_finetune.py --config my.yaml`, recognised before
click sees the arguments.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="tune-cli", prog_name="tune")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """tune: fine-tune Llama-2-class models with PyTorch.

    \b
    The tutorial, start to end:
      tune download meta-llama/Llama-2-7b --hf-token <TOKEN> --output-dir /tmp/llama2
      tune convert_checkpoint --checkpoint_path /tmp/llama2/consolidated.00.pth
      tune config cp alpaca_llama2_full_finetune my.yaml      (then edit my.yaml)
      tune --nnodes 1 --nproc_per_node 2 full_finetune.py --config my.yaml
      tune plot /tmp/alpaca-llama2-finetune
      tune generate --checkpoint <dir>/native_pytorch_model.pt --prompt "..."

    Try it offline in two minutes: tune run full_finetune --config demo
    """


# ----------------------------------------------------------------------------- config
@cli.group(context_settings=CONTEXT)
def config() -> None:
    """List, copy, show and validate training configs."""


@config.command("ls")
def config_ls() -> None:
    """List the built-in configs."""
    from tune_train.config import builtin_configs

    for name, path in builtin_configs().items():
        click.echo(f"{name:36s} {_first_comment(path)}")


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


@config.command("cp")
@click.argument("name")
@click.argument("destination", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def config_cp(name: str, destination: Path, force: bool) -> None:
    """Copy built-in config NAME to DESTINATION (a file, `.yaml` added if missing, or a folder)."""
    from tune_train.config import builtin_configs, resolve_config_path

    source = builtin_configs().get(name) or resolve_config_path(name)
    if destination.is_dir():
        destination = destination / source.name
    elif destination.suffix not in (".yaml", ".yml"):
        destination = destination.with_name(destination.name + ".yaml")
    _copy_new(source, destination, force)


def _copy_new(source: Path, destination: Path, force: bool) -> None:
    if destination.exists() and not force:
        raise click.ClickException(f"{destination} already exists; pass --force to overwrite it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f".{destination.name}.tmp")
    tmp.write_bytes(source.read_bytes())
    tmp.replace(destination)
    click.echo(f"copied {source.name} to {destination}")


@config.command("show", context_settings={"ignore_unknown_options": True})
@click.argument("name", required=False)
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("--keys", is_flag=True, help="List every key with its type, default and meaning.")
def config_show(name: str | None, overrides: tuple[str, ...], keys: bool) -> None:
    """Print config NAME (file or built-in) with every default filled in and overrides applied."""
    from tune_train.config import config_keys, dump_config, load_config

    if keys:
        for key, type_name, default, help_text in config_keys():
            click.echo(f"{key:34s} {type_name:30s} default {default}\n{'':34s} {help_text}")
        return
    if name is None:
        raise click.UsageError("name a config (or pass --keys)")
    click.echo(dump_config(load_config(name, list(overrides))), nl=False)


@config.command("validate", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def config_validate(name: str, overrides: tuple[str, ...]) -> None:
    """Check config NAME: keys, types, names of models/datasets/optimizers, and input files."""
    from tune_train.config import load_config
    from tune_train.validate import validate_config

    cfg = load_config(name, list(overrides))
    problems = validate_config(cfg)
    if problems:
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(1)
    click.echo(f"{name}: OK")


# ----------------------------------------------------------------------------- recipes
@cli.group(context_settings=CONTEXT)
def recipe() -> None:
    """List and copy training recipes (copy one to change its loop, then run it by path)."""


@recipe.command("ls")
def recipe_ls() -> None:
    """List the built-in recipes."""
    from tune_cli.launch import builtin_recipes

    for name, path in builtin_recipes().items():
        click.echo(f"{name:20s} {_docstring_line(path)}")


def _docstring_line(path: Path) -> str:
    text = path.read_text()
    start = text.find('"""')
    return text[start + 3 :].splitlines()[0].strip() if start >= 0 else ""


@recipe.command("cp")
@click.argument("name")
@click.argument("destination", type=click.Path(path_type=Path), default=Path("."))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def recipe_cp(name: str, destination: Path, force: bool) -> None:
    """Copy built-in recipe NAME into DESTINATION (a folder, or a file name ending in .py)."""
    from tune_cli.launch import builtin_recipes

    recipes = builtin_recipes()
    stem = name.removesuffix(".py")
    if stem not in recipes:
        raise click.ClickException(f"no built-in recipe '{name}'; choose from "
                                   f"{', '.join(recipes)}")
    if destination.suffix != ".py":
        destination.mkdir(parents=True, exist_ok=True)
        destination = destination / recipes[stem].name
    _copy_new(recipes[stem], destination, force)


# ----------------------------------------------------------------------------- run
@cli.command(context_settings={**CONTEXT, "ignore_unknown_options": True,
                               "allow_interspersed_args": False, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Run a recipe: tune run [TORCHRUN OPTIONS] RECIPE --config CONFIG [key=value ...]

    \b
    One process runs in place; --nproc_per_node N (and --nnodes, --rdzv-endpoint, ...) go
    to torchrun. RECIPE is a built-in name (full_finetune) or a recipe file you copied.
    """
    from tune_cli.launch import launch

    if not args or args[0] in ("-h", "--help"):
        click.echo(ctx.get_help())
        return
    sys.exit(launch(list(args), debug=_debug()))


# ----------------------------------------------------------------------------- plot
@cli.command(context_settings=CONTEXT)
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="PNG to write (default: OUTPUT_DIR/loss_curve.png).")
def plot(output_dir: Path, output: Path | None) -> None:
    """Draw loss and learning rate against step from OUTPUT_DIR/metrics.jsonl into a PNG."""
    from tune_train.plot import plot_metrics

    click.echo(f"wrote {plot_metrics(output_dir, output)}")


# ----------------------------------------------------------------------------- entry point
_TORCHRUN_FIRST = ("--nnodes", "--nproc_per_node", "--nproc-per-node", "--standalone",
                   "--rdzv", "--node_rank", "--node-rank", "--master", "--max_restarts",
                   "--max-restarts", "--monitor", "--start", "--role", "--log", "--redirects",
                   "--tee", "--local", "--run", "--no")


def _is_launch(argv: list[str]) -> bool:
    """The tutorial's form: torchrun options, then a recipe, with no subcommand."""
    if not argv or argv[0] in cli.commands:
        return False
    first = argv[0]
    return first.startswith(_TORCHRUN_FIRST) or first.endswith(".py") or first in _recipe_names()


def _recipe_names() -> set[str]:
    from tune_cli.launch import builtin_recipes

    return set(builtin_recipes())


def _debug() -> bool:
    return os.environ.get("TUNE_DEBUG") == "1"


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: one line on stderr and exit 1 for user errors (2 for usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv[:1] or os.environ.get("TUNE_DEBUG") == "1":
        os.environ["TUNE_DEBUG"] = "1"
        argv = [a for a in argv[:1] if a != "--debug"] + argv[1:]
    try:
        if _is_launch(argv):
            from tune_cli.launch import launch

            sys.exit(launch(argv, debug=_debug()))
        cli.main(args=argv, prog_name="tune", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - the one place errors become a line for people
        if _debug():
            raise
        click.echo(f"error: {_message(e)}", err=True)
        sys.exit(1)


def _message(error: Exception) -> str:
    """The user-facing line: our own errors carry it; anything else is named as a bug."""
    if type(error).__name__ in ("ConfigError", "RecipeError", "CheckpointError", "DataError",
                                "PlotError", "GenerationError", "EvalError"):
        return str(error)
    if isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError):
        return f"{error.strerror}: {error.filename}"
    if isinstance(error, ImportError) and "pip install" in str(error):
        return str(error)
    return (f"{type(error).__name__}: {error} (an unexpected error; rerun with --debug for the "
            "traceback and report it)")
