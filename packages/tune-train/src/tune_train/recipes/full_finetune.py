"""Full fine-tuning of a Llama 2, Llama 3.x, Mistral or Qwen2.5 model: one device, or FSDP2
shards under torchrun.

    tune run full_finetune --config llama3_2_1b_full [key=value ...]
    tune --nnodes 1 --nproc_per_node 2 full_finetune.py --config my.yaml

This file is also a script (``python full_finetune.py --config my.yaml``); copy it with
``tune recipe cp full_finetune .`` to change the loop, and launch the copy by its path.
The whole training loop is visible in ``FullFinetuneRecipe.train``.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from tune_train import checkpointing as ckpt
from tune_train.config import (
    ConfigError,
    TrainConfig,
    dump_config,
    load_config,
    validation_fraction,
)
from tune_train.distributed import (
    DistInfo,
    all_reduce_sum,
    cleanup_distributed,
    init_distributed,
    shard_model,
)
from tune_train.errors import RecipeError, explain, user_errors
from tune_train.metrics import StepProgress, quiet_library_progress_bars
from tune_train.optim import DynamicLossScaler, lr_multiplier
from tune_train.output_dir import OutputDirError, OutputDirLock, claim_output_dir
from tune_train.validate import missing_files, model_problems

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class FullFinetuneRecipe:
    """setup() builds everything, train() runs the loop, cleanup() releases resources.

    Args:
        cfg: The checked training config.
    """

    lora = False  # lora_finetune's recipe: adapters on a frozen base (tune_train.lora)
    description = "Full fine-tuning of a Llama 2, Llama 3.x, Mistral or Qwen2.5 model."

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.global_step = 0  # optimizer steps taken
        self.epoch = 0
        self.step_in_epoch = 0  # optimizer steps taken in self.epoch
        self.loggers = None
        self.output_lock: OutputDirLock | None = None
        self.validation = None  # the validation samples, when the config names some
        self.best_val_loss: float | None = None  # lowest validation loss so far (save_best)
        self.best_val_step: int | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        from tune_train import registry

        # Cheap checks first: a typo, or a tokenizer or checkpoint of another model family,
        # must not cost a model load.
        registry.lookup(registry.MODELS, cfg.model, "model")
        registry.lookup(registry.TOKENIZERS, cfg.tokenizer, "tokenizer")
        dataset_fn = registry.lookup(registry.DATASETS, cfg.dataset, "dataset")
        self.optimizer_cls = registry.lookup(registry.OPTIMIZERS, cfg.optimizer, "optimizer")
        self.loss_fn = registry.lookup(registry.LOSSES, cfg.loss, "loss")
        registry.dataset_arguments(dataset_fn, cfg)  # a wrong dataset_args key fails here
        problems = missing_files(cfg)
        if problems:
            raise RecipeError(problems[0])
        problems = model_problems(cfg)  # model_args, tokenizer and checkpoint vs the family
        if problems:
            raise ConfigError(problems[0])
        from tune_train.lora import recipe_problem

        problem = recipe_problem(cfg, self.lora)
        if problem:
            raise ConfigError(problem)

        self.device = _resolve_device(cfg.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.dtype = DTYPES[cfg.dtype]
        cuda = self.device.type == "cuda"
        if cfg.dtype == "bf16" and cuda and not torch.cuda.is_bf16_supported():
            raise RecipeError("this GPU has no bf16 support; use dtype: fp16 or fp32")
        torch.manual_seed(cfg.seed)

        if self.dist.distributed and not cfg.enable_fsdp:
            raise RecipeError(f"{self.dist.world_size} processes were launched but enable_fsdp "
                              "is False; set enable_fsdp: True (or launch one process)")

        output_dir = Path(cfg.output_dir)
        # Nothing in output_dir is touched before this run holds it alone.
        self._on_main_rank(self._claim_output_dir)
        self.resume_from = ckpt.latest_checkpoint(output_dir)
        best = ckpt.read_best_info(output_dir)
        if (self.resume_from is not None or best is not None) and not cfg.resume_from_checkpoint:
            raise RecipeError(
                f"{output_dir} already holds checkpoints of an earlier run; set "
                "resume_from_checkpoint: True to continue it, or pick another output_dir"
            )

        self.tokenizer = registry.build_tokenizer(cfg)
        self.model_config = self._model_config()
        weights = cfg.model_checkpoint
        if self.resume_from is not None:
            weights = self._check_checkpoint(self.resume_from)
        self.model = self._setup_model(weights)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self._setup_optimizer()
        self.loss_scaler = DynamicLossScaler() if cfg.dtype == "fp16" else None
        # Single-device fp16 keeps fp32 master weights and runs the forward under autocast;
        # under FSDP the mixed-precision policy does the casting instead.
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.float16)
            if cfg.dtype == "fp16" and not self.sharded
            else nullcontext()
        )
        self._setup_data()
        self.total_steps = self.steps_per_epoch * cfg.epochs

        if self.resume_from is not None:
            self._resume(self.resume_from)
        elif cfg.resume_from_checkpoint and self.dist.is_main:
            tqdm.write(f"resume_from_checkpoint: no checkpoint in {output_dir} yet, starting "
                       "from the beginning")
        if best is not None and (self.best_val_loss is None
                                 or best["val_loss"] < self.best_val_loss):
            # checkpoints/best was saved after the checkpoint resumed from (the run was killed
            # before its next one): only a lower loss may replace what it holds.
            self.best_val_step, self.best_val_loss = best["step"], best["val_loss"]
        if self.dist.is_main:
            (output_dir / "config.yaml").write_text(dump_config(cfg))
            self.loggers = self._setup_loggers()

    def _claim_output_dir(self) -> None:
        try:
            self.output_lock = claim_output_dir(self.cfg.output_dir)
        except OutputDirError as e:
            raise RecipeError(str(e)) from e
        ckpt.remove_partial_checkpoints(self.cfg.output_dir)

    def _on_main_rank(self, work) -> None:
        """Run ``work`` on rank 0 only; if it fails there, every rank stops with its message
        (instead of the others waiting for rank 0 until a timeout)."""
        error = None
        if self.dist.is_main:
            try:
                work()
            except RecipeError as e:
                if not self.dist.distributed:
                    raise
                error = e
        if self.dist.distributed:
            message = [str(error) if error is not None else None]
            dist.broadcast_object_list(message, src=0)
            if error is not None:
                raise error
            if message[0] is not None:
                raise RecipeError(message[0])

    def _model_config(self):
        from tune_train import registry

        cfg = self.cfg
        model_config = registry.model_config(cfg, vocab_size=self.tokenizer.vocab_size)
        if self.tokenizer.vocab_size > model_config.vocab_size:
            family = registry.model_family(cfg)
            raise RecipeError(
                f"tokenizer_checkpoint {cfg.tokenizer_checkpoint} has "
                f"{self.tokenizer.vocab_size:,} tokens but model '{cfg.model}' only "
                f"{model_config.vocab_size:,} (its vocab_size): ids past that have no "
                f"embedding; point tokenizer_checkpoint at the model's own tokenizer (a "
                f"{family.name} model reads {registry.family_tokenizer_files(family)})"
            )
        return model_config

    def _check_checkpoint(self, checkpoint: Path) -> Path:
        """Check a checkpoint to resume from; returns the model weights to load."""
        return _model_file(checkpoint)

    def _prepare_layers(self, model: torch.nn.Module) -> None:
        cfg = self.cfg
        for layer in model.layers:
            layer.use_checkpoint = cfg.enable_activation_checkpointing
        if cfg.compile:
            for layer in model.layers:
                layer.compile()

    def _setup_model(self, weights: str | Path | None) -> torch.nn.Module:
        cfg = self.cfg
        self.sharded = cfg.enable_fsdp and self.dist.initialized
        if cfg.enable_fsdp and not self.sharded:
            _warn_once(self.dist, "enable_fsdp is on but the recipe was not launched by "
                       "torchrun; running unsharded (launch with --nproc_per_node N to shard)")
        if cfg.fsdp_cpu_offload and not self.sharded:
            _warn_once(self.dist, "fsdp_cpu_offload only applies to FSDP: set enable_fsdp: "
                       "True and launch with torchrun (tune --nproc_per_node N ...)")
        param_dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        return self._build_model(weights, param_dtype)

    def _shard(self, model: torch.nn.Module) -> None:
        cfg = self.cfg
        shard_model(
            model,
            param_dtype=torch.float16 if cfg.dtype == "fp16" else None,
            reduce_dtype=torch.float32 if cfg.dtype == "fp16" else None,
            cpu_offload=cfg.fsdp_cpu_offload,
        )

    def _build_model(self, weights: str | Path | None,
                     param_dtype: torch.dtype) -> torch.nn.Module:
        from tune_models import Decoder

        cfg = self.cfg
        with torch.device("meta"):
            model = Decoder(self.model_config)
        model.to(dtype=param_dtype)
        self._prepare_layers(model)
        if not self.sharded:
            if weights is not None:
                # Straight from the mmap'd file into the parameters: no second copy in memory.
                model.load_state_dict(self._read_weights(Path(weights), model), assign=True)
                return model.to(device=self.device, dtype=param_dtype)
            # Initialise where training happens: a 7B model is minutes of CPU work.
            model.to_empty(device=self.device)
            self._init_weights(model)
            return model

        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        self._shard(model)
        model.to_empty(device="cpu" if cfg.fsdp_cpu_offload else self.device)
        if weights is None:
            # Each rank initialises its own shards: a valid random init, though not the same
            # numbers as a single-process run (start from a checkpoint when that matters).
            self._init_weights(model)
            return model
        # Rank 0 reads the file; the others receive their shards from it.
        state = self._read_weights(Path(weights), model) if self.dist.is_main else {}
        set_model_state_dict(
            model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        return model

    def _init_weights(self, model: torch.nn.Module) -> None:
        torch.manual_seed(self.cfg.seed)
        with torch.no_grad(), warnings.catch_warnings():
            # Sharded (DTensor) init on a CPU mesh warns that its random streams are not
            # coordinated across ranks; that is expected and documented above.
            warnings.filterwarnings("ignore", message="DTensor random operators")
            model.init_weights()

    def _read_weights(self, path: Path, model: torch.nn.Module,
                      cast: bool = True) -> dict[str, torch.Tensor]:
        """A native checkpoint as a state dict (mmap'd), checked key by key against the
        model; ``cast`` converts every tensor to the model's dtype at once."""
        from tune_ckpt import CheckpointError, load_native

        try:
            state = load_native(path)
        except CheckpointError as e:
            raise RecipeError(str(e)) from e
        _check_state_dict(state, model, path, self.cfg.model)
        if not cast:
            return state
        dtype = next(iter(model.parameters())).dtype
        # Cast while loading so a bf16 checkpoint trains in fp32 (and vice versa).
        return {k: v if v.dtype == dtype else v.to(dtype) for k, v in state.items()}

    def _setup_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, **cfg.optimizer_args)
        if (self.device.type == "cuda" and self.optimizer_cls is not torch.optim.SGD
                and "fused" not in kwargs and not cfg.fsdp_cpu_offload):
            kwargs["fused"] = True  # one kernel for the whole update instead of one per tensor
        try:
            return self.optimizer_cls(self.params, **kwargs)
        except TypeError as e:
            raise ConfigError(f"optimizer_args do not fit {cfg.optimizer}: {e}") from e

    def _setup_data(self) -> None:
        from tune_data import ShardedBatchSampler, check_trainable, collate, pack
        from tune_train import registry

        cfg = self.cfg
        dataset = registry.build_dataset(cfg, self.tokenizer,
                                         warn=lambda line: _warn_once(self.dist, line))
        check_trainable(dataset)  # no samples, or no trained token: stop before step 1
        dataset = self._setup_validation(dataset)
        if cfg.packing:
            dataset = pack(dataset, cfg.max_seq_len, pad_id=self.tokenizer.pad_id)
        self.dataset = dataset
        self.sampler = ShardedBatchSampler(
            dataset, cfg.batch_size, rank=self.dist.rank, world_size=self.dist.world_size,
            shuffle=cfg.shuffle, seed=cfg.seed, drop_last=True,
            group_by_length=cfg.group_by_length and not cfg.packing,
        )
        pad_id = self.tokenizer.pad_id
        real_lengths = getattr(dataset, "real_lengths", getattr(dataset, "lengths", None))

        def collate_indices(indices):
            batch = collate([dataset[i] for i in indices], pad_id=pad_id)
            if real_lengths is not None:
                batch["real_tokens"] = int(real_lengths[indices].sum())
            return batch

        self.collate = collate_indices
        micro_batches = len(self.sampler)
        if micro_batches == 0:
            raise RecipeError(
                f"{len(dataset)} samples are too few for batch_size {cfg.batch_size} on "
                f"{self.dist.world_size} process(es); lower batch_size"
            )
        self.steps_per_epoch = math.ceil(micro_batches / cfg.gradient_accumulation_steps)
        if cfg.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)

    def _setup_validation(self, dataset):
        """Build the validation set: held out of ``dataset`` (validation_split: 0.05) or from
        its own source. Returns the samples left to train on."""
        from tune_train import registry
        from tune_train.validation import NO_TARGETS, Selection, holdout_split

        cfg = self.cfg
        fraction = validation_fraction(cfg)
        if fraction is not None:
            train, held = holdout_split(dataset, fraction, cfg.seed)
            self.validation = Selection(dataset, held)
            dataset = Selection(dataset, train)
            where = f"held out of the training data ({fraction:g})"
        else:
            self.validation = registry.build_validation_dataset(
                cfg, self.tokenizer, warn=lambda line: _warn_once(self.dist, line))
            where = "from " + (getattr(self.validation, "name", "") or "the validation source")
        if self.validation is None:
            return dataset
        if len(self.validation) == 0:
            raise RecipeError("the validation data holds no samples; check "
                              "validation_data_files / validation_dataset_source")
        targets = getattr(self.validation, "loss_tokens", None)
        if targets is not None and int(targets.sum()) == 0:
            raise RecipeError(NO_TARGETS)
        if self.dist.is_main:
            tqdm.write(f"validation: {len(self.validation)} samples {where}")
        return dataset

    def _setup_loggers(self):
        from tune_train import metrics

        cfg = self.cfg
        out = Path(cfg.output_dir)
        loggers = []
        for name in cfg.metric_loggers:
            if name == "stdout":
                loggers.append(metrics.StdoutLogger(write=tqdm.write))
            elif name == "jsonl":
                loggers.append(metrics.JsonlLogger(out / "metrics.jsonl"))
            elif name == "tensorboard":
                loggers.append(metrics.TensorBoardLogger(out / "tensorboard"))
            elif name == "wandb":
                w = cfg.wandb
                loggers.append(metrics.WandbLogger(w.project, w.entity, w.mode, w.run_name,
                                                   out, config=vars(cfg).copy()))
        return metrics.MetricLoggers(loggers)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write model, optimizer and progress; returns the checkpoint folder.

        Raises:
            RecipeError: If it cannot be written (e.g. the disk is full); the staging folder
                is removed and the previous checkpoint stays the latest.
        """
        from tune_ckpt import CheckpointError

        cfg = self.cfg
        final = ckpt.checkpoint_root(cfg.output_dir) / f"step_{self.global_step:07d}"
        state = self._full_state_dict()
        try:
            with ckpt.staging_dir(cfg.output_dir, self.global_step, self.dist.is_main) as tmp:
                self._barrier()  # the staging folder exists before anyone writes into it
                if self.dist.is_main:
                    self._write_model(tmp, state)
                    torch.save(ckpt.rng_state(), tmp / ckpt.RNG_STATE)
                ckpt.save_optimizer_state(tmp / ckpt.TRAINING_STATE, self.model, self.optimizer)
                if self.dist.is_main:
                    ckpt.write_json(tmp / ckpt.TRAINER_STATE, {
                        "global_step": self.global_step,
                        "epoch": self.epoch,
                        "step_in_epoch": self.step_in_epoch,
                        "world_size": self.dist.world_size,
                        "batch_size": cfg.batch_size,
                        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                        "loss_scaler": (self.loss_scaler.state_dict() if self.loss_scaler
                                        else None),
                        "best_val_loss": self.best_val_loss,
                        "best_val_step": self.best_val_step,
                    })
                self._barrier()  # every shard is on disk before rank 0 publishes
        except (OSError, RuntimeError, CheckpointError) as e:
            if isinstance(e, RuntimeError) and ckpt.os_error_in(e) is None:
                raise  # not a failed write: a bug worth its traceback
            raise RecipeError(ckpt.save_failed_message(final, e)) from e
        if self.dist.is_main:
            for kept, foreign in ckpt.prune_checkpoints(cfg.output_dir,
                                                        cfg.keep_last_n_checkpoints):
                _warn_once(self.dist, f"{kept} holds {foreign}, which training did not write: "
                           "the checkpoint is kept whole past keep_last_n_checkpoints; move "
                           f"{foreign} elsewhere and delete the folder when you are done")
        self._barrier()
        return final

    def save_best(self, val_loss: float) -> Path:
        """Replace ``checkpoints/best`` with the model as it is now, whose validation loss is
        ``val_loss``: the model files of a step folder and ``best.json`` (step, val_loss).

        Raises:
            RecipeError: If it cannot be written; the previous best stays as it was.
        """
        from tune_ckpt import CheckpointError

        cfg = self.cfg
        best = ckpt.checkpoint_root(cfg.output_dir) / ckpt.BEST_DIR
        state = self._full_state_dict()
        try:
            with ckpt.staging_best(cfg.output_dir, self.dist.is_main) as tmp:
                if self.dist.is_main:
                    self._write_model(tmp, state)
                    ckpt.write_json(tmp / ckpt.BEST_INFO,
                                    {"step": self.global_step, "val_loss": val_loss})
        except (OSError, RuntimeError, CheckpointError) as e:
            if isinstance(e, RuntimeError) and ckpt.os_error_in(e) is None:
                raise
            kept = (f"it still holds the model of step {self.best_val_step}"
                    if self.best_val_step is not None else "there is none yet")
            raise RecipeError(f"could not save the best model to {best}: "
                              f"{ckpt.failure_reason(e)}; {kept}") from e
        self.best_val_loss, self.best_val_step = val_loss, self.global_step
        if self.dist.is_main:
            tqdm.write(f"best val_loss so far ({val_loss:.4f} at step {self.global_step}): "
                       f"{best}")
        return best

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) weights, gathered on rank 0 only (empty elsewhere), in CPU memory."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _write_model(self, folder: Path, state: dict[str, torch.Tensor]) -> None:
        """What tune generate, eval and convert read: the weights and the model's shape."""
        from tune_ckpt import save_native, write_model_args
        from tune_train import registry

        save_native(state, folder / ckpt.MODEL_FILES[self.cfg.checkpoint_format])
        # The family travels with the weights: tune generate --chat and a later fine-tune of
        # this checkpoint read it even where the run's config.yaml is not beside it.
        write_model_args(folder, _model_args(self.model_config),
                         family=registry.model_family(self.cfg).name)

    def _resume(self, latest: Path) -> None:
        """Restore optimizer, progress and RNG; the weights were loaded by _setup_model."""
        try:
            state = ckpt.read_trainer_state(latest)
            ckpt.load_optimizer_state(latest / ckpt.TRAINING_STATE, self.model, self.optimizer)
            rng = ckpt.load_rng_state(latest)
        except ckpt.DamagedCheckpointError as e:
            raise RecipeError(ckpt.damaged_message(latest, e)) from e
        ckpt.set_rng_state(rng)
        if self.loss_scaler and state.get("loss_scaler"):
            self.loss_scaler.load_state_dict(state["loss_scaler"])
        self.best_val_loss = state.get("best_val_loss")
        self.best_val_step = state.get("best_val_step")
        self.global_step = state["global_step"]
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        old_global = state["world_size"] * state["batch_size"]
        new_global = self.dist.world_size * self.cfg.batch_size
        if old_global != new_global:
            # Another global batch: keep the fraction of the epoch already seen.
            self.step_in_epoch = self.step_in_epoch * old_global // new_global
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if self.dist.is_main:
            tqdm.write(f"resumed from {latest} (epoch {self.epoch}, step {self.global_step})")

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        cfg = self.cfg
        accum = cfg.gradient_accumulation_steps
        for epoch in range(self.epoch, cfg.epochs):
            self.epoch = epoch
            # The epoch's batch order is a pure function of (seed, epoch, world size), so a
            # resumed run skips exactly the batches the interrupted one had consumed.
            batches = iter(self.sampler.epoch_batches(epoch)[self.step_in_epoch * accum:])
            progress = StepProgress(self.steps_per_epoch, self.step_in_epoch,
                                    f"epoch {epoch + 1}/{cfg.epochs}", show=self.dist.is_main)
            tokens_since_log, time_since_log = 0, time.perf_counter()
            while self.step_in_epoch < self.steps_per_epoch:
                micro = [self.collate(b) for _, b in zip(range(accum), batches)]
                if not micro:
                    break
                # Normalise by the target tokens of the whole step, on every rank, so k
                # micro-batches (or k ranks) give the update of one k-times bigger batch.
                n_local = sum(int((m["labels"] != -100).sum()) for m in micro)
                counts = all_reduce_sum(torch.tensor([float(n_local), float(sum(
                    self._real_tokens(m) for m in micro))], device=self.device))
                n_global, seen_tokens = counts.tolist()
                loss_sum = torch.zeros((), device=self.device)
                scale = self.loss_scaler.scale if self.loss_scaler else 1.0
                # FSDP averages gradients over ranks; undo that to keep a sum over tokens.
                divisor = max(n_global, 1.0) / self.dist.world_size
                for m in micro:
                    batch = {k: v.to(self.device, non_blocking=True) for k, v in m.items()
                             if k != "real_tokens"}
                    with self.autocast:
                        loss = self.loss_fn(self.model, batch)
                    (loss * (scale / divisor)).backward()
                    loss_sum += loss.detach()

                mean_loss = all_reduce_sum(loss_sum).item() / max(n_global, 1.0)
                if not math.isfinite(mean_loss):
                    raise self._diverged(self.global_step + 1, f"the loss is {mean_loss}")
                grad_norm, stepped = self._optimizer_step()
                self.global_step += 1
                self.step_in_epoch += 1
                tokens_since_log += seen_tokens
                progress.update(mean_loss)
                metrics = {}
                if self.global_step % cfg.log_every_n_steps == 0 and self.loggers:
                    elapsed = time.perf_counter() - time_since_log
                    metrics = self._metrics(mean_loss, grad_norm, stepped,
                                            tokens_since_log / elapsed)
                    tokens_since_log, time_since_log = 0, time.perf_counter()
                if self._validation_due():
                    started = time.perf_counter()
                    metrics.update(self.validate())
                    time_since_log += time.perf_counter() - started  # tokens/s: training only
                if metrics and self.loggers:
                    self.loggers.log(metrics, self.global_step)
                if cfg.save_every_n_steps and self.global_step % cfg.save_every_n_steps == 0 \
                        and self.step_in_epoch < self.steps_per_epoch:
                    self._check_weights_finite()
                    self.save_checkpoint()
            progress.close()
            self.epoch, self.step_in_epoch = epoch + 1, 0
            self._check_weights_finite()
            path = self.save_checkpoint()
            if self.dist.is_main:
                tqdm.write(f"epoch {epoch + 1} done: checkpoint {path}")

    def _validation_due(self) -> bool:
        # A pure function of the step, so a resumed run validates where an uninterrupted one
        # did (before the step's checkpoint, which then records the best so far).
        every = self.cfg.eval_every_n_steps
        return self.validation is not None and (
            self.step_in_epoch >= self.steps_per_epoch
            or (every is not None and self.global_step % every == 0))

    def validate(self) -> dict[str, float]:
        """The validation loss of the model as it is now, each process scoring its share;
        with save_best, a new lowest loss replaces ``checkpoints/best``.

        Returns:
            The metrics to log: ``val_loss`` (per target token, over all processes) and
            ``val_perplexity``.
        """
        from functools import partial

        from tune_data import collate
        from tune_train.validation import collated, validation_batches, validation_loss

        cfg = self.cfg
        batches = validation_batches(
            len(self.validation), cfg.batch_size, rank=self.dist.rank,
            world_size=self.dist.world_size, max_batches=cfg.validation_max_batches,
            lengths=getattr(self.validation, "lengths", None))
        progress = StepProgress(len(batches), 0, f"validation at step {self.global_step}",
                                show=self.dist.is_main, unit="batch", leave=False)
        try:
            result = validation_loss(
                self.model, self.loss_fn,
                collated(self.validation, batches, partial(collate, pad_id=self.tokenizer.pad_id)),
                self.device, self.autocast, on_batch=progress.update)
        finally:
            progress.close()
        if cfg.save_best and math.isfinite(result.loss) and (
                self.best_val_loss is None or result.loss < self.best_val_loss):
            self.save_best(result.loss)
        return result.metrics()

    def _real_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        # Tokens/s counts what the model had to read, not padding.
        return int(batch["real_tokens"]) if "real_tokens" in batch else batch["tokens"].numel()

    def _optimizer_step(self) -> tuple[float, bool]:
        cfg = self.cfg
        if self.loss_scaler:
            self.loss_scaler.unscale_(self.params)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_multiplier(
                self.global_step, warmup_steps=cfg.warmup_steps, total_steps=self.total_steps,
                schedule=cfg.lr_scheduler, min_lr_ratio=cfg.min_lr_ratio)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        finite = math.isfinite(grad_norm)
        if not finite and not (self.loss_scaler and self.loss_scaler.can_back_off):
            # fp16's loss scaler skips a step whose scaled gradients overflowed and retries
            # at a lower scale; anything else is divergence, and stepping would ruin weights.
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(self.global_step + 1, f"the gradient norm is {grad_norm}")
        stepped = True
        if self.loss_scaler:
            stepped = self.loss_scaler.update(finite)
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, stepped

    def _diverged(self, step: int, problem: str) -> RecipeError:
        """The error that stops a run whose numbers stopped being finite, before any harm."""
        latest = ckpt.latest_checkpoint(self.cfg.output_dir)
        kept = (f"the latest checkpoint, {latest}, is unchanged" if latest is not None
                else "no checkpoint was written")
        return RecipeError(
            f"training diverged at step {step}: {problem}; {kept}. Lower lr (now "
            f"{self.cfg.lr:g}) or clip gradients (max_grad_norm), then resume with "
            "resume_from_checkpoint: True"
        )

    def _check_weights_finite(self) -> None:
        """Refuse to checkpoint weights that hold inf or nan (a step with a finite loss and
        gradient can still overflow them); the previous checkpoint stays the latest."""
        bad = torch.zeros((), device=self.device)
        with torch.no_grad():
            for p in self.params:  # the trained ones: frozen weights cannot change
                local = p.to_local() if hasattr(p, "to_local") else p  # this rank's shard
                bad += (~torch.isfinite(local)).any().to(bad.device)
        if all_reduce_sum(bad).item():
            raise self._diverged(self.global_step, "its update made some weights inf or nan")

    def _metrics(self, loss: float, grad_norm: float, stepped: bool,
                 tokens_per_second: float) -> dict[str, float]:
        metrics = {
            "epoch": float(self.epoch + 1),
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "tokens_per_second": tokens_per_second,
        }
        if self.loss_scaler:
            metrics["loss_scale"] = self.loss_scaler.scale
            metrics["skipped_step"] = float(not stepped)
        if self.device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            # ru_maxrss is in KiB on Linux: the process's peak resident memory.
            metrics["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return metrics

    def _barrier(self) -> None:
        if self.dist.distributed:
            dist.barrier()

    def cleanup(self) -> None:
        if self.loggers:
            self.loggers.close()
            if self.cfg.plot and "jsonl" in self.cfg.metric_loggers:
                try:
                    from tune_train.plot import PlotError, plot_metrics

                    png = plot_metrics(Path(self.cfg.output_dir) / "metrics.jsonl")
                    tqdm.write(f"loss curve: {png}")
                except (PlotError, FileNotFoundError) as e:
                    tqdm.write(f"no loss curve drawn: {e}")
        if self.output_lock is not None:
            self.output_lock.release()
        cleanup_distributed()


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device is '{name}' but no CUDA GPU is visible; set device: cpu "
                          "(or auto)")
    return device


def _model_file(checkpoint: Path) -> Path:
    """The model file to resume from, once every file of the checkpoint has been checked."""
    try:
        return ckpt.check_checkpoint(checkpoint)
    except ckpt.DamagedCheckpointError as e:
        raise RecipeError(ckpt.damaged_message(checkpoint, e)) from e


def _check_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module, path: Path,
                      model_name: str) -> None:
    expected = {k: tuple(shape) for k, shape in _full_shapes(model).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    from tune_models import family_of

    hint = (f"; is it a checkpoint of '{model_name}' ({family_of(model_name).name}) in native "
            "format?")
    if missing:
        raise RecipeError(f"{path} lacks {len(missing)} key(s) of model '{model_name}', e.g. "
                          f"'{missing[0]}'{hint}")
    if unexpected:
        raise RecipeError(f"{path} has key(s) model '{model_name}' does not, e.g. "
                          f"'{unexpected[0]}'{hint}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise RecipeError(f"{path}: '{key}' has shape {tuple(state[key].shape)}, model "
                              f"'{model_name}' expects {shape}{hint}")


def _full_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    # Under FSDP2 parameters are DTensors: their .shape is the full (unsharded) shape.
    return {k: v.shape for k, v in model.state_dict().items()}


def _model_args(model_config) -> dict:
    return {k: v for k, v in vars(model_config).items()}


_warned: set[str] = set()


def _warn_once(info: DistInfo, message: str) -> None:
    if info.is_main and message not in _warned:
        _warned.add(message)
        tqdm.write(f"warning: {message}")


def main(cfg: TrainConfig, recipe_class: type[FullFinetuneRecipe] | None = None) -> None:
    """Run the recipe (by default this one) end to end."""
    recipe = (recipe_class or FullFinetuneRecipe)(cfg)
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()


def cli(argv: list[str] | None = None,
        recipe_class: type[FullFinetuneRecipe] | None = None) -> int:
    """``python full_finetune.py --config X [key=value ...] [--debug]``."""
    recipe_class = recipe_class or FullFinetuneRecipe
    parser = argparse.ArgumentParser(description=recipe_class.description)
    parser.add_argument("--config", help="YAML file or built-in config name (default: none, "
                        "only defaults and overrides)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-4")
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("TUNE_DEBUG") == "1"
    quiet_library_progress_bars()
    try:
        main(load_config(args.config, args.overrides), recipe_class)
    except (KeyboardInterrupt, *user_errors()) as e:
        if debug and not isinstance(e, KeyboardInterrupt):
            raise
        message, status = explain(e)
        _report(message)
        return status
    except Exception as e:
        if debug or not _lost_a_peer(e):
            raise
        # Another rank died (killed, out of memory, node lost): torchrun stops the job; a
        # traceback from every survivor would only bury the cause.
        _report(f"lost contact with another training process ({str(e).splitlines()[0][:200]})")
        return 1
    return 0


def _report(message: str) -> None:
    # Every process hits the same config mistake: one line per node, from its first process.
    if os.environ.get("LOCAL_RANK", "0") == "0":
        rank = os.environ.get("RANK", "0")
        prefix = f"[rank {rank}] " if rank != "0" else ""
        print(f"{prefix}error: {message}", file=sys.stderr)


def _lost_a_peer(error: Exception) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return False
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        mark in text for mark in ("Connection closed by peer", "Connection reset by peer",
                                  "gloo", "NCCL", "Broken pipe"))


if __name__ == "__main__":
    sys.exit(cli())
