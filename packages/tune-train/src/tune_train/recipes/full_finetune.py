"""Full fine-tuning: every weight of the model trains, on one device or sharded with FSDP2.

    tune run full_finetune --config llama3_2_1b_full [key=value ...]
    tune --nnodes 1 --nproc_per_node 2 full_finetune.py --config my.yaml

This file is the whole run, top to bottom: set up, build, then the loop (forward and backward
over the micro-batches of each step, the optimizer step, logging, validation, checkpoints).
What every recipe shares is in the tune_train modules it calls. To change the loop, copy it
(``tune recipe cp full_finetune .``), edit the copy and run it by its path
(``tune run ./full_finetune.py --config my.yaml``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tune_train import checkpointing as ckpt
from tune_train import steps
from tune_train.config import TrainConfig
from tune_train.data import training_data
from tune_train.distributed import full_state_dict
from tune_train.metrics import StepProgress, Throughput, step_metrics
from tune_train.optim import DynamicLossScaler, LRSchedule
from tune_train.registry import LOSSES, model_family
from tune_train.run import recipe_main, start_run
from tune_train.setup import build_tokenizer, model_config, optimizer_for, training_model
from tune_train.state import TrainingState
from tune_train.validation import validate, validation_due

RECIPE = "full_finetune"


def main(cfg: TrainConfig) -> None:
    # Checks (names, files, the model's family, output_dir), device, processes, the lock.
    with start_run(cfg, RECIPE, lora=False) as run:
        # ---- build: tokenizer, model (whole or sharded), optimizer, data, progress
        tokenizer = build_tokenizer(cfg)
        config = model_config(cfg, tokenizer)
        start = cfg.model_checkpoint
        if run.resume_from is not None:  # a checkpoint's weights, once all its files check out
            start = ckpt.resume_weights(run.resume_from)
        model = training_model(cfg, run, config, start)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = optimizer_for(cfg, params, run.device)
        scaler = DynamicLossScaler() if cfg.dtype == "fp16" else None
        loss_fn = LOSSES[cfg.loss]
        data = training_data(cfg, tokenizer, run)
        schedule = LRSchedule(cfg.lr, warmup_steps=cfg.warmup_steps, schedule=cfg.lr_scheduler,
                              total_steps=data.steps_per_epoch * cfg.epochs,
                              min_lr_ratio=cfg.min_lr_ratio)
        state = TrainingState(RECIPE, world_size=run.dist.world_size, batch_size=cfg.batch_size,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps)
        if run.resume_from is not None:  # optimizer, progress and RNG; the weights are in
            state = ckpt.load_training_state(run.resume_from, model, optimizer, state,
                                             data.steps_per_epoch, loss_scaler=scaler)
            run.print(f"resumed from {run.resume_from} (epoch {state.epoch}, step "
                      f"{state.global_step})")
        state.note_best(ckpt.read_best_info(cfg.output_dir))
        run.start_logging()  # config.yaml and the metric loggers

        def model_files():  # every process: FSDP gathers the full weights on the main one
            weights = full_state_dict(model, keep=run.is_main)
            return ckpt.model_writer(weights, config, model_family(cfg).name,
                                     cfg.checkpoint_format)

        def save() -> Path:
            steps.check_weights_finite(params, run.device, state.global_step)
            return ckpt.save_checkpoint(cfg.output_dir, state, model, optimizer, model_files(),
                                 loss_scaler=scaler, keep_last=cfg.keep_last_n_checkpoints,
                                 is_main=run.is_main, barrier=run.barrier, warn=run.warn)

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
                        best = ckpt.save_best(cfg.output_dir, state, model_files(), val.loss,
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


if __name__ == "__main__":
    sys.exit(recipe_main(main, __doc__))
