"""NF4 weights with double-quantised scales, the frozen base of QLoRA (torch only).

NF4 (Dettmers et al., 2023, "QLoRA") stores each weight as one of 16 values placed at the
quantiles of a normal distribution, scaled per block of 64 weights by the block's largest
magnitude. Double quantisation stores those 64-weight scales themselves in 8 bits: the mean
of all scales is subtracted, and each group of 256 centred scales gets one fp32 factor.
That is 4 + 8/64 + 32/(64*256) = 4.127 bits per weight.

A quantised weight is three integer tensors (see :func:`quantize_nf4`). All three are
integers on purpose: ``model.to(torch.bfloat16)`` and FSDP2's mixed-precision casts touch
floating-point tensors only, so they move the quantised base between devices and shard it,
but never round it again. The fp32 factors are kept as their bit patterns (int32).

Why our own code rather than bitsandbytes or torchao: it is plain PyTorch (runs and is tested
on CPU, nothing compiled, no version pin against torch), the quantised weight is ordinary
tensors that FSDP2's ``fully_shard`` shards like any parameter, and it is short enough to
read. The price is speed: dequantising is a table lookup and a multiply in PyTorch ops, not
one fused kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# The 16 NF4 values (QLoRA, appendix E): quantiles of N(0, 1) normalised to [-1, 1], with
# an exact zero and 8 positive / 7 negative levels.
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCK_SIZE = 64  # weights per scale
SCALE_BLOCK_SIZE = 256  # scales per double-quantisation factor
# Weights quantised or dequantised per pass: bounds the int64/fp32 temporaries to ~100 MB
# whatever the matrix.
_CHUNK = 2**23

# The linear layers of a block that QLoRA stores in NF4. Embeddings, norms and the output
# projection stay in the compute dtype (as bitsandbytes leaves lm_head): they are a small
# part of a 7B model and the logits are where precision shows most.
QUANTIZED_MODULES = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                     "feed_forward.w3")
QUANT_SCHEMES = ("nf4",)


class NF4Weight(NamedTuple):
    """A quantised weight: every tensor an integer type, shapes only from ``numel``.

    Attributes:
        codes: uint8 (ceil(numel / 64) * 32,): two 4-bit code-book indices per byte, the
            first weight of each pair in the high nibble; the flattened weight zero-padded
            to whole blocks.
        scales: int8 (ceil(n_blocks / 256) * 256,): each block's absmax minus their mean,
            in units of its group's factor / 127.
        factors: int32 (n_groups + 1,): the bits of fp32 values: one factor per group of
            256 scales, then the mean of the scales.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    factors: torch.Tensor


def _boundaries(device: torch.device) -> torch.Tensor:
    book = torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)
    return (book[1:] + book[:-1]) / 2  # (15,) midpoints: nearest code = bucket index


_PAIR_TABLES: dict[torch.device, torch.Tensor] = {}


def _pair_table(device: torch.device) -> torch.Tensor:
    # Byte -> the two fp32 values it encodes: one gather per two weights. Cached per device so
    # a GPU forward does not copy it from the host every call.
    if device not in _PAIR_TABLES:
        book = torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)
        byte = torch.arange(256, device=device)
        _PAIR_TABLES[device] = torch.stack([book[byte >> 4], book[byte & 15]], dim=1)  # (256, 2)
    return _PAIR_TABLES[device]


def quantize_nf4(weight: torch.Tensor) -> NF4Weight:
    """NF4-quantise a weight of any shape, with double-quantised block scales.

    Each weight becomes the nearest code-book value times its block's absmax (in fp32).
    Work is done in chunks, so the temporaries stay ~100 MB whatever the matrix size.

    Args:
        weight: A floating-point tensor (any device, any float dtype).

    Returns:
        The quantised weight, on ``weight``'s device.
    """
    device = weight.device
    flat = weight.detach().reshape(-1)
    numel = flat.numel()
    n_blocks = -(-numel // BLOCK_SIZE)
    codes = torch.empty(n_blocks * BLOCK_SIZE // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=device)
    bounds = _boundaries(device)
    for start in range(0, numel, _CHUNK):  # _CHUNK is a multiple of BLOCK_SIZE
        chunk = flat[start : start + _CHUNK].float()
        if chunk.numel() % BLOCK_SIZE:  # the last block: zeros are exactly representable
            chunk = F.pad(chunk, (0, -chunk.numel() % BLOCK_SIZE))
        blocks = chunk.view(-1, BLOCK_SIZE)  # (b, 64)
        b0 = start // BLOCK_SIZE
        block_max = blocks.abs().amax(dim=1)  # (b,)
        absmax[b0 : b0 + len(blocks)] = block_max
        normed = blocks / block_max.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        index = torch.bucketize(normed, bounds).view(-1, 2)  # (b*32, 2) in 0..15
        codes[b0 * BLOCK_SIZE // 2 : (b0 + len(blocks)) * BLOCK_SIZE // 2] = \
            (index[:, 0] << 4 | index[:, 1]).to(torch.uint8)
    scales, factors = _quantize_scales(absmax)
    return NF4Weight(codes, scales, factors)


def _quantize_scales(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Centring first puts the 8-bit grid where the scales are: they cluster around their mean.
    mean = absmax.mean()
    centred = absmax - mean
    n_groups = -(-absmax.numel() // SCALE_BLOCK_SIZE)
    centred = F.pad(centred, (0, n_groups * SCALE_BLOCK_SIZE - absmax.numel()))
    groups = centred.view(n_groups, SCALE_BLOCK_SIZE)  # (G, 256)
    factor = groups.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)  # (G,)
    scales = torch.round(groups / factor[:, None] * 127).to(torch.int8).flatten()
    factors = torch.cat([factor, mean.reshape(1)]).view(torch.int32)  # fp32 bits
    return scales, factors


def dequantize_scales(scales: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """The fp32 block absmax values back from their double-quantised form.

    Args:
        scales: int8 from :func:`quantize_nf4`.
        factors: int32 (fp32 bits) from :func:`quantize_nf4`.

    Returns:
        fp32 (len(scales),): one absmax per block (the padding past the last block included).
    """
    f = factors.view(torch.float32)
    factor, mean = f[:-1], f[-1]  # (G,), ()
    groups = scales.view(-1, SCALE_BLOCK_SIZE).float() * (factor / 127)[:, None]  # (G, 256)
    return groups.flatten() + mean


def dequantize_nf4(
    q: NF4Weight, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight back from NF4, computed in fp32 and cast to ``dtype``.

    Args:
        q: From :func:`quantize_nf4`.
        shape: The original shape.
        dtype: The result's dtype.

    Returns:
        A tensor of ``shape`` and ``dtype`` on the codes' device.
    """
    numel = 1
    for s in shape:
        numel *= s
    absmax = dequantize_scales(q.scales, q.factors)
    table = _pair_table(q.codes.device)
    out = torch.empty(numel, dtype=dtype, device=q.codes.device)
    pairs_per_block = BLOCK_SIZE // 2
    for start in range(0, numel, _CHUNK):
        stop = min(start + _CHUNK, numel)
        b0, b1 = start // BLOCK_SIZE, -(-stop // BLOCK_SIZE)
        values = table[q.codes[b0 * pairs_per_block : b1 * pairs_per_block].int()]  # (n, 2)
        values = values.view(b1 - b0, BLOCK_SIZE) * absmax[b0:b1, None]  # (b, 64)
        out[start:stop] = values.flatten()[: stop - start]
    return out.view(shape)


class _NF4Matmul(torch.autograd.Function):
    """x @ dequantize(W).T that saves the 4-bit weight for backward, not the dequantised one:
    otherwise every layer's full-precision weight would stay alive until backward."""

    @staticmethod
    def forward(ctx, x, codes, scales, factors, shape):
        ctx.shape = shape
        ctx.save_for_backward(codes, scales, factors)
        return F.linear(x, dequantize_nf4(NF4Weight(codes, scales, factors), shape, x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        codes, scales, factors = ctx.saved_tensors
        weight = dequantize_nf4(NF4Weight(codes, scales, factors), ctx.shape, grad_out.dtype)
        return grad_out @ weight, None, None, None, None  # the base is frozen: no weight grad


# --- NF4 storage on a module -----------------------------------------------------------------
# A quantised module keeps its weight as three parameters named after it, which FSDP2 shards
# like any other (frozen) parameter: weight_nf4, weight_nf4_scales, weight_nf4_factors.

_SUFFIXES = ("_nf4", "_nf4_scales", "_nf4_factors")
NF4_PARAMETERS = tuple("weight" + s for s in _SUFFIXES)  # in NF4Weight's order


def is_quantized(module: nn.Module) -> bool:
    """Whether the module holds its weight in NF4."""
    return hasattr(module, "weight_nf4")


def store_nf4(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantise ``weight`` into the module, replacing its ``weight`` parameter.

    The module must have ``in_features`` and ``out_features``; ``weight`` is (out, in).
    """
    q = quantize_nf4(weight)
    if "weight" in module._parameters:
        del module._parameters["weight"]
    for suffix, tensor in zip(_SUFFIXES, q):
        module.register_parameter("weight" + suffix, nn.Parameter(tensor, requires_grad=False))


def nf4_weight(module: nn.Module) -> NF4Weight:
    """The module's quantised weight (its three parameters)."""
    return NF4Weight(*(getattr(module, name) for name in NF4_PARAMETERS))


def base_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The module's (out, in) weight in ``dtype``: dequantised if it is stored in NF4."""
    if is_quantized(module):
        shape = (module.out_features, module.in_features)
        return dequantize_nf4(nf4_weight(module), shape, dtype or torch.float32)
    return module.weight if dtype is None else module.weight.to(dtype)


def base_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + b`` with the module's weight, dequantised on the fly if it is in NF4."""
    if is_quantized(module):
        q = nf4_weight(module)
        out = _NF4Matmul.apply(x, *q, (module.out_features, module.in_features))
        return out if module.bias is None else out + module.bias
    return F.linear(x, module.weight, module.bias)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (see :func:`quantize_nf4`).

    Args:
        in_features: Input width.
        out_features: Output width.
        weight: The (out, in) weight to quantise (any device and float dtype).
        bias: An optional (out,) bias, kept as it is (frozen).
    """

    def __init__(self, in_features: int, out_features: int, weight: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        store_nf4(self, weight)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return base_linear(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


def quantize_base(
    model: nn.Module,
    scheme: str = "nf4",
    *,
    weights: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    on_quantized: Callable[[str], None] | None = None,
) -> nn.Module:
    """Store the frozen linear weights of every block in NF4 (QLoRA's base), one at a time.

    The block linears (wqkv, wo, w1, w2, w3) are quantised whether LoRA targets them or
    not; a LoRA layer keeps its adapters and gets an NF4 base. Embeddings, norms, biases and
    the output projection stay as they are (biases stay where they are: ``model.to(device)``
    moves them with the rest). Only one weight is in full precision at a time,
    so a model built on the meta device is quantised straight from a checkpoint (``weights``
    mmap'd) or from random weights (a lazy mapping) without the full-precision model ever
    existing.

    Args:
        model: A Decoder, usually after ``apply_lora`` (all its base weights frozen).
        scheme: "nf4", the only scheme.
        weights: Native key -> weight to quantise (e.g. ``tune_ckpt.load_native(path)``);
            only the block linears' keys are read. None quantises the module's own weights,
            which must not be on the meta device.
        device: Where the quantised tensors go; default the source weight's device.
            "meta" gives NF4 parameters of the right shapes and no values, from a model on
            the meta device: to shard a model before filling in each process's part.
        on_quantized: Called with each module's path once it is quantised (progress bars).

    Returns:
        The same model, changed in place.

    Raises:
        ValueError: Unknown scheme, a trainable base weight (full fine-tuning cannot train an
            NF4 weight: apply LoRA first), a weight already quantised, or a meta weight with
            nothing to quantise from.
    """
    placeholders = device is not None and torch.device(device).type == "meta"
    if scheme not in QUANT_SCHEMES:
        raise ValueError(f"unknown quantize_base scheme {scheme!r}; use one of "
                         f"{', '.join(QUANT_SCHEMES)} or none")
    targets = []
    for i, layer in enumerate(model.layers):
        for name in QUANTIZED_MODULES:
            targets.append((f"layers.{i}.{name}", layer.get_submodule(name)))
    for key, module in targets:
        if is_quantized(module):
            raise ValueError(f"'{key}' is already quantised")
        if module.weight.requires_grad:
            raise ValueError(
                f"quantize_base: nf4 freezes the base weights, but '{key}.weight' is trainable: "
                "apply LoRA first (set lora_target_modules) or drop quantize_base"
            )
    for key, module in targets:
        weight = weights[key + ".weight"] if weights is not None else module.weight
        if weight.is_meta and not placeholders:
            raise ValueError(f"'{key}.weight' is on the meta device: load the weights first "
                             "or pass them as weights=")
        if device is not None:
            weight = weight.to(device)
        if type(module) is nn.Linear:
            parent, _, child = key.rpartition(".")
            model.get_submodule(parent).register_module(
                child, NF4Linear(module.in_features, module.out_features, weight, module.bias))
        else:
            store_nf4(module, weight)
        del weight  # the full-precision copy of this one weight, before the next is made
        if on_quantized is not None:
            on_quantized(key)
    return model
