"""Model arguments (the shape of a Llama 2) in tune_models.Llama2Config field names.

A native checkpoint's tensors do not say how many attention heads it has, so every native
checkpoint tune-ckpt writes gets a sidecar ``tune_model.json`` in its folder, e.g.::

    {"vocab_size": 32000, "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32,
     "hidden_dim": 11008, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 10000.0}

so that ``Llama2Config(**read_model_args(folder))`` builds the model it holds. This module
also translates Meta's params.json and Hugging Face's config.json to and from these names.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tune_ckpt.errors import CheckpointError
from tune_ckpt.names import HF_CONFIG_FILE, META_PARAMS_FILE, MODEL_ARGS_FILE
from tune_ckpt.reading import read_tensor_meta
from tune_ckpt.writing import write_text_atomic

FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "multiple_of",
          "ffn_dim_multiplier", "norm_eps", "max_seq_len", "rope_theta", "head_dim", "qkv_bias",
          "tie_embeddings", "rope_scaling", "sliding_window")
_REQUIRED = ("vocab_size", "dim", "n_layers", "n_heads")
_INTS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "multiple_of",
         "max_seq_len", "head_dim", "sliding_window")


def meta_hidden_dim(
    dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None
) -> int:
    """Meta's feed-forward width: 2/3 of 4*dim, optionally scaled, rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def normalize_args(args: dict, where: str = "model arguments") -> dict:
    """Check field names and types; fill in n_kv_heads and hidden_dim. Returns a new dict."""
    unknown = sorted(set(args) - set(FIELDS))
    if unknown:
        raise CheckpointError(
            f"{where}: unknown field '{unknown[0]}' (Llama2Config fields: {', '.join(FIELDS)})"
        )
    missing = [k for k in _REQUIRED if args.get(k) is None]
    if missing:
        raise CheckpointError(f"{where}: missing '{missing[0]}'")
    out = {k: args[k] for k in FIELDS if args.get(k) is not None}
    for k in _INTS:
        if k in out:
            if isinstance(out[k], bool) or not isinstance(out[k], int) or out[k] <= 0:
                raise CheckpointError(f"{where}: '{k}' must be a positive integer, got {out[k]!r}")
    for k in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
        if k in out:
            if isinstance(out[k], bool) or not isinstance(out[k], (int, float)) or out[k] <= 0:
                raise CheckpointError(f"{where}: '{k}' must be a positive number, got {out[k]!r}")
            out[k] = float(out[k])
    for k in ("qkv_bias", "tie_embeddings"):
        if k in out and not isinstance(out[k], bool):
            raise CheckpointError(f"{where}: '{k}' must be true or false, got {out[k]!r}")
    if "rope_scaling" in out and not isinstance(out["rope_scaling"], dict):
        raise CheckpointError(f"{where}: 'rope_scaling' must be an object, got "
                              f"{out['rope_scaling']!r}")
    out.setdefault("n_kv_heads", out["n_heads"])
    if "hidden_dim" not in out:
        out["hidden_dim"] = meta_hidden_dim(
            out["dim"], out.get("multiple_of", 256), out.get("ffn_dim_multiplier")
        )
    return out


# --- Meta params.json ------------------------------------------------------------------------


def args_from_meta_params(
    params: dict, *, vocab_size: int | None = None, where: str = "params.json"
) -> dict:
    """Meta's params.json -> model args.

    Args:
        params: The parsed params.json.
        vocab_size: The embedding's row count, used when params.json says -1 (as Llama 2's
            does: the vocabulary is the tokenizer's).
        where: File name for messages.
    """
    if params.get("use_scaled_rope"):
        raise CheckpointError(
            f"{where}: use_scaled_rope is set (Llama 3.1-style RoPE scaling), which tune's "
            "Llama 2 does not implement"
        )
    args = {k: params[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of",
                                   "ffn_dim_multiplier", "norm_eps", "rope_theta")
            if params.get(k) is not None}
    vocab = params.get("vocab_size", -1)
    args["vocab_size"] = vocab if isinstance(vocab, int) and vocab > 0 else vocab_size
    if args["vocab_size"] is None:
        raise CheckpointError(f"{where}: vocab_size is {vocab} and no checkpoint to read it from")
    args.setdefault("multiple_of", 256)
    args.setdefault("norm_eps", 1e-5)
    args.setdefault("rope_theta", 10000.0)
    return normalize_args(args, where)


def meta_params_from_args(args: dict) -> dict:
    """Model args -> a params.json that Meta's reference code reads back to the same shape."""
    args = normalize_args(args)
    params = {"dim": args["dim"], "n_layers": args["n_layers"], "n_heads": args["n_heads"],
              "n_kv_heads": args["n_kv_heads"], "vocab_size": args["vocab_size"],
              "multiple_of": args.get("multiple_of", 256), "norm_eps": args["norm_eps"],
              "rope_theta": args["rope_theta"]}
    if args.get("ffn_dim_multiplier") is not None:
        params["ffn_dim_multiplier"] = args["ffn_dim_multiplier"]
    if meta_hidden_dim(args["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")) \
            == args["hidden_dim"]:
        return params
    # Meta's code derives the width from multiple_of (and ffn_dim_multiplier): find values that
    # land on this model's width, a plain power-of-two multiple_of if one does.
    params.pop("ffn_dim_multiplier", None)
    for multiple in (2**p for p in range(12, -1, -1)):
        if meta_hidden_dim(args["dim"], multiple) == args["hidden_dim"]:
            params["multiple_of"] = multiple
            return params
    base = int(2 * 4 * args["dim"] / 3)
    params["multiple_of"] = 1
    params["ffn_dim_multiplier"] = (args["hidden_dim"] + 0.5) / base
    return params


# --- Hugging Face config.json ----------------------------------------------------------------


def args_from_hf_config(config: dict, where: str = "config.json") -> dict:
    """transformers' LlamaConfig (config.json) -> model args, refusing what Llama2 lacks."""
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{where}: model_type is '{model_type}'; only 'llama' is supported")
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (
        rope if rope.get("rope_type", "default") != "default" else None
    )
    if scaling:
        raise CheckpointError(f"{where}: RoPE scaling {scaling} is not supported by Llama2")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise CheckpointError(f"{where}: {flag} is true; Llama2 has no biases")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act '{config['hidden_act']}' is not silu")
    try:
        args = {
            "vocab_size": config["vocab_size"], "dim": config["hidden_size"],
            "n_layers": config["num_hidden_layers"], "n_heads": config["num_attention_heads"],
            "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
            "hidden_dim": config["intermediate_size"],
            "norm_eps": config.get("rms_norm_eps", 1e-6),
            "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        }
    except KeyError as e:
        raise CheckpointError(f"{where}: missing '{e.args[0]}'") from e
    if config.get("max_position_embeddings"):
        args["max_seq_len"] = config["max_position_embeddings"]
    head_dim = config.get("head_dim")
    if head_dim and head_dim * args["n_heads"] != args["dim"]:
        raise CheckpointError(
            f"{where}: head_dim {head_dim} x {args['n_heads']} heads != hidden_size {args['dim']}"
        )
    return normalize_args(args, where)


def hf_config_from_args(args: dict, dtype_name: str) -> dict:
    """Model args -> a config.json for transformers' LlamaForCausalLM."""
    args = normalize_args(args)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args["vocab_size"],
        "hidden_size": args["dim"],
        "intermediate_size": args["hidden_dim"],
        "num_hidden_layers": args["n_layers"],
        "num_attention_heads": args["n_heads"],
        "num_key_value_heads": args["n_kv_heads"],
        "head_dim": args["dim"] // args["n_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": args.get("max_seq_len", 4096),
        "rms_norm_eps": args["norm_eps"],
        "rope_theta": args["rope_theta"],
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype_name,
    }


# --- the sidecar -----------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _meta_shapes_from_folder(folder: Path) -> tuple[int | None, int | None]:
    """(vocab_size, hidden_dim) read off consolidated.*.pth headers, if there are any."""
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        return None, None
    meta = read_tensor_meta(shards[0])
    vocab = meta.get("tok_embeddings.weight", ((None,), None))[0][0]
    w1 = meta.get("layers.0.feed_forward.w1.weight")
    return vocab, (w1[0][0] * len(shards) if w1 else None)


def read_model_args(path: str | os.PathLike) -> dict:
    """The model arguments of a checkpoint, in tune_models.Llama2Config field names.

    Looks beside the checkpoint for ``tune_model.json``, else Meta's ``params.json``
    (vocab_size -1 is read off the embedding; hidden_dim off the w1 shape, or Meta's rule),
    else Hugging Face's ``config.json``.

    Args:
        path: A checkpoint file or the folder holding it.

    Returns:
        A dict such that ``Llama2Config(**args)`` describes the checkpoint.

    Raises:
        CheckpointError: If none of the three files is there or one is malformed.
    """
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    if (folder / MODEL_ARGS_FILE).is_file():
        return normalize_args(_read_json(folder / MODEL_ARGS_FILE), str(folder / MODEL_ARGS_FILE))
    params = folder / META_PARAMS_FILE
    if params.is_file():
        vocab, hidden = _meta_shapes_from_folder(folder)
        args = args_from_meta_params(_read_json(params), vocab_size=vocab, where=str(params))
        if hidden is not None:
            args["hidden_dim"] = hidden
        return args
    config = folder / HF_CONFIG_FILE
    if config.is_file():
        return args_from_hf_config(_read_json(config), str(config))
    raise CheckpointError(
        f"no {MODEL_ARGS_FILE}, {META_PARAMS_FILE} or {HF_CONFIG_FILE} in {folder}: cannot tell "
        "the model's shape (write one with tune_ckpt.write_model_args)"
    )


def write_model_args(folder: str | os.PathLike, args: dict) -> Path:
    """Write ``tune_model.json`` (atomically) into ``folder``.

    Args:
        folder: The folder holding the native checkpoint.
        args: Llama2Config field names -> values (e.g. ``dataclasses.asdict(config)``).
            n_kv_heads and hidden_dim are filled in when absent.

    Returns:
        The path of the file written.

    Raises:
        CheckpointError: On an unknown field or a bad value.
    """
    path = Path(folder).expanduser() / MODEL_ARGS_FILE
    args = normalize_args(dict(args), str(path))
    write_text_atomic(path, json.dumps(args, indent=2) + "\n")
    return path
