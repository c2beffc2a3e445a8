"""LoRA and QLoRA fine-tuning: adapters train on a frozen (optionally NF4) base, on one
device or sharded with FSDP2.

    tune run lora_finetune --config llama3_1_8b_qlora [key=value ...]
    tune --nnodes 1 --nproc_per_node 2 lora_finetune.py --config my.yaml

The base (``model_checkpoint``) is frozen; adapters of rank ``lora_rank`` go on
``lora_target_modules`` and, with ``quantize_base: nf4``, the block linears are stored in
NF4 (QLoRA). B starts at zero, so step 0 is the base model exactly. Checkpoints hold the
adapter in PEFT's format, the adapters' optimizer state and the progress (MBs); a resumed run
reloads the base from ``model_checkpoint``. The run ends with the adapter in output_dir
(adapter_config.json + adapter_model.safetensors), which PEFT and vLLM load; ``tune merge``
folds it into the base, ``tune generate/eval --adapter`` use it as it is.

This file is the whole run, top to bottom; the loop is full_finetune's, over the adapters.
Copy it with ``tune recipe cp lora_finetune .`` to change it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tune_train import checkpointing as ckpt
from tune_train import lora, steps
from tune_train.config import TrainConfig
from tune_train.data import training_data
from tune_train.metrics import StepProgress, Throughput, step_metrics
from tune_train.optim import DynamicLossScaler, LRSchedule
from tune_train.registry import LOSSES
from tune_train.run import recipe_main, start_run
from tune_train.setup import build_tokenizer, model_config, optimizer_for, training_model
from tune_train.state import TrainingState
from tune_train.validation import validate, validation_due

RECIPE = "lora_finetune"


def main(cfg: TrainConfig) -> None:
    # Checks (names, files, the model's family, the LoRA keys, output_dir), device, processes.
    with start_run(cfg, RECIPE, lora=True) as run:
        # ---- build: tokenizer, the frozen base with adapters, optimizer, data, progress
        tokenizer = build_tokenizer(cfg)
        config = model_config(cfg, tokenizer)
        settings = lora.lora_settings_of(cfg, config)
        adapter = None
        if run.resume_from is not None:  # the checkpoint's adapter, once its files check out
            adapter = lora.resume_adapter(run.resume_from, config, settings)
        model = training_model(cfg, run, config, cfg.model_checkpoint, lora=settings,
                               adapter=adapter)
        params = [p for p in model.parameters() if p.requires_grad]  # the adapters
        optimizer = optimizer_for(cfg, params, run.device)
        scaler = DynamicLossScaler() if cfg.dtype == "fp16" else None
        loss_fn = LOSSES[cfg.loss]
        data = training_data(cfg, tokenizer, run)
        schedule = LRSchedule(cfg.lr, warmup_steps=cfg.warmup_steps, schedule=cfg.lr_scheduler,
                              total_steps=data.steps_per_epoch * cfg.epochs,
                              min_lr_ratio=cfg.min_lr_ratio)
        state = TrainingState(RECIPE, world_size=run.dist.world_size, batch_size=cfg.batch_size,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps)
        if run.resume_from is not None:  # optimizer, progress and RNG; the adapter is in
            state = ckpt.load_training_state(run.resume_from, model, optimizer, state,
                                             data.steps_per_epoch, loss_scaler=scaler)
            run.print(f"resumed from {run.resume_from} (epoch {state.epoch}, step "
                      f"{state.global_step})")
        state.note_best(ckpt.read_best_info(cfg.output_dir))
        run.start_logging()  # config.yaml and the metric loggers

        def adapter_files():  # every process: FSDP gathers the adapters on the main one
            weights = lora.adapter_state(model, keep=run.is_main)
            return lora.adapter_writer(weights, config, settings, base_model=cfg.model_checkpoint,
                                       quantize_base=cfg.quantize_base)

        def save() -> Path:
            steps.check_weights_finite(params, run.device, state.global_step)
            return ckpt.save_checkpoint(
                cfg.output_dir, state, model, optimizer, adapter_files(), loss_scaler=scaler,
                keep_last=cfg.keep_last_n_checkpoints, is_main=run.is_main,
                barrier=run.barrier, warn=run.warn)

        # ---- the loop
        for epoch in range(state.epoch, cfg.epochs):
            progress = StepProgress(data.steps_per_epoch, state.step_in_epoch,
                                    f"epoch {epoch + 1}/{cfg.epochs}", show=run.is_main)
            throughput = Throughput()
            for micro_batches in data.steps(epoch, start=state.step_in_epoch):
                # The step's target tokens over every process: each micro-batch's summed loss
                # is divided by them, so k micro-batches (or processes) make one k-times batch.
                tokens = steps.count_tokens(micro_batches, run.device)
                loss_sum = torch.zeros((), device=run.device)
                for batch in micro_batches:
                    batch = steps.to_device(batch, run.device)
                    with run.autocast():
                        loss = loss_fn(model, batch)  # summed over the batch's target tokens
                    (loss * tokens.loss_weight(scaler)).backward()
                    loss_sum += loss.detach()
                mean_loss = steps.mean_loss(loss_sum, tokens, state.global_step + 1)
                result = steps.optimizer_step(
                    optimizer, params, lr=schedule(state.global_step),
                    max_grad_norm=cfg.max_grad_norm, step=state.global_step + 1,
                    loss_scaler=scaler)
                state.step_done()
                progress.update(mean_loss)
                throughput.add(tokens.seen)

                metrics = {}
                if state.global_step % cfg.log_every_n_steps == 0:
                    metrics = step_metrics(
                        epoch=epoch, loss=mean_loss, lr=optimizer.param_groups[0]["lr"],
                        grad_norm=result.grad_norm, stepped=result.stepped,
                        tokens_per_second=throughput.read(), loss_scaler=scaler,
                        device=run.device)
                if data.validation is not None and validation_due(
                        global_step=state.global_step, step_in_epoch=state.step_in_epoch,
                        steps_per_epoch=data.steps_per_epoch, every=cfg.eval_every_n_steps):
                    with throughput.pause():  # tokens/s counts training only
                        val = validate(model, loss_fn, data.validation, run,
                                       batch_size=cfg.batch_size, pad_id=tokenizer.pad_id,
                                       max_batches=cfg.validation_max_batches,
                                       step=state.global_step)
                    metrics.update(val.metrics())
                    if cfg.save_best and state.improves(val.loss):
                        best = ckpt.save_best(cfg.output_dir, state, adapter_files(), val.loss,
                                              is_main=run.is_main)
                        run.print(f"best val_loss so far ({val.loss:.4f} at step "
                                  f"{state.global_step}): {best}")
                run.log(metrics, state.global_step)
                if (cfg.save_every_n_steps and state.global_step % cfg.save_every_n_steps == 0
                        and state.step_in_epoch < data.steps_per_epoch):
                    save()
            progress.close()
            state.epoch_done()
            run.print(f"epoch {epoch + 1} done: checkpoint {save()}")

        # The run's result where a user looks first: PEFT's two files in output_dir.
        write = adapter_files()
        if run.is_main:
            write(Path(cfg.output_dir))
            run.print(f"adapter (PEFT format): {cfg.output_dir}")
        run.barrier()


if __name__ == "__main__":
    sys.exit(recipe_main(main, __doc__))
