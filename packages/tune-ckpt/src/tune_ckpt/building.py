"""The one way tune builds a model from its weights: training, generation, evaluation, merge.

:func:`build_model` makes the Decoder on the meta device, adds LoRA adapters and NF4
parameters there if asked, lets the caller shard it (FSDP2, in tune-train), and then fills
in each weight one at a time, from the mmap'd checkpoint or made on request: kept whole (one
process: a weight already in the right dtype on the CPU is the mmap'd tensor itself, no copy)
or only as this process's shard. No process ever holds more of the model than it runs with:
a 70B base under 8 processes never exists whole on any GPU, and under QLoRA the
full-precision base never exists at all.

It lives in tune-ckpt, not tune-train, so that ``tune merge`` (tune_ckpt.merge) builds with it
where only tune-models is installed beside; tune-train passes in what needs torch.distributed
(the ``shard`` function) and training's layer settings (``prepare``).

The weights come as a mapping from native key to tensor: a checkpoint's state dict
(:func:`checkpoint_weights`, checked against the model's keys and shapes before anything is
built), :class:`SequentialInit` (a random model, as ``Decoder.init_weights`` makes it) or
:class:`RandomBase` (a random model whose weights do not depend on the order they are made
in). Either way every process reads or makes the whole weight and keeps its part, so N
processes build the model one process builds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from tune_ckpt.errors import CheckpointError
from tune_models import Decoder, DecoderConfig, LoRASettings, native_shapes

__all__ = ["RandomBase", "SequentialInit", "build_model", "check_native_weights",
           "checkpoint_weights", "inference_model"]


def check_native_weights(shapes: Mapping[str, tuple[int, ...]], config: DecoderConfig,
                         source: str | Path, model: str | None = None,
                         family: str | None = None) -> None:
    """Check a checkpoint's tensor names and shapes against the model it should hold.

    Args:
        shapes: Native key -> shape, as the checkpoint holds them.
        config: The model's shape.
        source: The checkpoint, for messages.
        model: The model's preset name, for messages (None: "the model").
        family: Its family's name, for messages.

    Raises:
        CheckpointError: Naming the first key missing, unexpected or of another shape.
    """
    expected = native_shapes(config)
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    named = f"model '{model}'" if model else "the model"
    what = f"'{model}' ({family})" if model and family else "this model"
    hint = f"; is it a checkpoint of {what} in native format?"
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} key(s) of {named}, e.g. "
                              f"'{missing[0]}'{hint}")
    if unexpected:
        raise CheckpointError(f"{source} has key(s) {named} does not, e.g. "
                              f"'{unexpected[0]}'{hint}")
    for key, shape in expected.items():
        if tuple(shapes[key]) != tuple(shape):
            raise CheckpointError(f"{source}: '{key}' has shape {tuple(shapes[key])}, "
                                  f"{named} expects {tuple(shape)}{hint}")


def checkpoint_weights(path: str | Path, config: DecoderConfig, model: str | None = None,
                       family: str | None = None) -> dict[str, torch.Tensor]:
    """A native checkpoint's weights (mmap'd, weights only), checked against ``config``
    (``model`` and ``family`` name it in messages).

    Raises:
        CheckpointError: If it cannot be read, or holds another model (named).
    """
    from tune_ckpt.reading import load_native

    state = load_native(path)
    check_native_weights({k: tuple(v.shape) for k, v in state.items()}, config, path, model,
                         family)
    return state


class SequentialInit(Mapping):
    """Native key -> a random weight, as ``Decoder.init_weights`` makes it.

    Weights are drawn from torch's global generator in the order they are asked for, so
    asking for every key in ``model.named_parameters()`` order after ``torch.manual_seed(s)``
    gives the numbers ``init_weights`` gives after the same seed.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.shapes = {k: (tuple(p.shape), p.dtype) for k, p in model.named_parameters()}
        self.n_layers, self.device = len(model.layers), device
        self.norm_unit_offset = model.config.norm_unit_offset  # Gemma's gains start at 0

    def __getitem__(self, key: str) -> torch.Tensor:
        from tune_models import init_parameter_

        shape, dtype = self.shapes[key]
        with torch.no_grad():
            return init_parameter_(torch.empty(shape, dtype=dtype, device=self.device), key,
                                   self.n_layers, norm_unit_offset=self.norm_unit_offset)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


class RandomBase(SequentialInit):
    """Native key -> a random weight of ``init_weights``' kind, each from a generator seeded
    by ``seed`` and the key's place: the same numbers whichever order and whichever process
    asks (a random base for LoRA runs, whose NF4 weights are made before the others)."""

    def __init__(self, model: torch.nn.Module, seed: int, device: torch.device):
        super().__init__(model, device)
        self.index = {k: i for i, k in enumerate(self.shapes)}
        self.seed = seed

    def __getitem__(self, key: str) -> torch.Tensor:
        from tune_models import init_parameter_

        shape, dtype = self.shapes[key]
        generator = torch.Generator(self.device).manual_seed(self.seed * 100_003 + self.index[key])
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        with torch.no_grad():
            return init_parameter_(tensor, key, self.n_layers, generator=generator,
                                   norm_unit_offset=self.norm_unit_offset)


def build_model(
    config: DecoderConfig,
    weights: Mapping[str, torch.Tensor] | Callable[[torch.nn.Module], Mapping[str, torch.Tensor]],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    lora: LoRASettings | None = None,
    adapter: Mapping[str, torch.Tensor] | None = None,
    adapter_dtype: torch.dtype | None = None,
    quantize: str | None = None,
    prepare: Callable[[torch.nn.Module], None] | None = None,
    shard: Callable[[torch.nn.Module], None] | None = None,
    seed: int | None = None,
    adapter_source: str | Path | None = None,
    on_quantized: Callable[[str], None] | None = None,
) -> Decoder:
    """A Decoder of ``config`` holding ``weights``, with adapters and an NF4 base if asked.

    Args:
        config: The model's shape.
        weights: Native key -> tensor for every base weight (a checked checkpoint, or
            :class:`SequentialInit` / :class:`RandomBase`), or a function of the meta-device
            model returning such a mapping.
        device: Where the model's tensors go.
        dtype: The dtype of every floating-point weight (the NF4 base excepted).
        lora: Adapters to add (the base is then frozen); None for none.
        adapter: Their weights (native adapter keys); None makes new ones (B = 0), in the
            same order on every process.
        adapter_dtype: The adapters' dtype; None is ``dtype``.
        quantize: "nf4" to store the base's block linears in NF4 (QLoRA), else None.
        prepare: Called on the plain Decoder, on the meta device, before adapters are added
            (activation checkpointing, torch.compile of the blocks).
        shard: Shards the meta-device model in place (FSDP2); None keeps it whole.
        seed: Seeds torch's generator right before the weights are filled in, so that new
            adapters and :class:`SequentialInit` weights are the seed's (the same on every
            process); None leaves the generator alone.
        adapter_source: Where ``adapter`` was read, for messages.
        on_quantized: Called with each module's name as its weight is stored in NF4 (for a
            progress bar: quantising an 8B base takes a while).

    Returns:
        The model, in training mode; with ``lora`` only its adapters require grad.

    Raises:
        CheckpointError: ``adapter`` does not fit the model (another base shape or settings).
    """
    from tune_models import apply_lora, init_lora_, is_lora_key, quantize_base
    from tune_models.lora import check_lora_state_dict
    from tune_models.nf4 import NF4_PARAMETERS, is_quantized, quantize_nf4

    device = torch.device(device)
    with torch.device("meta"):
        model = Decoder(config)
    model.to(dtype=dtype)
    if prepare is not None:
        prepare(model)
    if callable(weights) and not isinstance(weights, Mapping):
        weights = weights(model)
    if lora is not None:
        apply_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                   targets=lora.targets)
        if adapter_dtype is not None:
            for key, param in list(model.named_parameters()):
                if is_lora_key(key):
                    owner, _, name = key.rpartition(".")
                    model.get_submodule(owner)._parameters[name] = torch.nn.Parameter(
                        param.to(adapter_dtype))
    if quantize is not None:
        quantize_base(model, quantize, device="meta")
    if adapter is not None:
        try:
            check_lora_state_dict(model, adapter)
        except ValueError as e:
            raise CheckpointError(f"{adapter_source or 'the adapter'}: {e}") from e
    if shard is not None:
        shard(model)
        model.to_empty(device=device)

    def put(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
        param = module._parameters[name]
        if shard is None:  # the value becomes the parameter: no copy when it needs no cast
            module._parameters[name] = torch.nn.Parameter(
                value.to(device=device, dtype=param.dtype), requires_grad=param.requires_grad)
        else:
            _copy_shard(param, value)

    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for path, module in model.named_modules():
            if is_quantized(module):
                q = quantize_nf4(weights[f"{path}.weight"].to(device))
                for name, value in zip(NF4_PARAMETERS, q):
                    put(module, name, value)
                if on_quantized is not None:
                    on_quantized(path)
        for key, param in list(model.named_parameters()):
            path, _, name = key.rpartition(".")
            if name in NF4_PARAMETERS:
                continue
            module = model.get_submodule(path)
            if not is_lora_key(key):
                put(module, name, weights[key])
            elif adapter is not None:
                put(module, name, adapter[key])
            else:  # whole, in the order one process makes them: the same numbers everywhere
                put(module, name, init_lora_(
                    torch.empty(param.shape, dtype=param.dtype, device=device), key))
    return model


def inference_model(config: DecoderConfig, weights: Mapping[str, torch.Tensor],
                    adapter=None, *, adapter_source: str | Path | None = None,
                    on_quantized: Callable[[str], None] | None = None) -> Decoder:
    """A plain Decoder holding checked base weights, with a LoRA adapter merged in if given:
    what ``tune generate``, ``tune eval`` and ``tune merge`` run or write.

    The model keeps the base's dtype and takes its tensors as they are (no copy, on CPU).
    The adapters are held in fp32 (an fp32 adapter on a bf16 base keeps its precision) and
    merged once (``tune_models.merge_lora``), so the result runs at the base model's speed.
    A QLoRA adapter (``quantize_base: nf4``) was trained against the NF4 version of the base:
    it is merged into the base quantised to NF4 exactly as training quantised it, then
    dequantised, which is the model that was trained.

    Args:
        config: The base model's shape.
        weights: Its weights, checked against ``config`` (``tune_ckpt.check_model_fits``).
        adapter: A ``tune_ckpt.Adapter`` (``load_peft_adapter``), or None.
        adapter_source: Where the adapter was read, for messages.
        on_quantized: See :func:`build_model`.

    Raises:
        CheckpointError: The adapter does not fit the model.
    """
    from tune_models import merge_lora

    dtype = weights["tok_embeddings.weight"].dtype
    if adapter is None:
        return build_model(config, weights, dtype=dtype).eval()
    model = build_model(config, weights, dtype=dtype, lora=adapter.settings,
                        adapter=adapter.weights, adapter_dtype=torch.float32,
                        quantize=adapter.quantize_base, adapter_source=adapter_source,
                        on_quantized=on_quantized)
    return merge_lora(model, dtype=dtype).eval()


def _copy_shard(param: torch.nn.Parameter, whole: torch.Tensor) -> None:
    """Copy this process's part of ``whole`` into a parameter FSDP2 has sharded."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):  # a module left unsharded
        param.copy_(whole)
        return
    (placement,) = param.placements  # FSDP2 over one mesh dimension: Shard(0)
    mesh = param.device_mesh
    chunks = torch.chunk(whole, mesh.size(), dim=placement.dim)  # as FSDP2 splits
    rank = mesh.get_local_rank()
    part = chunks[rank] if rank < len(chunks) else whole.narrow(placement.dim, 0, 0)
    local = param.to_local()
    if part.shape != local.shape:
        raise RuntimeError(f"shard of shape {tuple(local.shape)} cannot take "
                           f"{tuple(part.shape)} of {tuple(whole.shape)}")
    local.copy_(part)
