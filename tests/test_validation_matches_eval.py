"""The validation loss a run logs is the loss `tune eval --perplexity` measures for the same
checkpoint on the same text: log(perplexity), to 1e-5 in fp32.

"The same text" is made exact. `tune eval --perplexity FILE` scores every token of BOS + text
after BOS, in windows of the model's length. The text_completion dataset turns a file into
BOS + text + EOS cut into max_seq_len chunks, every token after the first of a chunk a
target. A file whose BOS + text is exactly max_seq_len tokens is therefore one sample whose
targets are the text's tokens, with the context eval gives them (the EOS is left alone in a
chunk of one, which has nothing to predict and is dropped). The test checks both premises
before it compares, so it fails loudly if either side changes how it cuts text.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tune_train.metrics import read_jsonl_metrics

TUNE = str(Path(sys.executable).with_name("tune"))
MAX_SEQ_LEN = 64
STEPS = 4


def _text_of_tokens(tokenizer, text: str, start: int, n_tokens: int) -> str:
    """A stretch of ``text`` from a line start at or after ``start`` that encodes (after BOS)
    to exactly ``n_tokens`` tokens and ends on a whole word."""
    while True:
        for end in range(start + 1, len(text)):
            if not (text[end - 1].isalnum() and not text[end].isalnum()):
                continue
            count = len(tokenizer.encode(text[start:end], add_bos=False))
            if count == n_tokens:
                return text[start:end]
            if count > n_tokens:
                break  # no word boundary lands exactly here: try the next line
        start = text.index("\n", start) + 1


def _eval_nll(checkpoint: Path, text_file: Path) -> tuple[float, int]:
    done = subprocess.run([TUNE, "eval", "--checkpoint", str(checkpoint), "--perplexity",
                           str(text_file), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r"\(nll ([0-9.]+) nats/token over ([0-9,]+) tokens", done.stdout)
    assert found, done.stdout
    return float(found.group(1)), int(found.group(2).replace(",", ""))


def test_logged_validation_loss_is_tune_evals_log_perplexity(tmp_path, llama2_tokenizer_path,
                                                             tinyshakespeare_path):
    from tune_data import SentencePieceTokenizer
    from tune_train import registry
    from tune_train.config import load_config
    from tune_train.eval import perplexity
    from tune_train.loading import load_model
    from tune_train.recipes import recipe_main_of

    tokenizer = SentencePieceTokenizer(llama2_tokenizer_path)
    text = tinyshakespeare_path.read_text()
    train_file = tmp_path / "train.txt"
    train_file.write_text(text[:20_000])
    validation_files = []
    for i, start in enumerate((500_000, 900_000)):
        start = text.index("\n\n", start) + 2  # a speech's first line
        path = tmp_path / f"validation-{i}.txt"
        path.write_text(_text_of_tokens(tokenizer, text, start, MAX_SEQ_LEN - 1))
        validation_files.append(path)

    cfg = {
        "dataset": "text_completion", "data_files": str(train_file),
        "validation_data_files": [str(p) for p in validation_files],
        "eval_every_n_steps": 2, "save_best": True,
        "model": "llama2_tiny", "model_checkpoint": None,
        "tokenizer": "llama2_tokenizer", "tokenizer_checkpoint": str(llama2_tokenizer_path),
        "max_seq_len": MAX_SEQ_LEN, "batch_size": 1, "lr": 3e-3, "max_steps_per_epoch": STEPS,
        "output_dir": str(tmp_path / "run"), "device": "cpu", "dtype": "fp32",
        "metric_loggers": ["jsonl"], "plot": False,
    }
    config = load_config(cfg)
    # Premise: each validation file is one sample of max_seq_len tokens, every token after
    # BOS a target, exactly the ids eval scores.
    validation = registry.build_validation_dataset(config, tokenizer)
    assert len(validation) == len(validation_files)
    for i, path in enumerate(validation_files):
        ids = tokenizer.encode(path.read_text(), add_bos=True)
        assert validation.token_ids(i).tolist() == ids and len(ids) == MAX_SEQ_LEN
    assert validation.loss_tokens.tolist() == [MAX_SEQ_LEN - 1] * len(validation_files)

    recipe_main_of("full_finetune")(config)
    out = Path(cfg["output_dir"])
    logged = {r["step"]: r["val_loss"] for r in read_jsonl_metrics(out / "metrics.jsonl")
              if "val_loss" in r}
    assert sorted(logged) == [2, 4]  # every 2 steps; the epoch ends at step 4

    scored = [_eval_nll(out / "checkpoints" / f"step_{STEPS:07d}", p) for p in validation_files]
    assert [n for _, n in scored] == [MAX_SEQ_LEN - 1] * len(validation_files)
    eval_loss = sum(nll * n for nll, n in scored) / sum(n for _, n in scored)
    assert abs(logged[STEPS] - eval_loss) < 1e-5, (logged[STEPS], eval_loss)

    # checkpoints/best holds the model of the lowest logged loss, loaded as tune eval loads
    # a step folder.
    best = json.loads((out / "checkpoints" / "best" / "best.json").read_text())
    assert best["val_loss"] == min(logged.values()) == logged[best["step"]]
    model, _ = load_model(out / "checkpoints" / "best", device="cpu")
    texts = [p.read_text() for p in validation_files]
    assert abs(perplexity(model, tokenizer, texts, progress=False).nll - best["val_loss"]) < 1e-5
