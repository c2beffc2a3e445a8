"""Every registered dataset builder, reached the way users reach it: a YAML config, then
`tune data stats` and a 3-step `tune run`. Each builder receives only the arguments it takes
(text_completion used to be handed train_on_input and fail inside `datasets`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tune_data import DATASETS
from tune_train.checkpointing import latest_checkpoint
from tune_train.metrics import read_jsonl_metrics

from train_helpers import make_demo_files

TUNE = str(Path(sys.executable).with_name("tune"))
RECORDS = 200  # of the real Alpaca file, where a builder reads a copy of part of it


# Each gives the config keys for its builder and what the first line of `tune data stats` says.


def _alpaca(request, tmp_path) -> tuple[dict, str]:
    data = request.getfixturevalue("alpaca_json_path")
    return {"data_files": str(data)}, "samples from 5,000 records"


def _alpaca_cleaned(request, tmp_path) -> tuple[dict, str]:
    # Its default source is the Hub's yahma/alpaca-cleaned: served here by the local stand-in.
    hub = request.getfixturevalue("hub_server")
    records = json.loads(request.getfixturevalue("alpaca_json_path").read_text())[:RECORDS]
    hub.add_repo("yahma/alpaca-cleaned", {"alpaca_data_cleaned.json": json.dumps(records)},
                 repo_type="dataset")
    return {}, f"samples from {RECORDS} records"


def _instruct(request, tmp_path) -> tuple[dict, str]:
    # Other column names and another template, all through dataset_args.
    records = json.loads(request.getfixturevalue("alpaca_json_path").read_text())[:RECORDS]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": r["instruction"], "answer": r["output"]})
                            + "\n" for r in records))
    return {"data_files": str(path), "dataset_args": {
        "template": "### Question:\n{question}\n\n### Answer:\n", "response_field": "answer",
    }}, f"samples from {RECORDS} records"


def _text_completion(request, tmp_path) -> tuple[dict, str]:
    # The command, train_on_input included: every token is a target anyway.
    text = request.getfixturevalue("tinyshakespeare_path")
    return {"dataset_source": str(text), "train_on_input": True}, "samples from 1 records"


def _chat(request, tmp_path) -> tuple[dict, str]:
    # ShareGPT conversations; the chat format is the model family's (llama2_tiny: llama2).
    records = json.loads(request.getfixturevalue("sharegpt_json_path").read_text())[:RECORDS]
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(records))
    return {"data_files": str(path)}, f"from {RECORDS} records"


def _demo(request, tmp_path) -> tuple[dict, str]:
    return {"dataset_source": str(tmp_path / "demo.jsonl"), "tokenizer": "demo_tokenizer",
            "tokenizer_checkpoint": str(tmp_path / "demo.model"),
            "dataset_args": {"num_records": RECORDS}}, f"{RECORDS} samples from {RECORDS} records"


def _random_tokens(request, tmp_path) -> tuple[dict, str]:
    files = make_demo_files(tmp_path / "demo", records=10)
    return {"tokenizer_checkpoint": str(files["tokenizer"]),
            "dataset_args": {"num_samples": 16}}, "random tokens: 16 samples from 16 records"


BUILDERS: dict[str, Callable[..., tuple[dict, str]]] = {
    "alpaca": _alpaca,
    "alpaca_cleaned": _alpaca_cleaned,
    "instruct": _instruct,
    "text_completion": _text_completion,
    "chat": _chat,
    "demo": _demo,
    "random_tokens": _random_tokens,
}


def test_every_registered_builder_is_tested_here():
    assert set(BUILDERS) == set(DATASETS)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_builder_from_a_config(name, request, tmp_path):
    extra, stats_line = BUILDERS[name](request, tmp_path)
    out = tmp_path / "out"
    cfg = {"dataset": name, "model": "llama2_tiny", "model_checkpoint": None,
           "tokenizer": "llama2_tokenizer", "max_seq_len": 64, "batch_size": 2, "lr": 1e-3,
           "device": "cpu", "max_steps_per_epoch": 3, "metric_loggers": ["jsonl"],
           "plot": False, "output_dir": str(out), **extra}
    if cfg["tokenizer"] == "llama2_tokenizer" and "tokenizer_checkpoint" not in cfg:
        cfg["tokenizer_checkpoint"] = str(request.getfixturevalue("llama2_tokenizer_path"))
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")}

    stats = subprocess.run([TUNE, "data", "stats", str(config)], capture_output=True,
                           text=True, timeout=300, env=env, cwd=tmp_path)
    assert stats.returncode == 0, stats.stderr[-3000:]
    assert stats_line in stats.stdout.splitlines()[0], stats.stdout
    ignored = [line for line in stats.stderr.splitlines() if line.startswith("warning:")]
    if name == "text_completion":
        assert ignored == ["warning: dataset 'text_completion' does not use 'train_on_input'; "
                           "train_on_input: True is ignored"]
    else:
        assert ignored == []

    run = subprocess.run([TUNE, "run", "full_finetune", "--config", str(config)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["step"] for r in read_jsonl_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert latest_checkpoint(out).name == "step_0000003"


def test_dataset_args_a_builder_does_not_take_are_one_line(tmp_path, llama2_tokenizer_path):
    config = tmp_path / "c.yaml"
    # A tiny model: the default llama2_7b from random weights in fp32 (27 GB) is a second
    # problem on a machine with less memory (validate.memory_problem).
    config.write_text(yaml.safe_dump({
        "dataset": "random_tokens", "tokenizer_checkpoint": str(llama2_tokenizer_path),
        "model": "llama2_tiny", "dataset_args": {"num_sample": 8}}))
    for args in (["config", "validate", str(config)], ["data", "stats", str(config)]):
        result = subprocess.run([TUNE, *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 1
        assert result.stderr.strip() == (
            "error: dataset 'random_tokens' takes no argument 'num_sample' "
            "(dataset_args.num_sample); its arguments: num_samples, seed")
