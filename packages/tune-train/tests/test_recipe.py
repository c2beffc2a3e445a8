"""The full_finetune recipe on one device: it learns, its knobs do what they say, and bad
inputs are refused before anything heavy happens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tune_train.checkpointing import (
    TRAINING_STATE,
    latest_checkpoint,
    list_checkpoints,
    read_dcp_metadata,
)
from tune_train.config import ConfigError, load_config
from tune_train.errors import RecipeError
from tune_train.recipes import recipe_main_of

from train_helpers import read_losses, recipe_model, run_recipe

main = recipe_main_of("full_finetune")


def _trained_weights(output_dir) -> dict[str, torch.Tensor]:
    """The weights a run ended with: its latest checkpoint's model file."""
    return torch.load(latest_checkpoint(output_dir) / "native_pytorch_model.pt",
                      weights_only=True)


def test_loss_goes_down_on_real_alpaca(llama2_tokenizer_path, alpaca_json_path, tmp_path):
    """A tiny Llama 2 on the real Alpaca records with the real tokenizer learns."""
    out = tmp_path / "alpaca"
    main(load_config({
        "dataset": "alpaca", "data_files": str(alpaca_json_path), "model": "llama2_tiny",
        "model_checkpoint": None, "tokenizer_checkpoint": str(llama2_tokenizer_path),
        "max_seq_len": 128, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5,
        "max_steps_per_epoch": 40, "output_dir": str(out), "device": "cpu",
        "metric_loggers": ["jsonl"], "packing": True, "plot": True,
    }))
    losses = list(read_losses(out).values())
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    # The checkpoint holds the model in the native schema, with its shape beside it.
    ckpt = latest_checkpoint(out)
    state = torch.load(ckpt / "native_pytorch_model.pt", weights_only=True, mmap=True)
    assert state["layers.0.attention.wqkv.weight"].shape == (128, 64)
    assert json.loads((ckpt / "tune_model.json").read_text())["n_kv_heads"] == 2
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradient_accumulation_equals_a_bigger_batch(tiny_run):
    """k micro-batches of b give the update of one batch of k*b (losses normalised by the
    target tokens of the whole step, not averaged per micro-batch)."""
    common = dict(optimizer="SGD", lr=0.5, max_steps_per_epoch=1, max_grad_norm=None,
                  batch_size=8)
    big = _trained_weights(run_recipe(tiny_run(
        **common, output_dir=tiny_run()["output_dir"] + "-big")).output_dir)
    small = _trained_weights(run_recipe(tiny_run(
        **{**common, "batch_size": 2}, gradient_accumulation_steps=4)).output_dir)
    assert big.keys() == small.keys()
    for name in big:
        torch.testing.assert_close(big[name], small[name], atol=1e-6, rtol=0, msg=name)
    # Unequal micro-batches (different padding and target counts) were really involved.
    assert not torch.equal(big["output.weight"], _initial_output_weight(tiny_run))


def _initial_output_weight(tiny_run) -> torch.Tensor:
    model, _ = recipe_model(tiny_run(output_dir=tiny_run()["output_dir"] + "-0"))
    return model.output.weight.detach().clone()


def test_runs_are_repeatable_and_seed_matters(tiny_run, tmp_path):
    a = read_losses(run_recipe(tiny_run(output_dir=str(tmp_path / "a"))).output_dir)
    b = read_losses(run_recipe(tiny_run(output_dir=str(tmp_path / "b"))).output_dir)
    c = read_losses(run_recipe(tiny_run(output_dir=str(tmp_path / "c"), seed=7)).output_dir)
    assert a == b
    assert a != c


def test_activation_checkpointing_gives_the_same_losses(tiny_run, tmp_path):
    plain = read_losses(run_recipe(tiny_run(output_dir=str(tmp_path / "p"))).output_dir)
    settings = tiny_run(output_dir=str(tmp_path / "ac"), enable_activation_checkpointing=True)
    model, _ = recipe_model({**settings, "output_dir": str(tmp_path / "ac-model")})
    assert all(layer.use_checkpoint for layer in model.layers)
    ac = run_recipe(settings)
    for step, loss in read_losses(ac.output_dir).items():
        assert loss == pytest.approx(plain[step], abs=1e-5)


def test_bf16_keeps_weights_and_optimizer_state_in_bf16(tiny_run):
    cfg = run_recipe(tiny_run(dtype="bf16", max_steps_per_epoch=2, max_seq_len=16, batch_size=2))
    assert all(t.dtype == torch.bfloat16 for t in _trained_weights(cfg.output_dir).values())
    # The optimizer state as the checkpoint holds it (DCP records each tensor's dtype).
    metadata = read_dcp_metadata(latest_checkpoint(cfg.output_dir) / TRAINING_STATE)
    exp_avg = [m for k, m in metadata.state_dict_metadata.items() if k.endswith(".exp_avg")]
    assert exp_avg and all(m.properties.dtype == torch.bfloat16 for m in exp_avg)
    assert all(torch.isfinite(torch.tensor(v)) for v in read_losses(cfg.output_dir).values())


def test_fp16_trains_fp32_master_weights_with_loss_scaling(tiny_run):
    cfg = run_recipe(tiny_run(dtype="fp16", max_steps_per_epoch=3, max_seq_len=16, batch_size=2))
    assert all(t.dtype == torch.float32 for t in _trained_weights(cfg.output_dir).values())
    records = [json.loads(line) for line in
               (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_scale"] >= 1.0 for r in records)
    assert all(r["loss"] is not None for r in records)


def test_checkpoints_every_n_steps_keep_the_last_k(tiny_run):
    recipe = run_recipe(tiny_run(save_every_n_steps=2, keep_last_n_checkpoints=2,
                                 max_steps_per_epoch=7))
    names = [p.name for p in list_checkpoints(recipe.output_dir)]
    assert names == ["step_0000006", "step_0000007"]
    assert not list(Path(recipe.output_dir, "checkpoints").glob(".tmp-*"))


def test_pruning_keeps_a_checkpoint_holding_a_users_export(tiny_run, capsys):
    """`tune convert_checkpoint --to hf` on a mid-run checkpoint writes hf_model inside it by
    default; keep_last_n_checkpoints must not delete it with the checkpoint."""
    from tune_ckpt import convert

    cfg = tiny_run(save_every_n_steps=1, keep_last_n_checkpoints=1, max_steps_per_epoch=2)
    recipe = run_recipe(cfg)
    first = list_checkpoints(recipe.output_dir)[-1]
    export = convert(first / "native_pytorch_model.pt", target_format="hf",
                                progress=False)
    assert export == first / "hf_model"
    run_recipe({**cfg, "epochs": 2, "resume_from_checkpoint": True})
    names = [p.name for p in list_checkpoints(recipe.output_dir)]
    assert names == [first.name, "step_0000004"]  # step 3 went, the exported one stayed
    assert (export / "config.json").is_file()
    assert f"{first} holds hf_model, which training did not write" in capsys.readouterr().out


def test_a_second_run_does_not_overwrite_the_first(tiny_run):
    run_recipe(tiny_run())
    with pytest.raises(RecipeError, match="already holds checkpoints.*resume_from_checkpoint"):
        run_recipe(tiny_run())


def test_resume_continues_where_it_stopped(tiny_run, tmp_path, monkeypatch):
    """In-process variant of the kill test: stop after 4 steps, resume to 9."""
    from tune_train import steps

    full = read_losses(run_recipe(tiny_run(output_dir=str(tmp_path / "full"),
                                           max_steps_per_epoch=9, lr_scheduler="cosine",
                                           warmup_steps=2)).output_dir)
    part = tiny_run(output_dir=str(tmp_path / "part"), max_steps_per_epoch=9,
                    lr_scheduler="cosine", warmup_steps=2, save_every_n_steps=4)
    optimizer_step = steps.optimizer_step

    def crash_at_step_6(*args, step, **kwargs):
        if step == 6:  # after the step-4 checkpoint and one more step
            raise KeyboardInterrupt
        return optimizer_step(*args, step=step, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(steps, "optimizer_step", crash_at_step_6)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(part)
    assert [p.name for p in list_checkpoints(part["output_dir"])] == ["step_0000004"]
    resumed = run_recipe({**part, "resume_from_checkpoint": True})
    assert latest_checkpoint(resumed.output_dir).name == "step_0000009"
    assert read_losses(part["output_dir"]) == full


def test_missing_files_are_reported_before_the_model_is_built(tiny_run, tmp_path):
    with pytest.raises(RecipeError, match="tokenizer_checkpoint .*nope.model does not exist"):
        run_recipe(tiny_run(tokenizer_checkpoint=str(tmp_path / "nope.model")))
    with pytest.raises(RecipeError, match="model_checkpoint .*missing.pt does not exist.*"
                                          "convert_checkpoint"):
        run_recipe(tiny_run(model_checkpoint=str(tmp_path / "missing.pt")))


def test_a_checkpoint_of_another_model_is_named(tiny_run, tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"tok_embeddings.weight": torch.zeros(64, 32)}, path)
    with pytest.raises(RecipeError, match="lacks .* key\\(s\\) of model 'llama2_tiny'"):
        run_recipe(tiny_run(model_checkpoint=str(path)))


@pytest.mark.parametrize("key, value, message", [
    ("model", "llama2_7", "'model' is 'llama2_7' (did you mean 'llama2_7b'?)"),
    ("optimizer", "adamw", "'optimizer' is 'adamw' (did you mean 'AdamW'?)"),
    ("dataset", "alpacca", "'dataset' is 'alpacca' (did you mean 'alpaca'?)"),
])
def test_unknown_names_suggest_the_right_one(tiny_run, key, value, message):
    with pytest.raises(ConfigError) as e:
        run_recipe(tiny_run(**{key: value}))
    assert message in str(e.value)


def test_model_args_that_resize_the_model_rederive_head_dim(tiny_run):
    """llama2_tiny has 4 heads of 16; at dim 128 they must become 4 heads of 32."""
    model, config = recipe_model(tiny_run(model_args={"dim": 128, "n_heads": 4}))
    assert config.head_dim == 32
    assert model.layers[0].attention.wo.weight.shape == (128, 128)
