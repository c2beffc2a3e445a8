"""Fold a LoRA adapter into its base checkpoint: ``tune merge`` and ``merge_adapter``.

The base is a native checkpoint (mmap'd); the adapter a PEFT folder (tune's export or any
PEFT LoRA adapter of a supported module set). The model is made by the one builder
(tune_ckpt.building.inference_model: the base tensors as they are, the adapter on them,
merged by tune_models.merge_lora), so the merged weights are exactly what the training
model computed. The result is written atomically as a native
checkpoint, or converted to a Hugging Face folder by the same converter as
``tune convert_checkpoint --to hf``.

A QLoRA adapter (tune_adapter.json says ``quantize_base: nf4``) was trained against the NF4
version of the base, not the base itself. Merging it therefore quantises the base's block
linears to NF4 first, exactly as the training run did, and dequantises them while merging:
the merged model is the trained model (NF4 base + adapter) in ordinary weights. Its weights
differ from the original base by the NF4 rounding everywhere, not only where the adapter is.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from tune_ckpt.errors import CheckpointError
from tune_ckpt.names import HF_CONFIG_FILE, NATIVE_FILE, NATIVE_SAFETENSORS_FILE

MERGE_FORMATS = ("native", "hf")


def _native_output(output_path: Path) -> Path:
    if output_path.suffix in (".pt", ".safetensors"):
        return output_path
    return output_path / NATIVE_FILE


def merge_adapter(
    checkpoint_path: str | os.PathLike,
    adapter_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    target_format: str = "native",
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Merge a LoRA adapter into a native base checkpoint and write the merged model.

    Args:
        checkpoint_path: The base: a native ``.pt`` / ``.safetensors`` file or its folder
            (with ``tune_model.json``).
        adapter_path: A PEFT LoRA adapter folder (adapter_config.json +
            adapter_model.safetensors).
        output_path: native: a ``.pt`` / ``.safetensors`` file, or a folder that gets
            ``native_pytorch_model.pt``; hf: a folder.
        target_format: "native" or "hf".
        dtype: Cast the merged weights ("bf16", "fp16", "fp32"); default the base's dtype.
        force: Replace an existing output.
        progress: Show progress bars.

    Returns:
        The native file, or the hf folder, written.

    Raises:
        CheckpointError: One line for a missing file, an adapter of another base model
            (shapes, layers, or its recorded model arguments differ), an adapter tune's
            LoRA cannot express, an output that exists (without ``force``) or that is the
            base checkpoint itself.
    """
    from tqdm.auto import tqdm

    from tune_ckpt.adapters import load_peft_adapter
    from tune_ckpt.building import inference_model
    from tune_ckpt.keymaps import check_model_fits
    from tune_ckpt.model_args import read_model
    from tune_ckpt.native import save_native
    from tune_ckpt.reading import check_finite, find_native_file, load_native, parse_dtype
    from tune_models.nf4 import QUANTIZED_MODULES

    if target_format not in MERGE_FORMATS:
        raise CheckpointError(f"unknown target format '{target_format}': use native or hf")
    cast = parse_dtype(dtype)
    base = Path(checkpoint_path).expanduser()
    if not base.exists():
        raise CheckpointError(f"base checkpoint {base} does not exist")
    base_file = find_native_file(base) if base.is_dir() else base
    out = Path(output_path).expanduser()
    if target_format == "native":
        out = _native_output(out)
        if out.resolve() == base_file.resolve():
            raise CheckpointError(f"{out} is the base checkpoint: write the merged model "
                                  "elsewhere (-o)")
    out_folder = out.parent if target_format == "native" else out
    if out_folder.resolve() == base_file.parent.resolve():
        # A folder holds one model: tune generate / eval / convert on it would find the
        # base's native file (and its tune_model.json) and silently use the base.
        raise CheckpointError(f"{out_folder} is the base checkpoint's folder: write the merged "
                              "model to another folder (-o), or tune generate on it would "
                              "load the base")
    if target_format == "native" and out.exists() and not force:
        raise CheckpointError(f"{out} already exists: pass --force to overwrite it")
    if target_format == "hf" and (out / HF_CONFIG_FILE).exists() and not force:
        raise CheckpointError(f"{out} already holds a Hugging Face model: pass --force to "
                              "replace it")

    config, family, origin = read_model(base_file)  # one CheckpointError line for bad arguments
    base_state = load_native(base_file)
    # Names and shapes from the header, before anything is built; then one read of the
    # weights (the merge reads them all anyway) for NaN or infinity.
    check_model_fits(base_state, config, family=family, origin=str(origin), where=str(base_file))
    check_finite(base_state, base_file)
    adapter = load_peft_adapter(adapter_path, config)

    base_dtype = base_state["tok_embeddings.weight"].dtype
    quantised = config.n_layers * len(QUANTIZED_MODULES) if adapter.quantize_base else 0
    with tqdm(total=quantised, unit="matrix", desc="Quantising the base to NF4",
              disable=not progress or not quantised) as bar:
        model = inference_model(config, base_state, adapter, adapter_source=adapter_path,
                                on_quantized=lambda _: bar.update())
    del base_state
    # Finite base and adapter can still overflow the base's dtype when added: check the
    # merged matrices (in memory already; the rest is the base, checked above).
    adapted = {name.split(".lora_")[0] + ".weight" for name in adapter.weights}
    check_finite({k: v for k, v in model.state_dict().items() if k in adapted}, adapter_path,
                 fix=f"after the merge: the adapter's change overflows the base's "
                     f"{str(base_dtype).removeprefix('torch.')}; use another checkpoint of "
                     "the adapter")
    state = {k: v if cast is None or not v.is_floating_point() else v.to(cast)
             for k, v in model.state_dict().items()}
    del model
    if target_format == "native":
        return save_native(state, out, model_args=config, family=family)
    from tune_ckpt.conversion import convert

    out.parent.mkdir(parents=True, exist_ok=True)
    # The HF export goes through the converter (its checks, sharding, config.json); the
    # native file it reads is written beside the output and removed afterwards.
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=out.parent) as tmp:
        merged = save_native(state, Path(tmp) / NATIVE_SAFETENSORS_FILE, model_args=config,
                             family=family)
        del state
        return convert(merged, source_format="native", target_format="hf", output_path=out,
                       force=force, progress=progress)


def run_merge(
    checkpoint_path: str | os.PathLike,
    adapter_path: str | os.PathLike,
    output_path: str | os.PathLike,
    target_format: str = "native",
    dtype: str | None = None,
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """The body of ``tune merge``: merge, then print what was written.

    Raises:
        CheckpointError: With the one line to show the user.
    """
    out = merge_adapter(checkpoint_path, adapter_path, output_path, target_format=target_format,
                        dtype=dtype, force=force, progress=not quiet)
    print(f"Wrote the merged model ({target_format}) to {out}")
    return out
