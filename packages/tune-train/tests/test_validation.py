"""Validation during training: held-out records never trained on, every validation token
scored once on some process, the loss per token of the whole set, the best checkpoint kept
and known after a resume, and configs that cannot work refused with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tune_data import collate
from tune_train import checkpointing as ckpt
from tune_train.config import ConfigError, load_config
from tune_train.config_checks import validate_config
from tune_train.errors import RecipeError
from tune_train.metrics import read_jsonl_metrics
from tune_train.recipes import recipe_main_of
from tune_train.validation import (
    Selection,
    collated,
    holdout_split,
    validate,
    validation_batches,
    validation_loss,
)

from train_helpers import recipe_data, started_run

main = recipe_main_of("full_finetune")


def _val_losses(output_dir: str | Path) -> dict[int, float]:
    records = read_jsonl_metrics(Path(output_dir) / "metrics.jsonl")
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def test_held_out_records_are_chosen_by_seed_and_never_trained_on(tiny_run):
    cfg = tiny_run(validation_split=0.1, epochs=3, max_steps_per_epoch=None)
    data = recipe_data(cfg)
    train, held = data.dataset, data.validation
    rows = data.dataset.dataset.rows  # the source record of every sample
    assert len(held) == round(0.1 * len(np.unique(rows)))
    # Every sample any epoch trains on comes from a record outside the validation set.
    held_rows = set(rows[held.indices].tolist())
    for epoch in range(3):
        trained = train.indices[data.sampler.epoch_batches(epoch).reshape(-1)]
        assert not held_rows & set(rows[trained].tolist())
    assert len(train) + len(held) == len(rows)
    # The same seed gives the same split (a resumed run validates on the same records);
    # another seed another.
    seed = load_config(cfg).seed
    again = holdout_split(data.dataset.dataset, 0.1, seed=seed)
    assert np.array_equal(again[1], held.indices)
    other = holdout_split(data.dataset.dataset, 0.1, seed=seed + 1)
    assert not np.array_equal(other[1], held.indices)


def test_one_long_document_is_split_by_chunks(tmp_path):
    class Chunks:  # one source record cut into 40 chunks, like a book in text_completion
        rows = np.zeros(40, dtype=np.int64)

        def __len__(self):
            return 40

    train, held = holdout_split(Chunks(), 0.05, seed=0)
    assert len(held) == 2 and len(train) == 38 and not set(train) & set(held)
    with pytest.raises(RecipeError, match="validation_split 0.01 of 40 training samples holds "
                                          "out none of them"):
        holdout_split(Chunks(), 0.01, seed=0)


@pytest.mark.parametrize("num_samples, batch_size, world_size, max_batches",
                         [(27, 4, 2, None), (8, 4, 2, None), (5, 2, 3, None), (30, 4, 2, 2),
                          (1, 4, 2, None), (13, 1, 1, None)])
def test_every_validation_sample_is_scored_once_with_batches_in_lockstep(
        num_samples, batch_size, world_size, max_batches):
    lengths = np.random.default_rng(0).integers(2, 50, num_samples)
    per_rank = [validation_batches(num_samples, batch_size, rank=r, world_size=world_size,
                                   max_batches=max_batches, lengths=lengths)
                for r in range(world_size)]
    # FSDP: every process runs the same number of forward passes.
    assert len({len(b) for b in per_rank}) == 1
    scored = np.concatenate([i for batches in per_rank for i in batches])
    expected = num_samples if max_batches is None else min(
        num_samples, max_batches * batch_size * world_size)
    assert sorted(scored.tolist()) == sorted(set(scored.tolist())) and len(scored) == expected
    assert all(len(i) <= batch_size for batches in per_rank for i in batches)


def test_validation_loss_is_the_mean_over_every_target_token(demo_files):
    """Samples of different lengths, masked prompts, padding, a batch with nothing in it:
    the loss is the sum over every target token divided by their number, not a mean of
    per-batch means."""
    from tune_data import DATASETS, SentencePieceTokenizer
    from tune_models import Decoder, llama2_tiny

    tokenizer = SentencePieceTokenizer(demo_files["tokenizer"])
    data = DATASETS["demo"](tokenizer, str(demo_files["data"]), max_seq_len=32)
    data = Selection(data, np.arange(11))
    torch.manual_seed(0)
    model = Decoder(llama2_tiny(vocab_size=64))
    model.init_weights()
    batches = validation_batches(len(data), 4, lengths=data.lengths) + [np.arange(0)]
    loss_fn = lambda m, b: m(b["tokens"], labels=b["labels"])  # noqa: E731 - training's loss
    result = validation_loss(model, loss_fn, collated(data, batches, collate),
                             torch.device("cpu"))

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            sample = data[i]
            logits = model(sample["tokens"][None])[0]
            total += F.cross_entropy(logits, sample["labels"], reduction="sum").item()
            count += int((sample["labels"] != -100).sum())
    assert result.num_tokens == count == int(data.loss_tokens.sum())
    assert result.loss == pytest.approx(total / count, rel=1e-6)
    assert model.training  # put back as it was


def test_save_best_keeps_the_lowest_loss_beside_pruned_checkpoints(tiny_run):
    cfg = tiny_run(validation_split=0.05, eval_every_n_steps=1, save_best=True,
                   save_every_n_steps=1, keep_last_n_checkpoints=1, max_steps_per_epoch=5)
    main(load_config(cfg))
    out = Path(cfg["output_dir"])
    logged = _val_losses(out)
    assert sorted(logged) == [1, 2, 3, 4, 5]
    best = json.loads((out / "checkpoints" / "best" / "best.json").read_text())
    assert best["val_loss"] == min(logged.values()) == logged[best["step"]]
    # Pruning kept one step folder and never touched best; the last checkpoint knows it.
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_0000005"]
    state = ckpt.TrainingState.read(ckpt.latest_checkpoint(out))
    assert (state.best_val_step, state.best_val_loss) == (best["step"], best["val_loss"])
    # best holds that step's model: validating it again, as the run validates, gives the loss
    # it was kept for.
    from tune_train.loading import load_model
    from tune_train.registry import LOSSES
    from tune_train.setup import build_tokenizer

    model, _ = load_model(out / "checkpoints" / "best", device="cpu")
    data = recipe_data({**cfg, "output_dir": cfg["output_dir"] + "-data"})
    with started_run({**cfg, "output_dir": cfg["output_dir"] + "-validate"}) as run:
        result = validate(model.train(), LOSSES["CrossEntropyLoss"], data.validation, run,
                          batch_size=cfg["batch_size"], max_batches=None, step=5,
                          pad_id=build_tokenizer(run.cfg).pad_id)
    assert result.loss == pytest.approx(best["val_loss"], abs=1e-6)


def test_a_resumed_run_compares_against_the_best_saved_after_its_checkpoint(tiny_run):
    """Killed after checkpoints/best was replaced (at step 3) but before the next checkpoint:
    the resumed run knows best's loss, so only a lower one replaces it."""
    cfg = tiny_run(validation_split=0.05, eval_every_n_steps=1, save_best=True,
                   max_steps_per_epoch=2)
    main(load_config(cfg))
    out = Path(cfg["output_dir"])
    info = out / "checkpoints" / "best" / "best.json"
    info.write_text(json.dumps({"step": 3, "val_loss": 0.001}))  # what the killed run saved
    main(load_config({**cfg, "resume_from_checkpoint": True, "epochs": 2}))
    assert sorted(_val_losses(out)) == [1, 2, 3, 4]
    assert json.loads(info.read_text()) == {"step": 3, "val_loss": 0.001}  # not replaced
    state = ckpt.TrainingState.read(ckpt.latest_checkpoint(out))
    assert (state.global_step, state.best_val_step, state.best_val_loss) == (4, 3, 0.001)

    # A new run (not resuming) may not take over a folder holding an earlier run's best.
    for step in ckpt.list_checkpoints(out):
        shutil.rmtree(step)
    with pytest.raises(RecipeError, match="already holds checkpoints of an earlier run"):
        main(load_config(cfg))


@pytest.mark.parametrize("extra, message", [
    ({"validation_split": 1.5}, "'validation_split' is 1.5; as the fraction of the training "
                                "records to hold out it must be between 0 and 1, e.g. 0.05"),
    ({"validation_split": 0}, "'validation_split' is 0.0; as the fraction"),
    ({"validation_split": float("nan")}, "'validation_split' is nan"),
    ({"validation_split": 0.05, "validation_data_files": "v.jsonl"},
     "'validation_split: 0.05' holds out part of the training data and "
     "'validation_data_files' names separate validation data; set only one of them"),
    ({"eval_every_n_steps": 10}, "'eval_every_n_steps' is set but there is no validation "
                                 "data; set validation_split: 0.05"),
    ({"save_best": True}, "'save_best' is set but there is no validation data"),
    ({"validation_split": 0.1, "eval_every_n_steps": 0},
     "'eval_every_n_steps' must be positive or null, got 0"),
    ({"validation_split": "train"}, "the validation data would be the training data (dataset "
                                    "'alpaca', split 'train')"),
    ({"validation_split": " "}, "'validation_split' is empty"),
])
def test_validation_settings_that_cannot_work_are_named(extra, message):
    with pytest.raises(ConfigError) as e:
        load_config({"dataset": "alpaca", **extra})
    assert message in str(e.value)


def test_validation_keys_read_as_a_user_means_them(tiny_run, tmp_path):
    # A split name of the training source; a fraction; a separate file with its own split.
    assert load_config(tiny_run(validation_split="validation")).validation_split == "validation"
    assert load_config(tiny_run(validation_split="0.05")).validation_split == 0.05
    missing = str(tmp_path / "nowhere.jsonl")
    cfg = load_config(tiny_run(validation_data_files=missing, validation_dataset="nope"))
    problems = validate_config(cfg)
    assert any(p.startswith("'validation_dataset' is 'nope'") for p in problems), problems
    assert f"validation_data_files {missing} does not exist" in problems
    # Another builder gets validation_dataset_args, and is named with the validation keys.
    cfg = load_config(tiny_run(validation_data_files=missing, validation_dataset="instruct"))
    assert ("validation_dataset 'instruct' needs 'validation_dataset_args.template'; set it in "
            "the config") in validate_config(cfg)


def test_a_separate_validation_file_is_built_like_the_training_data(tiny_run, demo_files,
                                                                      tmp_path):
    lines = demo_files["data"].read_text().splitlines()
    validation = tmp_path / "validation.jsonl"
    validation.write_text("\n".join(lines[:12]) + "\n")
    cfg = tiny_run(validation_data_files=str(validation), eval_every_n_steps=3,
                   validation_max_batches=1, batch_size=4, max_steps_per_epoch=3)
    main(load_config(cfg))
    assert sorted(_val_losses(cfg["output_dir"])) == [3]
    data = recipe_data({**cfg, "output_dir": cfg["output_dir"] + "-setup"})
    assert len(data.validation) == 12  # every record of the file; training kept all
    assert len(data.dataset) == len(lines)


@pytest.mark.parametrize("extra", [{"packing": True}, {"group_by_length": True}])
def test_held_out_data_packs_and_groups_like_any_dataset(tiny_run, extra):
    cfg = tiny_run(validation_split=0.05, max_steps_per_epoch=2, **extra)
    main(load_config(cfg))
    assert sorted(_val_losses(cfg["output_dir"])) == [2]
