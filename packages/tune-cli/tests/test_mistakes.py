"""Ordinary mistakes with `tune generate`, `tune eval` and `tune plot`, through the real `tune`
executable: each gets its own one-line message (exit 1, or 2 for a bad option), never
"an unexpected error", never junk output."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

TUNE = str(Path(sys.executable).with_name("tune"))


def tune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TUNE, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny native checkpoint with the demo tokenizer beside it."""
    import torch

    from tune_ckpt import save_native
    from tune_data import SentencePieceTokenizer
    from tune_models import Decoder, DecoderConfig

    from train_helpers import make_demo_files

    folder = tmp_path_factory.mktemp("model")
    tokenizer = SentencePieceTokenizer(make_demo_files(folder, records=10)["tokenizer"])
    config = DecoderConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2,
                          n_kv_heads=1, multiple_of=16, max_seq_len=64)
    torch.manual_seed(0)
    model = Decoder(config)
    model.init_weights(std=0.1)
    return save_native(model.state_dict(), folder / "native_pytorch_model.pt",
                       model_args=dataclasses.asdict(config))


def _one_problem(result: subprocess.CompletedProcess, status: int, line: str) -> None:
    assert result.returncode == status, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr
    assert [x for x in result.stderr.splitlines() if "rror" in x] == [line]


@pytest.mark.parametrize("option, value, message", [
    # NaN printed junk (every logit NaN); top_p 0 or NaN ended as "an unexpected error".
    ("--temperature", "nan", "temperature must be a finite number >= 0 (0 = greedy), got nan"),
    ("--top-p", "0", "top_p must be a number in (0, 1] (1 keeps every token), got 0.0"),
    ("--top-p", "nan", "top_p must be a number in (0, 1] (1 keeps every token), got nan"),
    ("--top-k", "0", "top_k must be a whole number >= 1, got 0"),
])
def test_generate_refuses_sampling_settings_that_give_junk(checkpoint, option, value, message):
    result = tune("generate", "--checkpoint", str(checkpoint), "-p", "Sort: cab",
                  "--temperature", "0.8", option, value, "--max-new-tokens", "4")
    _one_problem(result, 2, f"Error: Invalid value for '{option}': {message}")
    assert result.stdout == ""


@pytest.mark.parametrize("args, message", [
    # --batch-size -2 reported "perplexity 1.000"; --max-seq-len 0 silently used the model's.
    (["--batch-size", "-2"],
     "Invalid value for '--batch-size': batch_size must be a whole number >= 1, got -2"),
    (["--max-seq-len", "0"],
     "Invalid value for '--max-seq-len': max_seq_len must be a whole number >= 1, got 0"),
    (["--max-seq-len", "65"],
     "Invalid value for '--max-seq-len': max_seq_len 65 exceeds the model's max_seq_len 64"),
    (["--limit", "3"], "--limit applies to lm-eval tasks: pass --tasks too"),
    (["--tasks", "arc_easy", "--limit", "2.5"],
     "Invalid value for '--limit': limit must be a number of documents (a whole number >= 1) "
     "or a fraction of them between 0 and 1, got 2.5"),
])
def test_eval_refuses_options_that_make_no_sense(checkpoint, tmp_path, args, message):
    text = tmp_path / "notes.txt"
    text.write_text("Sort: abc\nabc\n" * 5)
    result = tune("eval", "--checkpoint", str(checkpoint), "--perplexity", str(text), *args)
    _one_problem(result, 2, f"Error: {message}")
    assert "perplexity" not in result.stdout


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
     "is a binary file, not text: perplexity is measured on UTF-8 text"),
    ("caf\xe9 ol\xe9\n".encode("latin-1"),
     "is not UTF-8 text (byte 3 is 0xe9): convert it first, e.g. iconv -f latin1 -t utf-8"),
])
def test_eval_names_a_file_that_is_not_text(checkpoint, tmp_path, content, message):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    result = tune("eval", "--checkpoint", str(checkpoint), "--perplexity", str(path))
    _one_problem(result, 1, f"error: {path} {message}")


def test_eval_names_an_unknown_lm_eval_task(checkpoint, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text("task: next_line\ndataset_path: json\n"
                                  "output_type: multiple_choice\n")
    result = tune("eval", "--checkpoint", str(checkpoint), "--tasks", "next_lines",
                  "--include-path", str(tasks))
    _one_problem(result, 1, f"error: no lm-eval task 'next_lines' in {tasks} (did you mean "
                            "'next_line'?); the tasks there: next_line")


@pytest.mark.parametrize("content, message", [
    (b"", "metrics.jsonl is empty: no training step has been logged yet (a line is written "
          "after every optimizer step)"),
    (b'{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n',
     "metrics.jsonl, line 2: 'not json' is not JSON (metrics.jsonl holds one JSON object per "
     "line)"),
    (b'{"step": 1, "lr": 0.1}\n', "metrics.jsonl holds no loss values: none of its 1 records "
                                  "has a finite 'loss'"),
    (b'{"loss": 2.0}\n', "metrics.jsonl, line 1: '{\"loss\": 2.0}' is not a metrics record (a "
                         "JSON object with an integer 'step')"),
])
def test_plot_names_what_is_wrong_with_metrics(tmp_path, content, message):
    (tmp_path / "metrics.jsonl").write_bytes(content)
    result = tune("plot", str(tmp_path))
    _one_problem(result, 1, f"error: {tmp_path}/{message}")
    assert not (tmp_path / "loss_curve.png").exists()


def test_a_full_disk_while_writing_is_named_not_a_bug(tmp_path):
    # A file size limit stands in for a disk that fills while the picture is written: the
    # write fails with EFBIG as it would with ENOSPC.
    (tmp_path / "metrics.jsonl").write_text("".join(
        f'{{"step": {i}, "loss": {1 / i}}}\n' for i in range(1, 50)))
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
            "from tune_cli.main import main; main(sys.argv[1:])")
    result = subprocess.run([sys.executable, "-c", code, "plot", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"error: File too large: {tmp_path}/loss_curve.png; free "), (
        result.stderr)
    assert "unexpected" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no half picture


def test_plot_never_replaces_what_is_not_a_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (tmp_path / "curve").mkdir()
    result = tune("plot", str(tmp_path), "-o", str(tmp_path / "curve"))
    _one_problem(result, 1, f"error: {tmp_path}/curve exists and is not a regular file; "
                            "pass --output path/to/loss_curve.png")
    assert (tmp_path / "curve").is_dir()


def test_generate_chat_template_mistakes_are_one_line(checkpoint, tmp_path):
    """A template that prints a variable nobody sets (jinja2 would write nothing: the prompt
    would lose text without a word), and a thinking switch for a format that has none."""
    template = tmp_path / "typo.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{{ eos }}{% endfor %}")
    typo = tune("generate", "--checkpoint", str(checkpoint), "--chat", "--chat-template",
                str(template), "-p", "Sort: cab", "--max-new-tokens", "2")
    _one_problem(typo, 1, (
        f"error: the chat template {template} uses the variable 'eos', which is not set (a "
        "chat template is given add_generation_prompt, bos_token, documents, eos_token, "
        "messages, pad_token, tools); fix the template, or test it with 'eos is defined' "
        "first"))
    switch = tune("generate", "--checkpoint", str(checkpoint), "--chat", "--no-thinking", "-p",
                  "Sort: cab", "--max-new-tokens", "2")
    _one_problem(switch, 1, (
        "error: enable_thinking is set, but the chat template llama2 has no enable_thinking "
        "switch (it never reads that variable; Qwen3's own template does); leave "
        "enable_thinking unset for this model's format"))
    plain = tune("generate", "--checkpoint", str(checkpoint), "--thinking", "-p", "Sort: cab")
    _one_problem(plain, 2, "Error: --chat-template, --system and --thinking/--no-thinking apply "
                           "to --chat")
