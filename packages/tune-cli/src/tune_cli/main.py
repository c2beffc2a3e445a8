"""The `tune` command. Start-up must stay instant: nothing heavy is imported at module level;
each command imports what it needs inside its body.

Two ways in: click subcommands (`tune config cp ...`), and the torchrun-style launch
`tune --nnodes 1 --nproc_per_node 2 full_finetune.py --config my.yaml`, recognised before
click sees the arguments.
"""

from __future__ import annotations

import copy
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


# ----------------------------------------------------------------------------- checkpoints
@cli.command(context_settings=CONTEXT)
@click.argument("repo_id_arg", metavar="REPO_ID", required=False)
@click.option("--repo_id", "--repo-id", "repo_id", help="Hub repository, e.g. "
              "meta-llama/Llama-2-7b (or give it as the first argument).")
@click.option("--output_dir", "--output-dir", "output_dir", type=click.Path(path_type=Path),
              required=True, help="Folder to download into.")
@click.option("--hf-token", "--hf_token", "hf_token", default=None,
              help="Hugging Face access token (default: $HF_TOKEN or your `hf auth login`). "
              "Never printed or stored.")
@click.option("--ignore-patterns", "--ignore_patterns", "ignore_patterns", multiple=True,
              help="Glob of files to skip, e.g. '*.safetensors' (repeatable).")
@click.option("--revision", default=None, help="Branch, tag or commit.")
def download(repo_id_arg: str | None, repo_id: str | None, output_dir: Path,
             hf_token: str | None, ignore_patterns: tuple[str, ...], revision: str | None) -> None:
    """Download a model repository from the Hugging Face Hub (re-running resumes)."""
    from tune_ckpt.cli import run_download

    repo = repo_id or repo_id_arg
    if not repo:
        raise click.UsageError("name the repository: tune download meta-llama/Llama-2-7b "
                               "--output-dir /tmp/llama2")
    run_download(repo, output_dir, hf_token=hf_token, ignore_patterns=list(ignore_patterns),
                 revision=revision)


def _convert_options(function):
    options = [
        click.option("--checkpoint_path", "--checkpoint-path", "checkpoint_path",
                     type=click.Path(path_type=Path), required=True,
                     help="A checkpoint file (e.g. consolidated.00.pth) or its folder."),
        click.option("--output_path", "--output-path", "-o", "output_path", default=None,
                     type=click.Path(path_type=Path),
                     help="Where to write (default: native_pytorch_model.pt beside the input "
                     "for Meta checkpoints)."),
        click.option("--from", "source_format", type=click.Choice(["meta", "hf", "native"]),
                     default=None, help="Input format (default: detected)."),
        click.option("--to", "target_format", type=click.Choice(["native", "hf", "meta"]),
                     default="native", show_default=True, help="Output format."),
        click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                     help="Cast the weights (default: keep)."),
        click.option("--force", is_flag=True, help="Overwrite existing output."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@cli.command("convert_checkpoint", context_settings=CONTEXT)
@_convert_options
def convert_checkpoint(checkpoint_path: Path, output_path: Path | None, source_format: str | None,
                       target_format: str, dtype: str | None, force: bool) -> None:
    """Convert a checkpoint between Meta, Hugging Face and tune's native format."""
    from tune_ckpt.cli import run_convert

    run_convert(checkpoint_path, source_format=source_format, target_format=target_format,
                output_path=output_path, dtype=dtype, force=force)


# The dash spelling works too, without a second line in `tune --help`.
_dash_alias = copy.copy(convert_checkpoint)
_dash_alias.hidden = True
cli.add_command(_dash_alias, "convert-checkpoint")


# ----------------------------------------------------------------------------- generate / eval
def _model_options(function):
    options = [
        click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
                     help="Weights file, checkpoint folder, or a training output_dir (its latest "
                     "checkpoint)."),
        click.option("--config", "config_name", default=None,
                     help="Or a training config: its output_dir and tokenizer are used."),
        click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
                     help="tokenizer.model (default: beside the checkpoint or the run's)."),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto."),
        click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                     help="Compute dtype (default: the checkpoint's)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _load(checkpoint: Path | None, config_name: str | None, tokenizer: Path | None,
          device: str, dtype: str | None):
    import torch

    from tune_data import Llama2Tokenizer
    from tune_train.loading import load_model, resolve_checkpoint, resolve_tokenizer

    if checkpoint is None and config_name is None:
        raise click.UsageError("pass --checkpoint (a weights file or output_dir) or --config")
    if checkpoint is None:
        from tune_train.config import load_config

        cfg = load_config(config_name)
        checkpoint = Path(cfg.output_dir)
        tokenizer = tokenizer or Path(cfg.tokenizer_checkpoint)
    weights = resolve_checkpoint(checkpoint)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        dtype or "")
    model, _ = load_model(weights, device=device, dtype=torch_dtype)
    return model, Llama2Tokenizer(resolve_tokenizer(weights, tokenizer)), weights


@cli.command(context_settings=CONTEXT)
@_model_options
@click.option("--prompt", "-p", "prompts", multiple=True, required=True,
              help="Prompt text (repeat for a batch).")
@click.option("--template", default="none", show_default=True,
              help="Wrap each prompt as an instruction: none, alpaca, demo.")
@click.option("--max-new-tokens", "--max_new_tokens", "max_new_tokens", default=256,
              show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="0 is greedy decoding.")
@click.option("--top-k", "--top_k", "top_k", type=click.IntRange(min=1), default=None)
@click.option("--top-p", "--top_p", "top_p", type=click.FloatRange(0.0, 1.0), default=None)
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the decode step: faster after a one-off compile "
                   "(on CPU it needs a C++ compiler).")
def generate(checkpoint, config_name, tokenizer, device, dtype, prompts, template,
             max_new_tokens, temperature, top_k, top_p, seed, compile_) -> None:
    """Generate text from a checkpoint; prints each answer, then tokens/s on stderr."""
    import time

    from tune_data import TEMPLATES
    from tune_models import generate as generate_tokens

    if template != "none" and template not in TEMPLATES:
        raise click.UsageError(f"unknown template '{template}'; choose none, "
                               f"{', '.join(TEMPLATES)}")
    model, tok, weights = _load(checkpoint, config_name, tokenizer, device, dtype)
    texts = [p if template == "none" else TEMPLATES[template].render(
        {"instruction": p, "input": ""} if template == "alpaca" else _split_demo(p))
        for p in prompts]
    encoded = [tok.encode(t, add_bos=True) for t in texts]
    limit = model.config.max_seq_len - max(len(e) for e in encoded)
    if limit < 1:
        raise click.ClickException(f"the prompt fills the model's whole context "
                                   f"({model.config.max_seq_len} tokens); shorten it")
    start = time.perf_counter()
    outputs = generate_tokens(model, encoded, min(max_new_tokens, limit),
                              temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                              stop_tokens=tok.eos_id, compile=compile_)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs):
        answer = tok.decode([t for t in out if t != tok.eos_id])
        if len(prompts) > 1:
            click.echo(f"### {prompt}")
        click.echo(answer)
    new_tokens = sum(len(o) for o in outputs)
    click.echo(f"[{weights}] {new_tokens} new tokens in {elapsed:.2f} s: "
               f"{new_tokens / max(elapsed, 1e-9):.1f} tokens/s", err=True)


def _split_demo(prompt: str) -> dict[str, str]:
    instruction, sep, text = prompt.partition(":")
    if not sep:
        raise click.UsageError("demo prompts look like 'Reverse: tune' or 'Add: 12+30'")
    return {"instruction": instruction.strip(), "input": text.strip()}


@cli.command("eval", context_settings=CONTEXT)
@_model_options
@click.option("--tasks", default=None, help="Comma-separated lm-eval tasks, e.g. "
              "hellaswag,arc_easy (needs the eval extra: pip install 'tune-train[eval]').")
@click.option("--include-path", "--include_path", "include_path", default=None,
              type=click.Path(path_type=Path),
              help="Folder of your own lm-eval task YAMLs (then only those are indexed).")
@click.option("--limit", type=float, default=None, help="Documents per task (or a fraction).")
@click.option("--num-fewshot", "--num_fewshot", "num_fewshot", type=int, default=None)
@click.option("--batch-size", "--batch_size", "batch_size", type=int, default=8, show_default=True)
@click.option("--perplexity", "perplexity_file", type=click.Path(path_type=Path), default=None,
              help="A text file: report perplexity over it (no lm-eval needed).")
@click.option("--max-seq-len", "--max_seq_len", "max_seq_len", type=int, default=None,
              help="Window length for perplexity (default: the model's).")
def eval_(checkpoint, config_name, tokenizer, device, dtype, tasks, include_path, limit,
          num_fewshot, batch_size, perplexity_file, max_seq_len) -> None:
    """Evaluate a checkpoint: lm-eval harness tasks and/or perplexity over a text file."""
    if not tasks and perplexity_file is None:
        raise click.UsageError("pass --tasks (lm-eval) and/or --perplexity FILE")
    model, tok, weights = _load(checkpoint, config_name, tokenizer, device, dtype)
    if perplexity_file is not None:
        from tune_train.eval import perplexity

        result = perplexity(model, tok, perplexity_file.read_text(), max_seq_len=max_seq_len,
                            batch_size=batch_size)
        click.echo(f"perplexity {result.perplexity:.3f} (nll {result.nll:.4f} nats/token over "
                   f"{result.num_tokens:,} tokens of {perplexity_file})")
    if tasks:
        from tune_train.eval import evaluate

        names = [t.strip() for t in tasks.split(",") if t.strip()]
        # With --include-path only that folder is indexed: lm-eval's own catalogue takes
        # ~10 s to index and is not needed for local tasks.
        results = evaluate(model, tok, names, include_path=str(include_path) if include_path
                           else None, include_defaults=include_path is None,
                           limit=int(limit) if limit and limit >= 1 else limit,
                           num_fewshot=num_fewshot, batch_size=batch_size)
        for task, metrics in results["results"].items():
            shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                              if isinstance(v, float) and "stderr" not in k)
            click.echo(f"{task}: {shown}")


# ----------------------------------------------------------------------------- data
@cli.group(context_settings=CONTEXT)
def data() -> None:
    """Look at a config's training data before training on it."""


@data.command("show", context_settings={"ignore_unknown_options": True})
@click.argument("config_name")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("--index", "-i", "indices", type=int, multiple=True, default=(0,),
              show_default=True, help="Sample(s) to print.")
@click.option("--ids", is_flag=True, help="Show token ids too.")
def data_show(config_name: str, overrides: tuple[str, ...], indices: tuple[int, ...],
              ids: bool) -> None:
    """Print samples of CONFIG's dataset decoded, with the tokens that take no loss marked."""
    from tune_data import render_sample

    dataset = _build_dataset(config_name, overrides)
    for i in indices:
        click.echo(render_sample(dataset, i, show_ids=ids, color=sys.stdout.isatty()))


@data.command("stats", context_settings={"ignore_unknown_options": True})
@click.argument("config_name")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def data_stats(config_name: str, overrides: tuple[str, ...]) -> None:
    """Counts, lengths, truncated and dropped samples, and samples with no loss tokens."""
    from tune_data import describe

    click.echo(describe(_build_dataset(config_name, overrides)))


def _build_dataset(config_name: str, overrides: tuple[str, ...]):
    from tune_train import registry
    from tune_train.config import load_config

    cfg = load_config(config_name, list(overrides))
    tokenizer = registry.lookup(registry.TOKENIZERS, cfg.tokenizer, "tokenizer")(
        cfg.tokenizer_checkpoint)
    return registry.build_dataset(cfg, tokenizer,
                                  warn=lambda line: click.echo(f"warning: {line}", err=True))


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
