"""LoRA and QLoRA fine-tuning of a Llama 2, Llama 3.x, Mistral or Qwen2.5 model: one device,
or FSDP2 shards under torchrun.

    tune run lora_finetune --config llama3_1_8b_qlora [key=value ...]
    tune --nnodes 1 --nproc_per_node 2 lora_finetune.py --config my.yaml

The training loop is full_finetune's, unchanged (``FullFinetuneRecipe.train``); this recipe
changes three things, set by the config's lora_* keys and quantize_base:

* the model: the base (``model_checkpoint``) is loaded and frozen, adapters of rank
  ``lora_rank`` go on ``lora_target_modules``, and with ``quantize_base: nf4`` the block
  linears are stored in NF4 (QLoRA). B starts at zero: step 0 is the base model exactly.
* what trains: the adapters only (the optimizer gets the parameters that require grad).
* what a checkpoint holds: the adapter in PEFT's format, the adapters' optimizer state and
  the progress, written atomically like full checkpoints; a resumed run reloads the base
  from ``model_checkpoint``. At the end the output_dir holds the adapter
  (adapter_config.json + adapter_model.safetensors) that PEFT and vLLM load; ``tune merge``
  folds it into the base, ``tune generate/eval --adapter`` use it as it is.

Under torchrun the model is sharded (FSDP2) on the meta device and each process then fills in
its own shards one weight at a time (the frozen NF4 base included): no process holds the
whole base. The adapters are made from ``seed``, so N processes train what one does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from tune_train import checkpointing as ckpt
from tune_train import lora
from tune_train.errors import RecipeError
from tune_train.recipes import full_finetune
from tune_train.recipes.full_finetune import FullFinetuneRecipe


class LoRAFinetuneRecipe(FullFinetuneRecipe):
    """full_finetune's recipe with adapters on a frozen (optionally NF4) base."""

    lora = True
    description = ("LoRA / QLoRA fine-tuning of a Llama 2, Llama 3.x, Mistral or Qwen2.5 "
                   "model.")

    def _check_checkpoint(self, checkpoint: Path) -> str | None:
        """Read the adapter checkpoint; the weights to load are the base's."""
        try:
            self.resume_adapter = lora.check_adapter_checkpoint(checkpoint, self.model_config)
        except ckpt.DamagedCheckpointError as e:
            raise RecipeError(ckpt.damaged_message(checkpoint, e)) from e
        return self.cfg.model_checkpoint

    def _build_model(self, weights, param_dtype: torch.dtype) -> torch.nn.Module:
        cfg = self.cfg
        problem = lora.nf4_problem(cfg, self.device)
        if problem:
            raise RecipeError(problem)
        self.lora_settings = lora.lora_settings_of(cfg, self.model_config)
        device = torch.device("cpu") if cfg.fsdp_cpu_offload and self.sharded else self.device
        model = lora.build_lora_model(
            self.model_config, self.lora_settings,
            base=Path(weights) if weights is not None else None,
            read_weights=lambda path, model: self._read_weights(path, model, cast=False),
            quantize=cfg.quantize_base, device=device, dtype=param_dtype, seed=cfg.seed,
            prepare_layers=self._prepare_layers, shard=self._shard if self.sharded else None,
            adapter=self.resume_adapter if self.resume_from is not None else None,
            adapter_source=self.resume_from)
        if self.dist.is_main:
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            tqdm.write(f"LoRA rank {self.lora_settings.rank} on "
                       f"{','.join(self.lora_settings.targets)}: {trained:,} trainable "
                       "parameters" + (", NF4 base" if cfg.quantize_base else ""))
        return model

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        return lora.adapter_state(self.model, keep=self.dist.is_main)

    def _write_model(self, folder: Path, state: dict[str, torch.Tensor]) -> None:
        lora.save_adapter(folder, state, self.model_config, self.lora_settings, self.cfg)

    def train(self) -> None:
        super().train()
        # The run's result where a user looks first: PEFT's two files in output_dir.
        state = self._full_state_dict()
        if self.dist.is_main:
            out = lora.save_adapter(Path(self.cfg.output_dir), state, self.model_config,
                                    self.lora_settings, self.cfg)
            tqdm.write(f"adapter (PEFT format): {out}")
        self._barrier()


def cli(argv: list[str] | None = None) -> int:
    """``python lora_finetune.py --config X [key=value ...] [--debug]``."""
    return full_finetune.cli(argv, recipe_class=LoRAFinetuneRecipe)


if __name__ == "__main__":
    sys.exit(cli())
