"""LoRA adapters in Hugging Face PEFT's format, to and from tune's native adapter schema.

A PEFT adapter folder (what ``PeftModel.from_pretrained`` and vLLM load) holds
``adapter_config.json`` and ``adapter_model.safetensors`` whose keys name transformers'
modules, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r). tune's native adapter keys are tune_models' parameter names
(``layers.0.attention.wqkv.lora_a.q``; see tune_models.lora). The map between them:

* module names come from tune_models' HF key templates (``HF_KEYS``), the same ones the base
  checkpoint converter uses, so an adapter lands on the module its base weight went to;
* ``lora_B`` of q_proj and k_proj is row-permuted like the HF converter permutes the
  q_proj / k_proj weights (HF's rotate-half order vs the native RoPE pairs): the adapter's
  change ``B @ A`` is then permuted exactly as the weight is. ``lora_A`` and every other
  tensor are as they are.

tune writes one more file beside PEFT's two, ``tune_adapter.json``: the base model's shape
(tune_model.json's fields) and whether the adapter was trained on an NF4-quantised base
(QLoRA). PEFT and vLLM ignore it; tune uses it to refuse an adapter of another base and to
merge a QLoRA adapter into the base it was trained on (see tune_ckpt.merge).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tune_ckpt.errors import CheckpointError
from tune_ckpt.keymaps import hf_to_native_rows, native_to_hf_rows
from tune_ckpt.model_args import args_of
from tune_ckpt.names import ADAPTER_CONFIG_FILE, ADAPTER_FILES, ADAPTER_SIDECAR_FILE
from tune_ckpt.native import save_native
from tune_ckpt.reading import check_finite, load_native
from tune_ckpt.writing import staged_folder, write_text_atomic
from tune_models import HF_KEYS, LORA_TARGETS, DecoderConfig, LoRASettings, lora_parameter_shapes
from tune_models.lora import QKV_PARTS

# PEFT's prefix on every key: PeftModel wraps the transformers model as base_model.model.
PEFT_PREFIX = "base_model.model."
_NATIVE_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[ab])(?:\.(?P<part>[qkv]))?$")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# PEFT features tune's LoRA layers cannot express; each is off when its field is unset/empty.
_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "modules_to_save", "lora_bias", "rank_pattern",
                "alpha_pattern", "layers_to_transform", "target_parameters")


@dataclass
class Adapter:
    """A LoRA adapter in the native schema, with what is known about its base.

    Attributes:
        weights: Native adapter keys -> tensors (``tune_models.load_lora_state_dict`` takes
            them as they are).
        settings: rank, alpha, dropout and targets.
        quantize_base: "nf4" if it was trained on an NF4 base (QLoRA), else None.
        base_model: ``base_model_name_or_path`` of adapter_config.json, if any.
        base_model_args: The base model's shape from tune_adapter.json (tune_model.json
            fields), or None for an adapter tune did not write.
    """

    weights: dict[str, torch.Tensor]
    settings: LoRASettings
    quantize_base: str | None = None
    base_model: str | None = None
    base_model_args: dict | None = None


def _hf_module(module: str, part: str | None) -> tuple[str, int | None]:
    """A native module path (``layers.3.attention.wqkv``) and part -> the transformers module
    name and how many heads its lora_B rows are permuted over (None: not permuted)."""
    layer, template = None, module
    if module.startswith("layers."):
        _, layer, rest = module.split(".", 2)
        template = "layers.{i}." + rest
    names = HF_KEYS[template + ".weight"]
    name = names if isinstance(names, str) else names[QKV_PARTS.index(part)]
    return name.format(i=layer).removesuffix(".weight"), part


def _permute_heads(config: DecoderConfig, part: str | None) -> int | None:
    return {"q": config.n_heads, "k": config.n_kv_heads}.get(part)


def peft_key_map(config: DecoderConfig, settings: LoRASettings) -> dict[str, str]:
    """Native adapter key -> PEFT key, for every adapter parameter of this model and settings."""
    out = {}
    for key in lora_parameter_shapes(config, settings):
        m = _NATIVE_LORA_KEY.match(key)
        hf, _ = _hf_module(m["module"], m["part"])
        out[key] = f"{PEFT_PREFIX}{hf}.lora_{m['ab'].upper()}.weight"
    return out


def peft_target_modules(settings: LoRASettings) -> list[str]:
    """PEFT's ``target_modules``: transformers' module names of the targets (q_proj, ...)."""
    names = []
    for target in settings.targets:
        t = LORA_TARGETS[target]
        hf, _ = _hf_module(t.module.replace("{i}", "0"), t.part)
        names.append(hf.rsplit(".", 1)[-1])
    return names


def native_to_peft(
    adapter: dict[str, torch.Tensor], config: DecoderConfig, settings: LoRASettings
) -> dict[str, torch.Tensor]:
    """Native adapter weights -> PEFT's keys, lora_B of q and k in HF's row order.

    Raises:
        CheckpointError: A missing, unexpected or misshapen key.
    """
    _check_native(adapter, config, settings)
    keys = peft_key_map(config, settings)
    out = {}
    for key, tensor in adapter.items():
        m = _NATIVE_LORA_KEY.match(key)
        heads = _permute_heads(config, m["part"])
        if m["ab"] == "b" and heads is not None:
            tensor = native_to_hf_rows(tensor, heads)
        out[keys[key]] = tensor.contiguous()
    return out


def peft_to_native(
    peft: dict[str, torch.Tensor], config: DecoderConfig, settings: LoRASettings,
    where: str = "the adapter",
) -> dict[str, torch.Tensor]:
    """PEFT adapter weights -> native keys, lora_B of q and k back in the native row order.

    Raises:
        CheckpointError: A key of a module tune cannot adapt, a missing key, or a shape
            that does not fit the base model.
    """
    to_native = {v: k for k, v in peft_key_map(config, settings).items()}
    shapes = lora_parameter_shapes(config, settings)
    out = {}
    for key, tensor in peft.items():
        plain = re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", key)
        if plain not in to_native:
            raise CheckpointError(f"{where}: '{key}' is not an adapter of a module of this base "
                                  f"model ({config.n_layers} layers; targets "
                                  f"{', '.join(peft_target_modules(settings))})")
        native = to_native[plain]
        if tuple(tensor.shape) != shapes[native]:
            raise CheckpointError(
                f"{where}: '{key}' has shape {tuple(tensor.shape)}, the base model needs "
                f"{shapes[native]}: the adapter was trained on another base model")
        m = _NATIVE_LORA_KEY.match(native)
        heads = _permute_heads(config, m["part"])
        if m["ab"] == "b" and heads is not None:
            tensor = hf_to_native_rows(tensor, heads)
        out[native] = tensor
    missing = [k for k in shapes if k not in out]
    if missing:
        raise CheckpointError(
            f"{where}: no weights for '{peft_key_map(config, settings)[missing[0]]}' (the base "
            f"model has {config.n_layers} layers: the adapter was trained on another base model)")
    return out


def _check_native(adapter: dict[str, torch.Tensor], config: DecoderConfig,
                  settings: LoRASettings) -> None:
    shapes = lora_parameter_shapes(config, settings)
    for key, tensor in adapter.items():
        if key not in shapes:
            raise CheckpointError(f"'{key}' is not an adapter parameter of this model with "
                                  f"targets {', '.join(settings.targets)}")
        if tuple(tensor.shape) != shapes[key]:
            raise CheckpointError(f"'{key}' has shape {tuple(tensor.shape)}, expected "
                                  f"{shapes[key]}")
    missing = [k for k in shapes if k not in adapter]
    if missing:
        raise CheckpointError(f"the adapter lacks '{missing[0]}'")


def peft_config(settings: LoRASettings, base_model: str | None = None) -> dict:
    """adapter_config.json as PEFT writes it for a LoRA adapter of a causal LM."""
    alpha = settings.alpha
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_bias": False,
        "lora_dropout": settings.dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": settings.rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": peft_target_modules(settings),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def save_peft_adapter(
    folder: str | os.PathLike,
    adapter: dict[str, torch.Tensor],
    *,
    config: DecoderConfig,
    settings: LoRASettings,
    base_model: str | None = None,
    quantize_base: str | None = None,
    force: bool = False,
) -> Path:
    """Write an adapter folder that PEFT (``PeftModel.from_pretrained``) and vLLM load.

    The folder is assembled beside its target and renamed into place, so it is either the
    old one or complete (see ``writing.staged_folder``).

    Args:
        folder: The adapter folder to write.
        adapter: Native adapter weights (``tune_models.lora_state_dict(model)``), any dtype;
            the file keeps it.
        config: The base model's shape.
        settings: The adapter's rank, alpha, dropout and targets
            (``tune_models.lora_settings(model)``).
        base_model: ``base_model_name_or_path`` to record (a Hub id or a path), if known.
        quantize_base: "nf4" if trained on an NF4 base (QLoRA).
        force: Replace an existing adapter in ``folder``.

    Returns:
        The folder.

    Raises:
        CheckpointError: The weights do not fit the model and settings, or an adapter is
            already there and ``force`` is not set.
    """
    folder = Path(folder).expanduser()
    if not force and any((folder / name).exists() for name in (ADAPTER_CONFIG_FILE,
                                                              *ADAPTER_FILES)):
        raise CheckpointError(f"{folder} already holds an adapter: pass --force to replace it")
    tensors = native_to_peft(adapter, config, settings)
    sidecar = {"model_args": args_of(config), "quantize_base": quantize_base}
    names = {ADAPTER_CONFIG_FILE, *ADAPTER_FILES, ADAPTER_SIDECAR_FILE}
    with staged_folder(folder, superseded=lambda name: name in names) as staging:
        save_native(tensors, staging / ADAPTER_FILES[0])
        write_text_atomic(staging / ADAPTER_CONFIG_FILE,
                          json.dumps(peft_config(settings, base_model), indent=2) + "\n")
        write_text_atomic(staging / ADAPTER_SIDECAR_FILE, json.dumps(sidecar, indent=2) + "\n")
    return folder


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _settings_from_peft(cfg: dict, weights: dict[str, torch.Tensor], where: Path
                        ) -> LoRASettings:
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{where} describes a {cfg.get('peft_type')!r} adapter; tune "
                              "loads LoRA adapters (peft_type LORA) only")
    for name in _UNSUPPORTED:
        if cfg.get(name):
            raise CheckpointError(f"{where}: {name} = {cfg[name]!r} is a PEFT feature tune's "
                                  "LoRA layers do not have; train the adapter without it")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{where}: bias = {cfg['bias']!r} (trained biases) is not "
                              "supported; tune's adapters have bias 'none'")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise CheckpointError(f"{where}: r must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise CheckpointError(f"{where}: lora_alpha must be a positive number, got {alpha!r}")
    if cfg.get("use_rslora"):
        # rsLoRA scales by alpha / sqrt(r); tune by alpha / r: the same scale with this alpha.
        alpha = alpha * math.sqrt(rank)
    # The targets are what the file holds (target_modules may be a regex or "all-linear").
    hf_to_target = {}
    for target in LORA_TARGETS:
        hf_to_target[peft_target_modules(LoRASettings(1, 1.0, 0.0, (target,)))[0]] = target
    targets = []
    for key in weights:
        m = _PEFT_KEY.match(key)
        module = m["module"].rsplit(".", 1)[-1] if m else None
        if module not in hf_to_target:
            raise CheckpointError(
                f"{where.parent / ADAPTER_FILES[0]}: '{key}' adapts a module tune cannot "
                f"(tune's LoRA targets are {', '.join(hf_to_target)})")
        targets.append(hf_to_target[module])
    dropout = cfg.get("lora_dropout") or 0.0
    try:
        return LoRASettings(rank, float(alpha), float(dropout), tuple(targets))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e


def load_peft_adapter(folder: str | os.PathLike, config: DecoderConfig) -> Adapter:
    """Read a PEFT LoRA adapter folder (tune's, PEFT's, or another tool's) for a base model.

    Args:
        folder: Holds adapter_config.json and adapter_model.safetensors (or PEFT's older
            adapter_model.bin, loaded weights-only).
        config: The shape of the base model it is to be applied to.

    Returns:
        The adapter in the native schema.

    Raises:
        CheckpointError: One line for: a missing folder or file, a non-LoRA adapter, a PEFT
            feature tune's LoRA layers lack (DoRA, per-module ranks, trained biases, ...),
            an adapter of another base model (shape, layer count, or tune_adapter.json's
            model arguments differ).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"adapter folder {folder} does not exist")
    config_file = folder / ADAPTER_CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{folder} holds no {ADAPTER_CONFIG_FILE}: it is not a PEFT "
                              "adapter folder")
    weights_file = next((folder / n for n in ADAPTER_FILES if (folder / n).is_file()), None)
    if weights_file is None:
        raise CheckpointError(f"{folder} holds no {' or '.join(ADAPTER_FILES)}: the adapter's "
                              "weights are missing")
    peft_cfg = _read_json(config_file)
    sidecar = _read_json(folder / ADAPTER_SIDECAR_FILE) \
        if (folder / ADAPTER_SIDECAR_FILE).is_file() else {}
    base_args = sidecar.get("model_args")
    if base_args is not None:
        mine = args_of(config)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "hidden_dim", "qkv_bias", "tie_embeddings"):
            if name in base_args and base_args[name] != mine[name]:
                raise CheckpointError(
                    f"{folder} is an adapter of another base model: its {name} is "
                    f"{base_args[name]}, this base model's is {mine[name]} "
                    f"({ADAPTER_SIDECAR_FILE})")
    # PEFT files may carry the base layer of an adapted lm_head (save_embedding_layers):
    # weights tune's adapters do not hold and the base model already has.
    peft = {k: v for k, v in load_native(weights_file).items() if ".base_layer." not in k}
    # An adapter is small: every value is checked. NaN or infinity would make every output
    # of the merged model NaN (an empty generation, a merged file of NaN).
    check_finite(peft, weights_file, fix="its training diverged or the file is damaged; use "
                                         "an earlier checkpoint of the adapter")
    settings = _settings_from_peft(peft_cfg, peft, config_file)
    try:
        lora_parameter_shapes(config, settings)
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}") from e
    weights = peft_to_native(peft, config, settings, where=str(weights_file))
    quantize = sidecar.get("quantize_base")
    if quantize not in (None, "nf4"):
        raise CheckpointError(f"{folder / ADAPTER_SIDECAR_FILE}: unknown quantize_base "
                              f"{quantize!r}")
    return Adapter(weights, settings, quantize, peft_cfg.get("base_model_name_or_path"),
                   base_args)
