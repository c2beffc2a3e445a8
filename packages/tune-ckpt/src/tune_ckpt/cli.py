"""The ``tune-ckpt`` command: ``tune-ckpt download ...`` and ``tune-ckpt convert ...``.

The command bodies are plain functions (:func:`run_download`, :func:`run_convert`) that raise
:class:`CheckpointError`, so other front ends (tune-cli's click group) call them directly and
print errors their own way. Heavy modules (torch, huggingface_hub) load inside them, so
``tune-ckpt --help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

from tune_ckpt.errors import CheckpointError


def run_download(
    repo_id: str,
    output_dir: str | os.PathLike,
    hf_token: str | None = None,
    ignore_patterns: Sequence[str] | None = None,
    revision: str | None = None,
    quiet: bool = False,
    include_original: bool = False,
) -> Path:
    """Download a Hub repository and print where it went (the body of ``tune-ckpt download``).

    Args:
        repo_id: ``owner/name``.
        output_dir: Folder to download into.
        hf_token: Access token (surrounding whitespace is ignored); None falls back to
            HF_TOKEN or the stored login.
        ignore_patterns: Glob patterns of files to skip (they replace the default skip of a
            duplicate ``original/*.pth``).
        revision: Branch, tag or commit.
        quiet: Hide progress bars.
        include_original: Fetch Meta's ``original/*.pth`` even beside safetensors.

    Returns:
        The output folder.

    Raises:
        CheckpointError: With the one line to show the user.
    """
    from tune_ckpt.hub import clean_token, download

    if hf_token is not None:
        hf_token = clean_token(hf_token, "the --hf-token value")
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    with _exit_on_ctrl_c(Path(output_dir).expanduser()):
        path = download(repo_id, output_dir, token=hf_token, ignore_patterns=ignore_patterns,
                        revision=revision, include_original=include_original, notify=print,
                        progress=not quiet)
    print(f"Downloaded {repo_id} to {path}")
    return path


@contextlib.contextmanager
def _exit_on_ctrl_c(output_dir: Path) -> Iterator[None]:
    """Make Ctrl-C end a download at once, leaving no partial file behind.

    huggingface_hub downloads files in worker threads and, on KeyboardInterrupt, waits for
    them to finish, so the first Ctrl-C would seem to do nothing until every transfer ends.
    Exiting straight away is safe: finished files are complete and recorded, so the next run
    skips them. The partial files of this run (``*.incomplete`` under the hub's bookkeeping
    folder) are removed first: current huggingface_hub versions never reuse them.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    partial_dir = output_dir / ".cache" / "huggingface" / "download"
    before = set(partial_dir.glob("**/*.incomplete"))

    def stop(signum, frame):
        for partial in set(partial_dir.glob("**/*.incomplete")) - before:
            partial.unlink(missing_ok=True)
        sys.stdout.flush()
        print("tune-ckpt: download interrupted; run the same command again to finish it "
              "(completed files are not fetched again)", file=sys.stderr, flush=True)
        os._exit(130)

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_convert(
    checkpoint_path: str | os.PathLike,
    source_format: str | None = None,
    target_format: str = "native",
    output_path: str | os.PathLike | None = None,
    dtype: str | None = None,
    force: bool = False,
    max_shard_size: str = "5GB",
    quiet: bool = False,
) -> Path:
    """Convert a checkpoint and print what was written (the body of ``tune-ckpt convert``).

    Args:
        checkpoint_path: Checkpoint file or folder (``D/consolidated.00.pth`` finds every
            shard and params.json in D).
        source_format: "meta", "hf" or "native"; None detects it.
        target_format: "native", "hf" or "meta".
        output_path: Output file (native) or folder (hf, meta); default beside the input.
        dtype: "bf16", "fp16" or "fp32" to cast the weights.
        force: Overwrite existing outputs.
        max_shard_size: Largest HF shard, e.g. "5GB".
        quiet: Hide progress bars.

    Returns:
        The native file, or the hf / meta folder, written.

    Raises:
        CheckpointError: With the one line to show the user.
    """
    from tune_ckpt.conversion import convert
    from tune_ckpt.names import MODEL_ARGS_FILE

    out = convert(
        checkpoint_path, source_format=source_format, target_format=target_format,
        output_path=output_path, dtype=dtype, force=force, max_shard_size=max_shard_size,
        progress=not quiet,
    )
    if target_format == "native":
        print(f"Wrote {out} (model shape in {out.parent / MODEL_ARGS_FILE})")
    else:
        print(f"Wrote {target_format} checkpoint to {out}")
    return out


def _add_debug(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the full traceback on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune-ckpt",
        description="Download Llama 2 / 3.x, Mistral and Qwen2.5 checkpoints from the Hugging "
                    "Face Hub and convert them between the Meta, Hugging Face and native "
                    "layouts.",
    )
    _add_debug(parser, False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dl = commands.add_parser(
        "download", help="download a model repository from the Hugging Face Hub",
        description="Download a Hub repository into a folder (without Meta's duplicate "
                    "original/*.pth weights when safetensors are there). Re-running after an "
                    "interruption fetches only what is missing.",
    )
    dl.add_argument("repo_id", metavar="REPO_ID", help="owner/name, e.g. meta-llama/Llama-2-7b")
    dl.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True,
                    help="folder to download into")
    dl.add_argument("--hf-token", "--hf_token", dest="hf_token", default=None,
                    help="access token (default: HF_TOKEN or the stored `hf auth login`)")
    dl.add_argument("--ignore-patterns", "--ignore_patterns", dest="ignore_patterns",
                    nargs="*", default=None, metavar="GLOB",
                    help="repository files to skip, e.g. '*.safetensors'")
    dl.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    dl.add_argument("--include-original", "--include_original", dest="include_original",
                    action="store_true",
                    help="also fetch Meta's original/*.pth when the repository has the same "
                         "weights as safetensors (skipped by default)")
    dl.add_argument("--quiet", action="store_true", help="hide progress bars")
    _add_debug(dl, argparse.SUPPRESS)

    cv = commands.add_parser(
        "convert", help="convert a checkpoint (Meta, Hugging Face, native)",
        description="Convert a checkpoint tensor by tensor (bounded memory). The default "
                    "output is native_pytorch_model.pt beside the checkpoint.",
    )
    cv.add_argument("--checkpoint-path", "--checkpoint_path", dest="checkpoint_path",
                    required=True, help="checkpoint file or folder, e.g. D/consolidated.00.pth")
    cv.add_argument("--from", dest="source_format", choices=["meta", "hf", "native"],
                    default=None, help="source format (default: detected)")
    cv.add_argument("--to", dest="target_format", choices=["native", "hf", "meta"],
                    default="native", help="target format (default: native)")
    cv.add_argument("--output-path", "--output_path", dest="output_path", default=None,
                    help="native: a .pt or .safetensors file; hf/meta: a folder")
    cv.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="cast the weights (default: keep)")
    cv.add_argument("--max-shard-size", "--max_shard_size", dest="max_shard_size",
                    default="5GB", help="largest Hugging Face shard (default: 5GB)")
    cv.add_argument("--force", action="store_true", help="overwrite existing output files")
    cv.add_argument("--quiet", action="store_true", help="hide progress bars")
    _add_debug(cv, argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tune-ckpt`` console script; returns the exit status.

    Every error becomes one line on stderr (the traceback with ``--debug``), with any access
    token in it replaced by ``***``.
    """
    args = build_parser().parse_args(argv)
    try:
        if args.command == "download":
            run_download(args.repo_id, args.output_dir, hf_token=args.hf_token,
                         ignore_patterns=args.ignore_patterns, revision=args.revision,
                         quiet=args.quiet, include_original=args.include_original)
        else:
            run_convert(args.checkpoint_path, source_format=args.source_format,
                        target_format=args.target_format, output_path=args.output_path,
                        dtype=args.dtype, force=args.force, max_shard_size=args.max_shard_size,
                        quiet=args.quiet)
    except KeyboardInterrupt:
        print("tune-ckpt: interrupted; no output file was left half-written", file=sys.stderr)
        return 130
    except Exception as e:
        _report(e, args)
        return 1
    return 0


def _report(error: Exception, args: argparse.Namespace) -> None:
    from tune_ckpt.hub import hide_tokens, tokens_to_hide

    if args.debug:
        text = "".join(traceback.format_exception(error))
    elif isinstance(error, CheckpointError):
        text = f"tune-ckpt: error: {error}\n"
    else:  # a bug, not bad input: still one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        text = (f"tune-ckpt: error: unexpected {type(error).__name__}: {first} "
                "(run again with --debug for the traceback)\n")
    sys.stderr.write(hide_tokens(text, tokens_to_hide(getattr(args, "hf_token", None))))


def console_main() -> None:
    """The ``tune-ckpt`` console script: :func:`main`, then exit without interpreter teardown.

    Unloading torch at exit takes 0.6-0.8 s and does nothing for a finished command (every
    file is already fsync'd and closed), so skip it. Only for the console script: never call
    this from a process that has other work to do.
    """
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    console_main()
