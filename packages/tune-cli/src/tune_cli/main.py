"""The `tune` command. Start-up must stay instant: nothing heavy is imported at module level;
each command imports what it needs inside its body.

Two ways in: click subcommands (`tune config cp ...`), and the torchrun-style launch
`tune --nnodes 1 --nproc_per_node 2 full_finetune.py --config my.yaml`, recognised before
click sees the arguments.
"""

from __future__ import annotations

import copy
import io
import os
import sys
from pathlib import Path

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_TOKEN_FLAGS = ("--hf-token", "--hf_token")


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="tune-cli", prog_name="tune")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """tune: fine-tune and post-train LLMs (Llama, Mistral, Qwen, ...) with PyTorch.

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
@click.option(*_TOKEN_FLAGS, "hf_token", default=None,
              help="Hugging Face access token (default: $HF_TOKEN or your `hf auth login`). "
              "Never printed or stored.")
@click.option("--ignore-patterns", "--ignore_patterns", "ignore_patterns", multiple=True,
              help="Glob of files to skip, e.g. '*.safetensors' (repeatable).")
@click.option("--revision", default=None, help="Branch, tag or commit.")
@click.option("--include-original", "--include_original", "include_original", is_flag=True,
              help="Also fetch Meta's original/*.pth when the repository has the same "
              "weights as safetensors (skipped by default).")
def download(repo_id_arg: str | None, repo_id: str | None, output_dir: Path,
             hf_token: str | None, ignore_patterns: tuple[str, ...], revision: str | None,
             include_original: bool) -> None:
    """Download a model repository from the Hugging Face Hub (re-running resumes)."""
    from tune_ckpt.cli import run_download

    repo = repo_id or repo_id_arg
    if not repo:
        raise click.UsageError("name the repository: tune download meta-llama/Llama-2-7b "
                               "--output-dir /tmp/llama2")
    run_download(repo, output_dir, hf_token=hf_token, ignore_patterns=list(ignore_patterns),
                 revision=revision, include_original=include_original)


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


@cli.command(context_settings=CONTEXT)
@click.option("--checkpoint", "checkpoint_path", type=click.Path(path_type=Path), required=True,
              help="The base model: a native checkpoint file or its folder (with "
              "tune_model.json).")
@click.option("--adapter", "adapter_path", type=click.Path(path_type=Path), required=True,
              help="A LoRA adapter folder in PEFT's format (adapter_config.json + "
              "adapter_model.safetensors), e.g. the one a LoRA run leaves in its output_dir.")
@click.option("--to", "target_format", type=click.Choice(["native", "hf"]), default="native",
              show_default=True, help="Output format.")
@click.option("--output-path", "--output_path", "-o", "output_path",
              type=click.Path(path_type=Path), required=True,
              help="native: a .pt / .safetensors file or a folder; hf: a folder.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Cast the merged weights (default: the base's dtype).")
@click.option("--force", is_flag=True, help="Overwrite existing output.")
def merge(checkpoint_path: Path, adapter_path: Path, target_format: str, output_path: Path,
          dtype: str | None, force: bool) -> None:
    """Fold a LoRA adapter into its base model and write the merged model.

    A QLoRA adapter is merged into the NF4-dequantised base it was trained on.
    """
    from tune_ckpt.merge import run_merge

    run_merge(checkpoint_path, adapter_path, output_path, target_format=target_format,
              dtype=dtype, force=force)


# ----------------------------------------------------------------------------- generate / eval
def _model_options(function):
    options = [
        click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
                     help="Weights file, checkpoint folder, or a training output_dir (its latest "
                     "checkpoint)."),
        click.option("--config", "config_name", default=None,
                     help="Or a training config: its output_dir and tokenizer are used (a "
                     "LoRA config's: its model_checkpoint with the adapter in output_dir)."),
        click.option("--adapter", type=click.Path(path_type=Path), default=None,
                     help="A LoRA adapter folder (PEFT format, e.g. a lora_finetune "
                     "output_dir) to apply to the --checkpoint base."),
        click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
                     help="tokenizer.model (default: beside the checkpoint or the run's)."),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto."),
        click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                     help="Compute dtype (default: the checkpoint's)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _load(checkpoint: Path | None, config_name: str | None, adapter: Path | None,
          tokenizer: Path | None, device: str, dtype: str | None):
    from tune_data import load_tokenizer
    from tune_models import DTYPES
    from tune_train.loading import load_model, resolve_checkpoint, resolve_tokenizer

    if checkpoint is None and config_name is None:
        raise click.UsageError("pass --checkpoint (a weights file or output_dir) or --config")
    if checkpoint is None:
        cfg = _config(config_name)
        checkpoint = Path(cfg.output_dir)
        if cfg.lora_rank is not None and cfg.model_checkpoint is not None:
            checkpoint, adapter = Path(cfg.model_checkpoint), adapter or Path(cfg.output_dir)
        tokenizer = tokenizer or Path(cfg.tokenizer_checkpoint)
    weights = resolve_checkpoint(checkpoint)
    model, _ = load_model(weights, device=device, dtype=DTYPES[dtype] if dtype else None,
                          adapter=adapter)
    return model, load_tokenizer(resolve_tokenizer(weights, tokenizer)), weights


def _config(config_name: str):
    from tune_train.config import load_config

    return load_config(config_name)


@cli.command(context_settings=CONTEXT)
@_model_options
@click.option("--prompt", "-p", "prompts", multiple=True,
              help="Prompt text (repeat for a batch).")
@click.option("--template", default="none", show_default=True,
              help="Wrap each prompt as an instruction: none, alpaca, demo.")
@click.option("--chat", is_flag=True,
              help="Send each prompt as a user turn in the model's chat format; the answer "
              "ends at the end-of-turn token.")
@click.option("--chat-template", "--chat_template", "chat_template", default=None,
              help="With --chat: llama2, llama3, chatml, mistral, gemma, or a .jinja / "
              "tokenizer_config.json file (default: the run's chat_template, else the "
              "model's own or its family's).")
@click.option("--system", default=None, help="With --chat: a system prompt.")
@click.option("--thinking/--no-thinking", "enable_thinking", default=None,
              help="With --chat: the chat template's enable_thinking switch (Qwen3: "
              "--no-thinking answers without reasoning); default: the run's enable_thinking, "
              "else the template's own default.")
@click.option("--interactive", is_flag=True,
              help="Chat turn by turn: read each user turn as a line from stdin until EOF, "
              "keeping the conversation.")
@click.option("--max-new-tokens", "--max_new_tokens", "max_new_tokens", default=256,
              show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=float,
              help="0 is greedy decoding.")
@click.option("--top-k", "--top_k", "top_k", type=int, default=None,
              help="Sample among the k most likely tokens (k >= 1).")
@click.option("--top-p", "--top_p", "top_p", type=float, default=None,
              help="Sample among the most likely tokens whose probabilities add up to p, "
              "0 < p <= 1.")
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the decode step: faster after a one-off compile "
                   "(on CPU it needs a C++ compiler).")
def generate(checkpoint, config_name, adapter, tokenizer, device, dtype, prompts, template,
             chat, chat_template, system, enable_thinking, interactive, max_new_tokens,
             temperature, top_k, top_p, seed, compile_) -> None:
    """Generate text from a checkpoint; prints each answer, then tokens/s on stderr."""
    import time

    from tune_data import TEMPLATES
    from tune_models import check_sampling
    from tune_models import generate as generate_tokens

    _check_option("--temperature", check_sampling, temperature=temperature)
    _check_option("--top-k", check_sampling, top_k=top_k)
    _check_option("--top-p", check_sampling, top_p=top_p)
    if template != "none" and template not in TEMPLATES:
        raise click.UsageError(f"unknown template '{template}'; choose none, "
                               f"{', '.join(TEMPLATES)}")
    chat = chat or interactive
    if chat and template != "none":
        raise click.UsageError("--template wraps plain prompts; with --chat the chat template "
                               "formats them (choose it with --chat-template)")
    if not chat and (chat_template is not None or system is not None
                     or enable_thinking is not None):
        raise click.UsageError("--chat-template, --system and --thinking/--no-thinking apply "
                               "to --chat")
    if not prompts and not interactive:
        raise click.UsageError("pass --prompt/-p (or --interactive to chat from stdin)")
    model, tok, weights = _load(checkpoint, config_name, adapter, tokenizer, device, dtype)

    def run(encoded: list[list[int]]) -> list[list[int]]:
        limit = model.config.max_seq_len - max(len(e) for e in encoded)
        if limit < 1:
            raise click.ClickException(f"the prompt fills the model's whole context "
                                       f"({model.config.max_seq_len} tokens); shorten it")
        return generate_tokens(model, encoded, min(max_new_tokens, limit),
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               stop_tokens=tok.stop_tokens, compile=compile_)

    def answer_of(out: list[int]) -> str:
        return tok.decode([t for t in out if t not in tok.stop_tokens])

    start = time.perf_counter()
    if interactive:
        new_tokens = _chat_interactively(
            tok, _chat_template(tok, chat_template, enable_thinking, config_name, weights),
            system, prompts, run, answer_of)
    else:
        if chat:
            from tune_data import chat_prompt

            template_ = _chat_template(tok, chat_template, enable_thinking, config_name,
                                       weights)
            encoded = [chat_prompt(tok, template_, _turns(system, [], p)) for p in prompts]
        else:
            texts = [p if template == "none" else TEMPLATES[template].render(
                {"instruction": p, "input": ""} if template == "alpaca" else _split_demo(p))
                for p in prompts]
            encoded = [tok.encode(t, add_bos=True) for t in texts]
        outputs = run(encoded)
        for prompt, out in zip(prompts, outputs):
            if len(prompts) > 1:
                click.echo(f"### {prompt}")
            click.echo(answer_of(out))
        new_tokens = sum(len(o) for o in outputs)
    elapsed = time.perf_counter() - start
    click.echo(f"[{weights}] {new_tokens} new tokens in {elapsed:.2f} s: "
               f"{new_tokens / max(elapsed, 1e-9):.1f} tokens/s", err=True)


def _chat_template(tok, name: str | None, enable_thinking: bool | None,
                   config_name: str | None, weights: Path):
    """--chat-template, else the training run's chat_template, else the model's default
    (its own template, else its family's: tune_model.json or the run's config names it);
    with --thinking/--no-thinking, else the run's enable_thinking."""
    from tune_train.loading import model_family_of, resolve_chat_template, resolve_enable_thinking
    from tune_train.registry import chat_template

    if config_name is not None:
        cfg = _config(config_name)
        name = cfg.chat_template if name is None else name
        enable_thinking = cfg.enable_thinking if enable_thinking is None else enable_thinking
    return chat_template(resolve_chat_template(weights, name), tok, model_family_of(weights),
                         resolve_enable_thinking(weights, enable_thinking))


def _turns(system: str | None, history: list[dict[str, str]], prompt: str
           ) -> list[dict[str, str]]:
    first = [{"role": "system", "content": system}] if system else []
    return [*first, *history, {"role": "user", "content": prompt}]


def _chat_interactively(tok, template, system, prompts, run, answer_of) -> int:
    """Each line of stdin (after any --prompt turns) is a user turn; the answers stay in the
    conversation. Returns the number of new tokens."""
    from tune_data import chat_prompt

    stdin = click.get_text_stream("stdin")
    history: list[dict[str, str]] = []
    new_tokens = 0
    lines = iter(prompts)
    while True:
        line = next(lines, None)
        if line is None:
            if stdin.isatty():
                click.echo("> ", nl=False, err=True)
            line = stdin.readline()
            if not line:
                return new_tokens
            line = line.rstrip("\n")
        if not line.strip():
            continue
        out = run([chat_prompt(tok, template, _turns(system, history, line))])[0]
        answer = answer_of(out)
        click.echo(answer)
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
        new_tokens += len(out)


def _check_option(option: str, check, *args, **kwargs):
    """Run a library check of a value; its ValueError becomes a usage error naming the option
    (the words are the library's: a Python caller reads the same)."""
    try:
        return check(*args, **kwargs)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=f"'{option}'") from None


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
@click.option("--limit", type=float, default=None,
              help="Documents per task (a whole number), or a fraction of them below 1.")
@click.option("--num-fewshot", "--num_fewshot", "num_fewshot", type=click.IntRange(min=0),
              default=None)
@click.option("--batch-size", "--batch_size", "batch_size", type=int, default=8, show_default=True)
@click.option("--perplexity", "perplexity_file", default=None,
              type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A UTF-8 text file: report perplexity over it (no lm-eval needed).")
@click.option("--max-seq-len", "--max_seq_len", "max_seq_len", type=int, default=None,
              help="Window length for perplexity (default: the model's).")
def eval_(checkpoint, config_name, adapter, tokenizer, device, dtype, tasks, include_path, limit,
          num_fewshot, batch_size, perplexity_file, max_seq_len) -> None:
    """Evaluate a checkpoint: lm-eval harness tasks and/or perplexity over a text file."""
    from tune_train.eval import (
        check_batch_size,
        check_limit,
        check_max_seq_len,
        read_text,
        resolve_max_seq_len,
    )

    if not tasks and perplexity_file is None:
        raise click.UsageError("pass --tasks (lm-eval) and/or --perplexity FILE")
    if not tasks:
        for option, value in (("--limit", limit), ("--num-fewshot", num_fewshot),
                              ("--include-path", include_path)):
            if value is not None:
                raise click.UsageError(f"{option} applies to lm-eval tasks: pass --tasks too")
    _check_option("--batch-size", check_batch_size, batch_size)
    _check_option("--limit", check_limit, limit)
    if max_seq_len is not None:  # the model's own limit is checked once it is loaded
        _check_option("--max-seq-len", check_max_seq_len, max_seq_len)
    text = read_text(perplexity_file) if perplexity_file is not None else None
    model, tok, weights = _load(checkpoint, config_name, adapter, tokenizer, device, dtype)
    max_seq_len = _check_option("--max-seq-len", resolve_max_seq_len, model, max_seq_len)
    if text is not None:
        from tune_train.eval import perplexity

        result = perplexity(model, tok, text, max_seq_len=max_seq_len, batch_size=batch_size)
        click.echo(f"perplexity {result.perplexity:.3f} (nll {result.nll:.6f} nats/token over "
                   f"{result.num_tokens:,} tokens of {perplexity_file})")
    if tasks:
        from tune_train.eval import evaluate

        names = [t.strip() for t in tasks.split(",") if t.strip()]
        # With --include-path only that folder is indexed: lm-eval's own catalogue takes
        # ~10 s to index and is not needed for local tasks.
        results = evaluate(model, tok, names, include_path=str(include_path) if include_path
                           else None, include_defaults=include_path is None,
                           limit=int(limit) if limit is not None and limit >= 1 else limit,
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
    tokenizer = registry.build_tokenizer(cfg)
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
    from tune_train.config_checks import validate_config

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
    """Draw training loss, validation loss (if the run validated) and learning rate against
    step from OUTPUT_DIR/metrics.jsonl into a PNG."""
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
    """Console-script entry: one line on stderr and exit 1 for user errors (2 for usage).

    What each error says and its exit status come from tune_train.errors (one place for the
    whole toolkit); click's own usage errors keep click's wording and exit 2. Every message
    (and, with --debug, the traceback) is written with access tokens replaced by ``***``.
    """
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
        shown = io.StringIO()
        e.show(file=shown)
        _write_error(shown.getvalue(), argv)
        sys.exit(e.exit_code)
    except click.Abort:
        _write_error("aborted\n", argv)
        sys.exit(1)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the one place errors become a line for people
        import traceback

        from tune_train.errors import explain

        message, status = explain(e)
        if isinstance(e, KeyboardInterrupt):
            _write_error(f"{message}\n", argv)
        elif _debug():
            _write_error("".join(traceback.format_exception(e)), argv)
        else:
            _write_error(f"error: {message}\n", argv)
        sys.exit(status)


def _write_error(text: str, argv: list[str]) -> None:
    from tune_ckpt.hub import hide_tokens, tokens_to_hide

    sys.stderr.write(hide_tokens(text, tokens_to_hide(*_flag_values(argv, _TOKEN_FLAGS))))
    sys.stderr.flush()


def _flag_values(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """The values given to any of ``flags`` (``--flag V`` and ``--flag=V``), found without
    parsing: an error may come before or during click's own parsing."""
    values = []
    for i, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if name in flags:
            if equals:
                values.append(value)
            elif i + 1 < len(argv):
                values.append(argv[i + 1])
    return values
