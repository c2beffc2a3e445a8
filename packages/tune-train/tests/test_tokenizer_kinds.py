"""Every tokenizer kind a config can name loads its family's real file and trains."""

from __future__ import annotations

import json
import math

import pytest

from tune_train import registry
from tune_train.metrics import read_jsonl_metrics
from tune_train.setup import build_tokenizer

from train_helpers import run_recipe

KINDS = [
    ("llama2_tokenizer", "llama2_tokenizer_path", [15043, 3186]),
    ("mistral_tokenizer", "mistral_tokenizer_path", [22557, 1526]),
    ("llama3_tokenizer", "llama3_tokenizer_path", [9906, 1917]),
    ("qwen2_tokenizer", "qwen2_tokenizer_path", [9707, 1879]),
    ("hf_tokenizer", "qwen2_tokenizer_path", [9707, 1879]),
]


@pytest.mark.parametrize("kind, path_fixture, hello", KINDS)
def test_each_kind_reads_its_familys_file(kind, path_fixture, hello, request):
    tokenizer = registry.TOKENIZERS[kind](request.getfixturevalue(path_fixture))
    assert tokenizer.encode("Hello world", add_bos=False) == hello


@pytest.mark.parametrize("kind, path_fixture, model", [
    ("llama3_tokenizer", "llama3_tokenizer_path", "llama3_tiny"),
    ("qwen2_tokenizer", "qwen2_tokenizer_path", "qwen2_tiny"),
])
def test_a_tiny_model_trains_on_alpaca_with_the_family_tokenizer(
    kind, path_fixture, model, request, tiny_run, alpaca_json_path, tmp_path
):
    # Llama 3's 128k and Qwen2's 152k vocabularies (Qwen2 without BOS) through the data
    # path, collate and a few optimizer steps; the model takes its vocabulary from them.
    data = tmp_path / "alpaca_64.json"
    data.write_text(json.dumps(json.loads(alpaca_json_path.read_text())[:64]))
    cfg = tiny_run(model=model, tokenizer=kind,
                   tokenizer_checkpoint=str(request.getfixturevalue(path_fixture)),
                   dataset="alpaca", dataset_source=None, data_files=str(data),
                   max_seq_len=64, max_steps_per_epoch=2)
    vocab_size = build_tokenizer(run_recipe(cfg)).vocab_size
    losses = [r["loss"] for r in read_jsonl_metrics(tmp_path / "run" / "metrics.jsonl")]
    # Untrained, the loss is about ln(vocabulary): the model's output covers every id.
    assert len(losses) == 2 and abs(losses[0] - math.log(vocab_size)) < 1.5
