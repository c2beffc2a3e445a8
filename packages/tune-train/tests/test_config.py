"""The config system: YAML and overrides onto typed fields, errors a person can act on."""

from pathlib import Path

import pytest
import yaml

from tune_train.config import (
    ConfigError,
    TrainConfig,
    builtin_configs,
    config_keys,
    dump_config,
    load_config,
    parse_overrides,
)

TUTORIAL_YAML = """\
dataset: alpaca
seed: 42
shuffle: True
model: llama2_7b
model_checkpoint: /tmp/llama2/native_pytorch_model.pt
tokenizer: llama2_tokenizer
tokenizer_checkpoint: /tmp/llama2/tokenizer.model
batch_size: 2
lr: 2e-5
epochs: 2
optimizer: SGD
loss: CrossEntropyLoss
output_dir: /tmp/alpaca-llama2-finetune
device: cuda
dtype: fp16
enable_fsdp: True
enable_activation_checkpointing: True
resume_from_checkpoint: False
"""


def test_tutorial_config_loads_as_written(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text(TUTORIAL_YAML)
    cfg = load_config(path)
    assert cfg.lr == 2e-5 and isinstance(cfg.lr, float)  # YAML 1.1 reads 2e-5 as a string
    assert (cfg.model, cfg.optimizer, cfg.dtype, cfg.epochs) == ("llama2_7b", "SGD", "fp16", 2)
    assert cfg.enable_fsdp and cfg.enable_activation_checkpointing
    assert not cfg.resume_from_checkpoint


def test_shipped_tutorial_config_is_the_tutorials():
    shipped = yaml.safe_load(builtin_configs()["alpaca_llama2_full_finetune"].read_text())
    assert shipped == yaml.safe_load(TUTORIAL_YAML)


def test_overrides_are_yaml_typed_and_reach_nested_keys(tmp_path):
    cfg = load_config(None, ["batch_size=8", "lr=3e-4", "shuffle=false", "wandb.project=x",
                             "model_args.n_layers=2", "metric_loggers=[stdout, tensorboard]",
                             "max_steps_per_epoch=null"])
    assert cfg.batch_size == 8 and cfg.lr == 3e-4 and cfg.shuffle is False
    assert cfg.wandb.project == "x" and cfg.model_args == {"n_layers": 2}
    assert cfg.metric_loggers == ["stdout", "tensorboard"]
    assert cfg.max_steps_per_epoch is None


def test_override_beats_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 2\nwandb:\n  project: a\n  mode: offline\n")
    cfg = load_config(path, ["wandb.project=b"])
    assert cfg.batch_size == 2 and cfg.wandb.project == "b" and cfg.wandb.mode == "offline"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"bach_size": 2}, "unknown key 'bach_size' (did you mean 'batch_size'?)"),
        ({"wandb": {"projet": "x"}}, "unknown key 'wandb.projet' (did you mean 'wandb.project'?)"),
        ({"batch_size": "two"}, "'batch_size' must be int, got 'two'"),
        ({"batch_size": 2.5}, "'batch_size' must be int, got 2.5"),
        ({"shuffle": "yes please"}, "'shuffle' must be bool, got 'yes please'"),
        ({"lr": "fast"}, "'lr' must be float, got 'fast'"),
        ({"dtype": "bf61"}, "'dtype' is 'bf61', which is not one of 'fp32', 'bf16', 'fp16' "
                            "(did you mean 'bf16'?)"),
        ({"batch_size": 0}, "'batch_size' must be positive, got 0"),
        ({"metric_loggers": ["tensorbord"]}, "unknown metric logger 'tensorbord' "
                                             "(did you mean 'tensorboard'?)"),
        ({"device": "gpu"}, "'device' is 'gpu'; use cpu, cuda, cuda:N or auto"),
    ],
)
def test_mistakes_are_named(data, message):
    with pytest.raises(ConfigError) as e:
        load_config(data)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr=inf", "'lr' must be a finite number, got inf"),
        ("lr=nan", "'lr' must be a finite number, got nan"),
        ("lr=.nan", "'lr' must be a finite number, got nan"),
        ("lr=1e999", "'lr' must be a finite number, got inf"),
        ("lr=-1e-5", "'lr' must be positive, got -1e-05"),
        ("min_lr_ratio=-3", "'min_lr_ratio' is the final lr as a fraction of lr and must be "
                            "between 0 and 1, got -3.0"),
        ("min_lr_ratio=1.5", "must be between 0 and 1, got 1.5"),
        ("weight_decay=-5", "'weight_decay' must be >= 0, got -5.0"),
        ("weight_decay=.inf", "'weight_decay' must be a finite number, got inf"),
        ("max_grad_norm=0", "'max_grad_norm' must be positive, or null for no clipping, got 0.0"),
        ("max_grad_norm=nan", "'max_grad_norm' must be a finite number, got nan"),
        ("warmup_steps=-1", "'warmup_steps' must be >= 0, got -1"),
        ("seed=-1", "'seed' must be >= 0, got -1"),
    ],
)
def test_numbers_out_of_range_are_named(override, message):
    """Values that used to pass and then train to NaN, ascend the gradient, or fail later
    as an unexpected error."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_numbers_at_the_edges_of_their_ranges_are_fine():
    cfg = load_config(None, ["min_lr_ratio=0", "weight_decay=0", "max_grad_norm=null",
                             "warmup_steps=0", "seed=0"])
    assert cfg.max_grad_norm is None and cfg.min_lr_ratio == 0.0
    assert load_config(None, ["min_lr_ratio=1"]).min_lr_ratio == 1.0




def test_bad_override_syntax_and_unknown_builtin():
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_overrides(["batch_size"])
    with pytest.raises(ConfigError, match="did you mean 'alpaca_llama2_full_finetune'"):
        load_config("alpaca_llama2_full_finetun")


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("batch_size: 2\nlr: [1e-4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line \d"):
        load_config(path)


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["lr=1e-3", "wandb.mode=offline", "model_args={dim: 64}"])
    path = tmp_path / "out.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_every_key_is_documented():
    keys = config_keys()
    names = {k for k, *_ in keys}
    assert {"batch_size", "lr", "wandb.project", "resume_from_checkpoint"} <= names
    assert all(help_text for *_, help_text in keys)
    assert len(names) == len(keys)


def test_defaults_are_a_valid_config():
    assert load_config(None) == TrainConfig()


def test_builtin_configs_exist():
    names = set(builtin_configs())
    assert "alpaca_llama2_full_finetune" in names
    for path in builtin_configs().values():
        load_config(Path(path))
