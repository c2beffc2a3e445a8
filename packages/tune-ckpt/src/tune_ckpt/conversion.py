"""Streaming conversion between Meta, Hugging Face and native checkpoints, for every family.

Every conversion goes through the native layout: the source is opened lazily (mmap'd files,
shapes from headers), its model read from params.json / config.json / tune_model.json (a
:class:`tune_models.DecoderConfig` and a family), checked key by key against that model,
mapped to native plans, then to the target's plans, and written one tensor at a time. Peak
memory is about one tensor (the largest is the embedding: 262 MB for Llama 2 7B in bf16), not
the model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tune_ckpt.errors import CheckpointError
from tune_ckpt.hf_config import (
    config_from_hf,
    generation_config_for,
    hf_config_for,
    multimodal_of,
)
from tune_ckpt.keymaps import (
    FORMATS,
    LAYOUTS,
    NATIVE_KEYS,
    plan_from_native,
    plan_to_native,
)
from tune_ckpt.meta_params import meta_params_for
from tune_ckpt.model_args import meta_model, read_json, read_sidecar, write_model_args
from tune_ckpt.names import (
    HF_BIN_FILE,
    HF_BIN_INDEX,
    HF_CONFIG_FILE,
    HF_EXPORT_DIR,
    HF_GENERATION_CONFIG_FILE,
    HF_SAFETENSORS_FILE,
    HF_SAFETENSORS_INDEX,
    HF_SHARD_PATTERN,
    META_EXPORT_DIR,
    META_FIRST_SHARD,
    META_PARAMS_FILE,
    META_SHARD_PATTERN,
    MODEL_ARGS_FILE,
    NATIVE_FILE,
    NATIVE_FILES,
)
from tune_ckpt.plan import PlanSource, RenamedSource, TensorPlan, TensorSource, cast_plans
from tune_ckpt.reading import (
    dtype_name,
    find_native_file,
    is_legacy_native_folder,
    open_tensor_files,
    parse_dtype,
    read_tensor_file,
)
from tune_ckpt.shards import meta_shard_files, open_meta_shards
from tune_ckpt.writing import (
    staged_folder,
    write_safetensors_file,
    write_tensor_file,
    write_text_atomic,
    write_torch_file,
)
from tune_models import FAMILIES, DecoderConfig

_META_SHARD = re.compile(META_SHARD_PATTERN)
_HF_SHARD = re.compile(HF_SHARD_PATTERN)
_HF_INDEXES = (HF_SAFETENSORS_INDEX, HF_BIN_INDEX)
_HF_SINGLE = (HF_SAFETENSORS_FILE, HF_BIN_FILE)


@dataclass
class Checkpoint:
    """An opened checkpoint: its tensors (lazy) and the model they belong to.

    Attributes:
        fmt: "meta", "hf" or "native".
        folder: Where it is.
        files: Its weight files.
        source: Its tensors, read lazily.
        config: The model, from ``origin``.
        family: The model's family (a key of ``tune_models.FAMILIES``).
        origin: The file the model was read from (params.json, config.json,
            tune_model.json).
        note: One line to tell the user while converting (what of a multimodal checkpoint
            is converted), or None.
    """

    fmt: str
    folder: Path
    files: list[Path]
    source: TensorSource
    config: DecoderConfig
    family: str
    origin: str
    note: str | None = None

    def templates(self, layout: str) -> dict:
        """The family's key templates for ``layout`` (native: the native keys)."""
        if layout == "native":
            return NATIVE_KEYS
        keys = FAMILIES[self.family].checkpoint_keys
        if layout not in keys:
            have = " or ".join(k for k in (*keys, "native"))
            raise CheckpointError(
                f"{self.family} has no {LAYOUTS[layout].title} layout ({LAYOUTS[layout].title} "
                f"publishes no {self.family} checkpoints): convert it --to {have} instead"
            )
        return keys[layout]

    def to_native(self) -> list[TensorPlan]:
        """Plans of the native tensors, every key and shape checked against the model."""
        return plan_to_native(self.source, self.config, LAYOUTS[self.fmt],
                              self.templates(self.fmt), family=self.family, origin=self.origin)


# --- detection and opening -------------------------------------------------------------------


def _classify_keys(keys: list[str], path: Path) -> str:
    if "layers.0.attention.wqkv.weight" in keys:
        return "native"
    if "layers.0.attention.wq.weight" in keys:
        return "meta"
    if any(k.startswith(("model.", "language_model.")) or k == "lm_head.weight" for k in keys):
        return "hf"
    example = f" (keys like '{keys[0]}')" if keys else " (no tensors)"
    raise CheckpointError(
        f"cannot tell the format of {path}{example}: pass --from meta, hf or native"
    )


def detect_format(path: Path) -> str:
    """'meta', 'hf' or 'native' for a checkpoint file or folder.

    Folders are recognised by file names (consolidated.*.pth; model*.safetensors or
    pytorch_model*.bin; native_pytorch_model.*, as in every checkpoint folder the training
    recipe writes), files by the names of the tensors inside.
    """
    path = Path(path)
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        if any(_META_SHARD.match(n) for n in names):
            return "meta"
        if is_legacy_native_folder(path):
            return "native"
        if names & {*_HF_INDEXES, *_HF_SINGLE} or any(_HF_SHARD.match(n) for n in names):
            return "hf"
        if names & set(NATIVE_FILES):
            return "native"
        raise CheckpointError(
            f"{path} holds no checkpoint tune-ckpt recognises: expected {META_FIRST_SHARD} "
            f"(Meta), model*.safetensors or pytorch_model*.bin (Hugging Face), or "
            f"{' or '.join(NATIVE_FILES)}"
        )
    if path.name.endswith(".index.json"):
        return "hf"
    tensors, _ = read_tensor_file(path)
    return _classify_keys(list(tensors), path)


def _open_meta(path: Path) -> Checkpoint:
    folder = path if path.is_dir() else path.parent
    files = meta_shard_files(path)
    params = folder / META_PARAMS_FILE
    if not params.is_file():
        raise CheckpointError(
            f"{META_PARAMS_FILE} not found beside {files[0]}: a Meta checkpoint needs it for the "
            "model's shape (download it with the weights)"
        )
    data = read_json(params)
    source = open_meta_shards(files, data.get("vocab_size"))
    config, family = meta_model(data, source, str(params))
    return Checkpoint("meta", folder, files, source, config, family, str(params))


def _open_hf(path: Path) -> Checkpoint:
    folder = path if path.is_dir() else path.parent
    index = None
    if path.is_file() and path.name.endswith(".index.json"):
        index = path
    elif path.is_file() and not _HF_SHARD.match(path.name):
        files = [path]
    else:
        index = next((folder / n for n in _HF_INDEXES if (folder / n).is_file()), None)
        if index is None:
            single = [folder / n for n in _HF_SINGLE if (folder / n).is_file()]
            if not single:
                raise CheckpointError(
                    f"no model.safetensors(.index.json) or pytorch_model.bin(.index.json) in "
                    f"{folder}: the Hugging Face checkpoint is incomplete"
                )
            files = single[:1]
    if index is not None:
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map: it is not a checkpoint index")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file.name} (listed in {index.name}) is missing from "
                                      f"{folder}; download it again")
    config = folder / HF_CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"{HF_CONFIG_FILE} not found beside {files[0]}: a Hugging Face "
                              "checkpoint needs it for the model's shape")
    data = read_json(config)
    model, family = config_from_hf(data, str(config))
    source, note = open_tensor_files(files), None
    wrapper = multimodal_of(data)
    if wrapper is not None:
        # A text decoder with a vision tower: its language model, named as the text model's.
        names, left_out = wrapper.text_keys(source.keys())
        source = RenamedSource(source, names)
        note = (f"{config} describes {data['architectures'][0]}: converting its text decoder "
                f"({wrapper.text_architecture}) and leaving out the vision tower and projector "
                f"({left_out} tensors)")
    return Checkpoint("hf", folder, files, source, model, family, str(config), note)


def _open_native(path: Path) -> Checkpoint:
    file = find_native_file(path) if path.is_dir() else path
    source = open_tensor_files([file])
    sidecar = file.parent / MODEL_ARGS_FILE
    if not sidecar.is_file():
        raise CheckpointError(
            f"no {MODEL_ARGS_FILE} beside {file}: a native checkpoint needs it for the model's "
            "shape (tune writes it with every checkpoint; tune_ckpt.write_model_args makes one)"
        )
    config, family = read_sidecar(sidecar)
    return Checkpoint("native", file.parent, [file], source, config, family, str(sidecar))


def open_checkpoint(path: str | os.PathLike, fmt: str | None = None) -> Checkpoint:
    """Open a checkpoint lazily (nothing but headers is read) and find its model arguments.

    Args:
        path: A file (e.g. ``D/consolidated.00.pth``, which brings every shard of D and
            D/params.json) or a folder.
        fmt: "meta", "hf" or "native"; None detects it.

    Raises:
        CheckpointError: If the path is missing, the format unknown or a file is bad.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if fmt is not None and fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format '{fmt}': use meta, hf or native")
    fmt = fmt or detect_format(path)
    return {"meta": _open_meta, "hf": _open_hf, "native": _open_native}[fmt](path)


# --- writing targets -------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"2GiB"`` / bytes -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise CheckpointError(f"cannot read size '{size}': write e.g. 5GB or 500MB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n < 1e10 else f"{n / 1e9:.1f} GB"


def _check_room(folder: Path, needed: int) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise CheckpointError(
            f"not enough disk space in {probe}: the output needs {_gb(needed)}, "
            f"{_gb(free)} is free; free some space or choose another output location"
        )


def _refuse_existing(paths: list[Path], force: bool) -> None:
    if not force:
        for p in paths:
            if p.exists():
                raise CheckpointError(f"{p} already exists: pass --force to overwrite it")


def _check_sidecar(folder: Path, ckpt: Checkpoint, force: bool) -> None:
    # One folder, one model: refuse to describe a folder's other checkpoint wrongly.
    sidecar = folder / MODEL_ARGS_FILE
    if sidecar.is_file() and not force:
        old, old_family = read_sidecar(sidecar)
        new, old_fields = vars(ckpt.config), vars(old)
        diff = next((k for k in new if new[k] != old_fields[k]), None)
        if diff is not None or old_family != ckpt.family:
            what = f"{diff} {old_fields[diff]} != {new[diff]}" if diff else \
                f"family {old_family} != {ckpt.family}"
            raise CheckpointError(
                f"{sidecar} describes another model ({what}): write to another folder or "
                "pass --force"
            )


def _write_native(ckpt: Checkpoint, plans: list[TensorPlan], out: Path | None, force: bool,
                  progress: bool) -> Path:
    out = out if out is not None else ckpt.folder / NATIVE_FILE
    if out.is_dir():
        out = out / NATIVE_FILE
    if out.suffix not in (".pt", ".safetensors"):
        raise CheckpointError(f"output file {out} must end in .pt or .safetensors")
    _refuse_existing([out], force)
    _check_sidecar(out.parent, ckpt, force)
    _check_room(out.parent, sum(p.nbytes for p in plans))
    write_tensor_file(out, plans, force=force, progress=progress)
    write_model_args(out.parent, ckpt.config, family=ckpt.family)
    return out


def _main_dtype(plans: list[TensorPlan]) -> torch.dtype:
    sizes: dict[torch.dtype, int] = {}
    for p in plans:
        sizes[p.dtype] = sizes.get(p.dtype, 0) + p.nbytes
    return max(sizes, key=sizes.get)


def _write_hf(ckpt: Checkpoint, native: list[TensorPlan], out: Path | None, force: bool,
              progress: bool, max_shard_size: int) -> Path:
    out = out if out is not None else ckpt.folder / HF_EXPORT_DIR
    plans = plan_from_native(PlanSource(native), ckpt.config, LAYOUTS["hf"],
                             ckpt.templates("hf"), family=ckpt.family)
    config = hf_config_for(ckpt.config, ckpt.family, dtype_name(_main_dtype(plans)))
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for plan in plans:  # greedy, in key order, as transformers shards
        if shards[-1] and size + plan.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += plan.nbytes
    n = len(shards)
    names = [HF_SAFETENSORS_FILE] if n == 1 else \
        [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    _refuse_existing(_existing(out, _is_hf_file), force)
    _check_room(out, sum(p.nbytes for p in plans))
    with staged_folder(out, superseded=_is_hf_file) as staging:
        for name, shard in zip(names, shards):
            write_safetensors_file(staging / name, shard, progress=progress)
        if n > 1:
            index = {"metadata": {"total_size": sum(p.nbytes for p in plans)},
                     "weight_map": {p.key: name for name, shard in zip(names, shards)
                                    for p in shard}}
            write_text_atomic(staging / HF_SAFETENSORS_INDEX, json.dumps(index, indent=2) + "\n")
        write_text_atomic(staging / HF_CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        write_text_atomic(staging / HF_GENERATION_CONFIG_FILE,
                          json.dumps(generation_config_for(ckpt.family), indent=2) + "\n")
    return out


def _is_hf_file(name: str) -> bool:
    return (name in (*_HF_SINGLE, *_HF_INDEXES, HF_CONFIG_FILE, HF_GENERATION_CONFIG_FILE)
            or bool(_HF_SHARD.match(name)))


def _is_meta_file(name: str) -> bool:
    return name == META_PARAMS_FILE or bool(_META_SHARD.match(name))


def _existing(folder: Path, belongs: Callable[[str], bool]) -> list[Path]:
    """Files of an earlier output of the same kind in ``folder`` (the new one replaces them)."""
    return sorted(p for p in folder.iterdir() if belongs(p.name)) if folder.is_dir() else []


def _write_meta(ckpt: Checkpoint, native: list[TensorPlan], out: Path | None, force: bool,
                progress: bool) -> Path:
    out = out if out is not None else ckpt.folder / META_EXPORT_DIR
    plans = plan_from_native(PlanSource(native), ckpt.config, LAYOUTS["meta"],
                             ckpt.templates("meta"), family=ckpt.family)
    params = meta_params_for(ckpt.config)
    _refuse_existing(_existing(out, _is_meta_file), force)
    _check_room(out, sum(p.nbytes for p in plans))
    with staged_folder(out, superseded=_is_meta_file) as staging:
        write_torch_file(staging / META_FIRST_SHARD, plans, progress=progress)
        write_text_atomic(staging / META_PARAMS_FILE, json.dumps(params) + "\n")
    return out


def convert(
    checkpoint_path: str | os.PathLike,
    *,
    source_format: str | None = None,
    target_format: str = "native",
    output_path: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
) -> Path:
    """Convert a checkpoint between the Meta, Hugging Face and native layouts, streaming.

    Args:
        checkpoint_path: A checkpoint file or folder. ``D/consolidated.00.pth`` brings every
            model-parallel shard in D and D/params.json; an HF folder or index brings all its
            shards and config.json; a native file brings its tune_model.json.
        source_format: "meta", "hf" or "native"; None detects it.
        target_format: "native" (default), "hf" or "meta".
        output_path: native: a ``.pt`` or ``.safetensors`` file (default
            ``native_pytorch_model.pt`` beside the checkpoint); hf / meta: a folder (default
            ``hf_model`` / ``meta_model`` beside the checkpoint).
        dtype: Cast floating-point weights ("bf16", "fp16", "fp32" or a torch dtype).
        force: Overwrite existing output files (each is still replaced only when complete).
        max_shard_size: Largest HF safetensors shard, e.g. "5GB".
        progress: Show progress bars.

    Returns:
        The native file written, or the hf / meta folder.

    Raises:
        CheckpointError: Unknown format, missing or unexpected key, wrong shape, bad file,
            existing output without ``force``, or not enough disk space.
    """
    if target_format not in FORMATS:
        raise CheckpointError(f"unknown target format '{target_format}': use native, hf or meta")
    cast = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    ckpt = open_checkpoint(checkpoint_path, source_format)
    if ckpt.note is not None:
        print(f"tune-ckpt: {ckpt.note}", file=sys.stderr)
    if target_format != "native":
        ckpt.templates(target_format)  # a family without that layout: refused before anything
    native = cast_plans(ckpt.to_native(), cast)
    out = Path(output_path).expanduser() if output_path is not None else None
    if target_format == "native":
        return _write_native(ckpt, native, out, force, progress)
    if target_format == "hf":
        return _write_hf(ckpt, native, out, force, progress, shard_bytes)
    return _write_meta(ckpt, native, out, force, progress)

