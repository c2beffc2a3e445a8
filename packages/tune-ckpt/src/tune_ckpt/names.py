"""The file names of the checkpoint layouts tune reads and writes, each defined once.

tune-train imports these too (its checkpoint folders hold a native model file and its
sidecar), so the training recipe, the model loader and the converter's format detection agree
on what a native checkpoint looks like. Importing this module loads nothing else.
"""

from __future__ import annotations

# tune's native layout: one weights file (either format) and the model's shape beside it.
NATIVE_FILE = "native_pytorch_model.pt"
NATIVE_SAFETENSORS_FILE = "native_pytorch_model.safetensors"
NATIVE_FILES = (NATIVE_FILE, NATIVE_SAFETENSORS_FILE)
MODEL_ARGS_FILE = "tune_model.json"

# Meta's layout: consolidated.00.pth ... (model-parallel shards) and params.json.
META_PARAMS_FILE = "params.json"
META_SHARD_PATTERN = r"^consolidated\.(\d+)\.pth$"
META_FIRST_SHARD = "consolidated.00.pth"

# Hugging Face's layout.
HF_CONFIG_FILE = "config.json"
HF_GENERATION_CONFIG_FILE = "generation_config.json"
HF_SAFETENSORS_FILE = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_BIN_FILE = "pytorch_model.bin"
HF_BIN_INDEX = "pytorch_model.bin.index.json"
HF_SHARD_PATTERN = r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$"

# LoRA adapters: PEFT's two files (safetensors first; .bin is PEFT's older format), and tune's
# sidecar with the base model's shape and whether the base was quantised (QLoRA).
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_SIDECAR_FILE = "tune_adapter.json"

# Default output folders of `convert --to hf` / `--to meta`, beside the input.
HF_EXPORT_DIR = "hf_model"
META_EXPORT_DIR = "meta_model"
