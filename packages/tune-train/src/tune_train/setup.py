"""What a recipe builds before its loop: the tokenizer, the model's shape, the model (whole or
sharded, full or with LoRA adapters, an NF4 base or not) and the optimizer."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tune_train.config import ConfigError, TrainConfig
from tune_train.errors import RecipeError

__all__ = ["build_tokenizer", "model_config", "optimizer_for", "training_model"]


def build_tokenizer(cfg: TrainConfig):
    """The config's tokenizer (``tokenizer`` kind, ``tokenizer_checkpoint`` file), once it is
    known to fit the model's family."""
    from tune_train import registry

    return registry.build_tokenizer(cfg)


def model_config(cfg: TrainConfig, tokenizer: Any):
    """The model a config describes (its preset with model_args), sized to the tokenizer's
    vocabulary when it starts from random weights.

    Raises:
        RecipeError: If the tokenizer has ids the model has no embedding for.
    """
    from tune_train import registry

    config = registry.model_config(cfg, vocab_size=tokenizer.vocab_size)
    if tokenizer.vocab_size > config.vocab_size:
        family = registry.model_family(cfg)
        raise RecipeError(
            f"tokenizer_checkpoint {cfg.tokenizer_checkpoint} has {tokenizer.vocab_size:,} "
            f"tokens but model '{cfg.model}' only {config.vocab_size:,} (its vocab_size): ids "
            "past that have no embedding; point tokenizer_checkpoint at the model's own "
            f"tokenizer (a {family.name} model reads {registry.family_tokenizer_files(family)})"
        )
    return config


def training_model(cfg: TrainConfig, run: Any, config: Any, weights: str | Path | None, *,
                   lora: Any = None, adapter: Mapping[str, torch.Tensor] | None = None
                   ) -> torch.nn.Module:
    """The model a run trains, built by the one builder (tune_ckpt.building.build_model).

    Args:
        cfg: The config: its seed, dtype, quantize_base, activation checkpointing, compile,
            fsdp_cpu_offload and model name (for messages) are used.
        run: The run (``tune_train.run.Run``): device, processes, sharding.
        config: The model's DecoderConfig.
        weights: A native checkpoint to start from, or None for random weights (a random
            base with ``lora``).
        lora: Adapters to train on the frozen base (LoRASettings), or None to train every
            weight.
        adapter: A resumed run's adapter weights; None starts new adapters.

    Raises:
        RecipeError: The checkpoint cannot be read or holds another model, or an NF4 base
            cannot run in this dtype on this device.
    """
    from tune_ckpt import CheckpointError
    from tune_ckpt.building import RandomBase, SequentialInit, build_model, checkpoint_weights
    from tune_models import family_of
    from tune_train.lora import nf4_problem

    problem = nf4_problem(cfg.quantize_base, cfg.dtype, run.device)
    if problem:
        raise RecipeError(problem)
    if cfg.quantize_base is not None and run.device.type == "cpu":
        from tune_train.memory import return_large_blocks_to_os

        return_large_blocks_to_os()
    device = torch.device("cpu") if cfg.fsdp_cpu_offload and run.sharded else run.device
    if weights is not None:
        try:
            source = checkpoint_weights(weights, config, cfg.model, family_of(cfg.model).name)
        except CheckpointError as e:
            raise RecipeError(str(e)) from e
    elif lora is not None:
        # A random base whose numbers do not depend on the order weights are made in.
        source = lambda model: RandomBase(model, cfg.seed, device)  # noqa: E731
    else:
        # Decoder.init_weights' numbers for this seed, one weight at a time.
        source = lambda model: SequentialInit(model, device)  # noqa: E731
    model = build_model(
        config, source, device=device, dtype=run.param_dtype, lora=lora, adapter=adapter,
        quantize=cfg.quantize_base,
        prepare=lambda m: _prepare_layers(m, cfg.enable_activation_checkpointing, cfg.compile),
        shard=run.shard if run.sharded else None, seed=cfg.seed,
        adapter_source=run.resume_from)
    if lora is not None:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        run.print(f"LoRA rank {lora.rank} on {','.join(lora.targets)}: {trained:,} trainable "
                  "parameters" + (", NF4 base" if cfg.quantize_base else ""))
    return model


def _prepare_layers(model: torch.nn.Module, activation_checkpointing: bool,
                    compile_blocks: bool) -> None:
    for layer in model.layers:
        layer.use_checkpoint = activation_checkpointing
    if compile_blocks:
        for layer in model.layers:
            layer.compile()


def optimizer_for(cfg: TrainConfig, params: list[torch.nn.Parameter],
                  device: torch.device) -> torch.optim.Optimizer:
    """The config's optimizer (optimizer, lr, weight_decay, optimizer_args) over ``params``.

    Raises:
        ConfigError: If optimizer_args do not fit the optimizer.
    """
    from tune_train import registry

    optimizer_class = registry.lookup(registry.OPTIMIZERS, cfg.optimizer, "optimizer")
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, **cfg.optimizer_args)
    if (device.type == "cuda" and optimizer_class is not torch.optim.SGD
            and "fused" not in kwargs and not cfg.fsdp_cpu_offload):
        kwargs["fused"] = True  # one kernel for the whole update instead of one per tensor
    try:
        return optimizer_class(params, **kwargs)
    except TypeError as e:
        raise ConfigError(f"optimizer_args do not fit {cfg.optimizer}: {e}") from e
