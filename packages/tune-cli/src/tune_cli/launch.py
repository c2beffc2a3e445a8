"""Running recipes: in this process for one process, through torchrun for several.

``tune --nnodes 1 --nproc_per_node 2 full_finetune.py --config my.yaml`` and
``tune run --nproc_per_node 2 full_finetune --config my.yaml`` both end here. The arguments
before the recipe are torchrun's (parsed by torchrun's own parser, so every torchrun option
works); the recipe is a built-in name, with or without ``.py``, or the path of a recipe file.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import click


def builtin_recipes() -> dict[str, Path]:
    from tune_train.recipes import builtin_recipes  # light: no torch

    return builtin_recipes()


def resolve_recipe(name: str) -> Path:
    """A recipe file: an existing path as given, else a built-in recipe of that name.

    Raises:
        click.UsageError: If it is neither.
    """
    path = Path(name)
    if path.is_file():
        return path.resolve()
    builtins = builtin_recipes()
    stem = path.name.removesuffix(".py")
    if path.parent == Path(".") and stem in builtins:
        return builtins[stem]
    raise click.UsageError(
        f"recipe '{name}' is neither a file nor a built-in recipe "
        f"({', '.join(builtins)}); `tune recipe ls` lists them"
    )


def launch(argv: list[str], debug: bool = False) -> int:
    """Run ``[torchrun options] RECIPE [recipe arguments]``; returns the exit code."""
    if not argv or all(a.startswith("-") for a in argv):
        raise click.UsageError("name a recipe to run, e.g. `tune run full_finetune --config "
                               "alpaca_llama2_full_finetune` (`tune recipe ls` lists them)")
    resolve_recipe(_recipe_token(argv))  # a misspelt recipe fails before torch is imported
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed what was wrong
        raise click.exceptions.Exit(2) from e
    script_index = len(argv) - len(args.training_script_args) - 1
    recipe = resolve_recipe(args.training_script)
    recipe_args = list(args.training_script_args)
    if debug and "--debug" not in recipe_args:
        recipe_args.append("--debug")

    nproc = str(args.nproc_per_node)
    single = str(args.nnodes) in ("1", "1:1") and nproc in ("1",)
    if single:
        return _run_in_process(recipe, recipe_args)

    torchrun_argv = [*argv[:script_index], str(recipe), *recipe_args]
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    _quiet_torchrun_logs()
    if "OMP_NUM_THREADS" not in os.environ:
        # Split the cores between the local processes instead of oversubscribing them
        # (torchrun would pick 1 and print a banner about it).
        per_process = max(1, (os.cpu_count() or 1) // max(1, _int_or(nproc, 1)))
        os.environ["OMP_NUM_THREADS"] = str(per_process)
    try:
        run(parser.parse_args(torchrun_argv))
    except ChildFailedError as e:
        rank, first = e.get_first_failure()  # the root cause, not the ranks torn down after
        if first.exitcode is not None and first.exitcode < 0:
            click.echo(f"error: training process of rank {rank} was killed by signal "
                       f"{-first.exitcode}; the job stopped (resume_from_checkpoint: True "
                       "continues from the last checkpoint)", err=True)
            return 1
        click.echo(f"error: training process of rank {rank} failed; see the messages above",
                   err=True)
        return first.exitcode if first.exitcode and first.exitcode > 0 else 1
    return 0


# torchrun options that take no value; every other option before the recipe takes one.
_TORCHRUN_FLAGS = {"--standalone", "--no-python", "--no_python", "-m", "--module", "--run-path",
                   "--run_path", "--use-env", "--use_env", "--virtual-local-rank",
                   "--virtual_local_rank"}


def _recipe_token(argv: list[str]) -> str:
    """The recipe among torchrun's arguments, found without importing torch."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("-"):
            return token
        takes_value = token not in _TORCHRUN_FLAGS and "=" not in token
        i += 2 if takes_value else 1
    raise click.UsageError("name a recipe to run, e.g. `tune run full_finetune --config demo`")


def _run_in_process(recipe: Path, recipe_args: list[str]) -> int:
    # Built-in or copied and edited, a recipe runs like `python recipe.py ...` would.
    old_argv = sys.argv
    sys.argv = [str(recipe), *recipe_args]
    try:
        runpy.run_path(str(recipe), run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv


def _int_or(value: str, default: int) -> int:
    try:
        return int(value)
    except ValueError:  # "gpu", "auto", "cpu": torchrun decides
        return default


def _quiet_torchrun_logs() -> None:
    # torchrun logs every rank's start and teardown at INFO/WARNING; the recipe prints what
    # matters. TUNE_DEBUG=1 keeps them.
    if os.environ.get("TUNE_DEBUG") != "1":
        import logging

        logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
        os.environ.setdefault("LOGLEVEL", "ERROR")
