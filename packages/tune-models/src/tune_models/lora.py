"""LoRA: low-rank adapters on a frozen decoder, as a model transform (torch only).

``apply_lora(model, rank=8, alpha=16, targets=["q", "v"])`` replaces the targeted linear
layers of a :class:`~tune_models.decoder.Decoder` with :class:`LoRALinear` and freezes every
other parameter. A LoRA layer computes ``W x + b + (alpha / rank) * B A dropout(x)``: ``A``
(rank x in) starts kaiming-uniform and ``B`` (out x rank) at zero, as PEFT does, so the model
is unchanged until B has trained. Its base weight keeps its native name (``wo.weight``), so
base checkpoints load as they are, and may be stored in NF4 (:mod:`tune_models.nf4`, QLoRA).

The fused ``wqkv`` gets one adapter per targeted projection among q, k and v, each adding to
its own rows ``[Q heads | K heads | V heads]`` of the fused output. That is what PEFT puts on
transformers' separate q_proj / k_proj / v_proj, so adapters map one to one both ways.

Parameter names (the native adapter schema, also in the package README):

* a single projection: ``layers.{i}.attention.wo.lora_a`` (rank, in) and ``.lora_b``
  (out, rank); likewise ``feed_forward.w1`` (gate), ``w3`` (up), ``w2`` (down) and
  ``output.lora_a`` / ``output.lora_b``;
* the fused projection: ``layers.{i}.attention.wqkv.lora_a.q`` (rank, dim) and
  ``.lora_b.q`` (n_heads * head_dim, rank), and ``.k`` / ``.v`` with n_kv_heads * head_dim
  rows. ``lora_b.q`` / ``lora_b.k`` rows are in the native (Meta) RoPE order of wqkv's rows.
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tune_models.decoder import DecoderConfig
from tune_models.families import qkv_rows
from tune_models.nf4 import NF4Linear, base_linear, base_weight, is_quantized

# The three projections fused in wqkv, in row order.
QKV_PARTS = ("q", "k", "v")


@dataclass(frozen=True)
class LoRATarget:
    """Where a LoRA target name puts its adapter.

    Attributes:
        module: The module's path, over the layer index ``{i}`` for block modules.
        part: For the fused wqkv, which projection's rows ("q", "k" or "v"); else None.
    """

    module: str
    part: str | None = None


# Target name (what a config's lora_target_modules lists) -> where it goes.
LORA_TARGETS: dict[str, LoRATarget] = {
    "q": LoRATarget("layers.{i}.attention.wqkv", "q"),
    "k": LoRATarget("layers.{i}.attention.wqkv", "k"),
    "v": LoRATarget("layers.{i}.attention.wqkv", "v"),
    "o": LoRATarget("layers.{i}.attention.wo"),
    "gate": LoRATarget("layers.{i}.feed_forward.w1"),
    "up": LoRATarget("layers.{i}.feed_forward.w3"),
    "down": LoRATarget("layers.{i}.feed_forward.w2"),
    "output": LoRATarget("output"),
}
# Other tools' names for the same targets (transformers/PEFT, torchtune), for error hints only.
_TARGET_ALIASES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "output_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "lm_head": "output",
    "w1": "gate", "w3": "up", "w2": "down", "wq": "q", "wk": "k", "wv": "v", "wo": "o",
}


@dataclass(frozen=True)
class LoRASettings:
    """What ``apply_lora`` was asked for; validated on construction.

    Attributes:
        rank: Rank r of each adapter (> 0).
        alpha: Scale numerator: the adapter's output is multiplied by alpha / rank.
        dropout: Dropout probability on the adapter's input (training only), in [0, 1).
        targets: Target names, any of :data:`LORA_TARGETS`, in that table's order.

    Raises:
        ValueError: One line naming the bad field and what it accepts.
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"lora_rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0 <= self.dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.dropout!r}")
        targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        if not targets:
            raise ValueError(f"lora_target_modules is empty; choose from "
                             f"{', '.join(LORA_TARGETS)}")
        for name in targets:
            if name not in LORA_TARGETS:
                raise ValueError(f"unknown LoRA target module {name!r}{_suggest(name)}; choose "
                                 f"from {', '.join(LORA_TARGETS)}")
        # Canonical order, duplicates dropped: equal settings compare equal.
        object.__setattr__(self, "targets", tuple(t for t in LORA_TARGETS if t in targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _suggest(name: str) -> str:
    if isinstance(name, str) and name in _TARGET_ALIASES:
        return f" (did you mean '{_TARGET_ALIASES[name]}'?)"
    close = difflib.get_close_matches(str(name), list(LORA_TARGETS), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight change an adapter makes, ``scale * B @ A``, in fp32: (out, in)."""
    return (lora_b.float() @ lora_a.float()) * scale


def init_lora_(tensor: torch.Tensor, key: str) -> torch.Tensor:
    """Initialise an adapter tensor named by its key: A (``lora_a``) kaiming-uniform as
    nn.Linear and PEFT do, B (``lora_b``) zero, so a new adapter changes nothing at first."""
    if ".lora_b" in key or key.startswith("lora_b"):
        return nn.init.zeros_(tensor)
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


class LoRALinear(nn.Module):
    """A frozen linear layer plus low-rank adapters on all or some of its output rows.

    Args:
        in_features: Input width.
        out_features: Output width.
        rank: Adapter rank r.
        alpha: The adapters' outputs are scaled by alpha / rank.
        dropout: Dropout probability on the adapters' input (the base path sees x as is).
        bias: Whether the base layer has a (frozen) bias.
        parts: None for one adapter on all rows; else name -> the rows [start, stop) each
            named adapter adds to (the fused wqkv: {"q": ..., "v": ...}).
        device: Where to make the parameters.
        dtype: Their dtype.
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
                 dropout: float = 0.0, bias: bool = False,
                 parts: dict[str, tuple[int, int]] | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.scale = alpha / rank
        self.parts = dict(parts) if parts is not None else None
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) \
            if bias else None
        self._make_adapters(**factory)
        if not self.weight.is_meta:
            self.reset_lora_parameters()

    def _make_adapters(self, device=None, dtype=None) -> None:
        factory = {"device": device, "dtype": dtype}
        if self.parts is None:
            self.lora_a = nn.Parameter(torch.empty(self.rank, self.in_features, **factory))
            self.lora_b = nn.Parameter(torch.empty(self.out_features, self.rank, **factory))
        else:
            # OrderedDict: a plain dict would be sorted by name; keep the parts in row order.
            self.lora_a = nn.ParameterDict(OrderedDict(
                (n, nn.Parameter(torch.empty(self.rank, self.in_features, **factory)))
                for n in self.parts))
            self.lora_b = nn.ParameterDict(OrderedDict(
                (n, nn.Parameter(torch.empty(hi - lo, self.rank, **factory)))
                for n, (lo, hi) in self.parts.items()))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0,
                    parts: dict[str, tuple[int, int]] | None = None) -> LoRALinear:
        """Wrap an existing linear layer: its weight and bias tensors are taken over as they
        are (no copy; they may be on the meta device or mmap'd), the adapters are made on
        the weight's device and dtype and initialised unless that is the meta device."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, rank=rank, alpha=alpha,
                      dropout=dropout, bias=linear.bias is not None, parts=parts)
        new.weight = nn.Parameter(linear.weight.data, requires_grad=False)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        new._make_adapters(device=linear.weight.device, dtype=linear.weight.dtype)
        if not linear.weight.is_meta:
            new.reset_lora_parameters()
        return new

    def adapters(self) -> Iterable[tuple[str | None, tuple[int, int], nn.Parameter,
                                         nn.Parameter]]:
        """(part name or None, rows, A, B) for each adapter."""
        if self.parts is None:
            yield None, (0, self.out_features), self.lora_a, self.lora_b
        else:
            for name, rows in self.parts.items():
                yield name, rows, self.lora_a[name], self.lora_b[name]

    def reset_lora_parameters(self) -> None:
        """A kaiming-uniform (as nn.Linear and PEFT initialise), B zero: no change at first."""
        with torch.no_grad():
            for _, _, a, b in self.adapters():
                init_lora_(a, "lora_a")
                init_lora_(b, "lora_b")

    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        return x

    def low_rank(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's term as ``(u, B)`` with ``u @ B.T`` its output: u (..., rank) is the
        scaled rank-r activation. The decoder's chunked loss adds it to the logits without
        forming the output projection's full result (one adapter on all rows only)."""
        # Scaling the rank-r activations is cheaper than scaling the output.
        return F.linear(self._adapter_input(x), self.lora_a) * self.scale, self.lora_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = base_linear(self, x)  # (..., out)
        if self.parts is None:
            u, b = self.low_rank(x)
            return out + F.linear(u, b)
        x = self._adapter_input(x)
        names = list(self.parts)
        a = torch.cat([self.lora_a[n] for n in names]) if len(names) > 1 else \
            self.lora_a[names[0]]  # (P*r, in): one matmul for every part's A
        h = F.linear(x, a) * self.scale  # (..., P*r)
        return out + F.linear(h, self._fused_b())

    def _fused_b(self) -> torch.Tensor:
        # The parts' B matrices placed block-diagonally in one (out, P*r) matrix: part i's
        # rows take columns i*r .. (i+1)*r of h, rows no part targets get zeros. One matmul
        # and one add for the whole fused output; tiny to build (out x P*r).
        r, n = self.rank, len(self.parts)
        blocks = [F.pad(self.lora_b[name], (i * r, (n - 1 - i) * r, lo, self.out_features - hi))
                  for i, (name, (lo, hi)) in enumerate(self.parts.items())]
        return blocks[0] if n == 1 else torch.stack(blocks).sum(0)

    def extra_repr(self) -> str:
        parts = f", parts={list(self.parts)}" if self.parts is not None else ""
        quantized = ", nf4" if is_quantized(self) else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}{parts}{quantized}")


def _modules_by_target(settings: LoRASettings) -> dict[str, list[str | None]]:
    """Module path template -> the parts targeted in it, in target order."""
    out: dict[str, list[str | None]] = {}
    for name in settings.targets:
        target = LORA_TARGETS[name]
        out.setdefault(target.module, []).append(target.part)
    return out


def _module_paths(config: DecoderConfig, template: str) -> list[str]:
    if "{i}" not in template:
        return [template]
    return [template.format(i=i) for i in range(config.n_layers)]


def _parts(config: DecoderConfig, parts: list[str | None]) -> dict[str, tuple[int, int]] | None:
    if parts == [None]:
        return None
    # The rows [start, stop) of each part in the fused wqkv.
    bounds = itertools.accumulate(qkv_rows(config), initial=0)
    starts = list(bounds)
    rows = {part: (starts[i], starts[i + 1]) for i, part in enumerate(QKV_PARTS)}
    return {p: rows[p] for p in QKV_PARTS if p in parts}


def check_lora_targets(config: DecoderConfig, settings: LoRASettings) -> None:
    """Raise unless every target exists in models of this shape.

    Raises:
        ValueError: "output" with tied embeddings (the output projection is the input
            embedding; an adapter on it would change both or neither).
    """
    if "output" in settings.targets and config.tie_embeddings:
        raise ValueError(
            "LoRA target 'output' needs a separate output matrix, but this model ties it to "
            "the input embeddings (tie_embeddings); remove 'output' from lora_target_modules"
        )


def lora_parameter_shapes(
    config: DecoderConfig, settings: LoRASettings
) -> dict[str, tuple[int, int]]:
    """Every adapter parameter name of a model of this shape, with its shape.

    This is what ``lora_state_dict(apply_lora(Decoder(config), ...))`` holds, without
    building a model: checkpoint code checks adapters against it.
    """
    check_lora_targets(config, settings)
    shapes: dict[str, tuple[int, int]] = {}
    widths = {"layers.{i}.attention.wqkv": (config.dim, None),
              "layers.{i}.attention.wo": (config.n_heads * config.head_dim, config.dim),
              "layers.{i}.feed_forward.w1": (config.dim, config.hidden_dim),
              "layers.{i}.feed_forward.w3": (config.dim, config.hidden_dim),
              "layers.{i}.feed_forward.w2": (config.hidden_dim, config.dim),
              "output": (config.dim, config.vocab_size)}
    r = settings.rank
    for template, parts in _modules_by_target(settings).items():
        fan_in, fan_out = widths[template]
        fused = _parts(config, parts)
        for path in _module_paths(config, template):
            if fused is None:
                shapes[f"{path}.lora_a"] = (r, fan_in)
                shapes[f"{path}.lora_b"] = (fan_out, r)
            else:
                for part, (lo, hi) in fused.items():
                    shapes[f"{path}.lora_a.{part}"] = (r, fan_in)
                    shapes[f"{path}.lora_b.{part}"] = (hi - lo, r)
    return shapes


def apply_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Sequence[str] = ("q", "v"),
) -> nn.Module:
    """Add LoRA adapters to a Decoder in place and freeze everything else.

    The targeted linear layers become :class:`LoRALinear` holding the same weight tensors
    (no copy), so this works on a model built on the meta device (the adapters are then on
    the meta device too: ``reset_lora_parameters`` after materialising) or on one whose
    weights were just loaded, mmap'd (the adapters are made and initialised on that device).

    Args:
        model: A :class:`~tune_models.decoder.Decoder`, not yet quantised.
        rank: Adapter rank (> 0).
        alpha: Adapter outputs are scaled by alpha / rank.
        dropout: Dropout on the adapters' input while training.
        targets: Any of q, k, v, o, gate, up, down, output (:data:`LORA_TARGETS`).

    Returns:
        The same model; only its ``lora_a`` / ``lora_b`` parameters require grad.

    Raises:
        ValueError: One line for a bad rank, alpha or dropout, an unknown target, "output"
            with tied embeddings, a model that already has adapters or is already quantised.
    """
    settings = LoRASettings(rank, alpha, dropout, targets)
    config = model.config
    check_lora_targets(config, settings)
    if lora_settings(model) is not None:
        raise ValueError("the model already has LoRA adapters (apply_lora was called twice)")
    for param in model.parameters():
        param.requires_grad_(False)
    for template, parts in _modules_by_target(settings).items():
        for path in _module_paths(config, template):
            linear = model.get_submodule(path)
            if isinstance(linear, NF4Linear):
                raise ValueError(f"'{path}' is already quantised: call apply_lora before "
                                 "quantize_base")
            lora = LoRALinear.from_linear(linear, rank=settings.rank, alpha=settings.alpha,
                                          dropout=settings.dropout,
                                          parts=_parts(config, parts))
            parent, _, child = path.rpartition(".")
            (model.get_submodule(parent) if parent else model).register_module(child, lora)
    return model


def lora_modules(model: nn.Module) -> Iterable[tuple[str, LoRALinear]]:
    """(path, module) of every LoRA layer, in module order."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def lora_settings(model: nn.Module) -> LoRASettings | None:
    """The settings the model's adapters were made with, or None if it has none."""
    found = list(lora_modules(model))
    if not found:
        return None
    first = found[0][1]
    targets = []
    for path, module in found:
        # "layers.3.attention.wqkv" -> "layers.{i}.attention.wqkv"
        template = "layers.{i}." + path.split(".", 2)[2] if path.startswith("layers.") \
            else path
        for part, *_ in module.adapters():
            targets += [name for name, t in LORA_TARGETS.items()
                        if t.module == template and t.part == part]
    return LoRASettings(first.rank, first.alpha, first.dropout, tuple(targets))


def is_lora_key(key: str) -> bool:
    """Whether a state-dict key names an adapter parameter."""
    return ".lora_a" in key or ".lora_b" in key


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters only (what a LoRA checkpoint holds), in the native schema."""
    return {k: v for k, v in model.state_dict().items() if is_lora_key(k)}


def reset_lora_parameters(model: nn.Module) -> None:
    """Initialise every adapter (A kaiming-uniform, B zero), e.g. after ``to_empty``."""
    for _, module in lora_modules(model):
        module.reset_lora_parameters()


def check_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Check that adapter weights fit a model's adapters: the same keys and shapes (the
    model may be on the meta device or sharded).

    Raises:
        ValueError: One line naming the first missing, unexpected or misshapen key.
    """
    expected = {k: tuple(v.shape) for k, v in model.named_parameters() if is_lora_key(k)}
    if not expected:
        raise ValueError("the model has no LoRA adapters: apply_lora first")
    for key, value in state_dict.items():
        if key not in expected:
            raise ValueError(
                f"the adapter has '{key}', which this model's adapters lack (the adapter "
                f"targets other modules, or another model; this model's targets: "
                f"{', '.join(lora_settings(model).targets)})")
        if tuple(value.shape) != expected[key]:
            raise ValueError(
                f"the adapter's '{key}' has shape {tuple(value.shape)}, this model's is "
                f"{expected[key]}: the adapter was made for another base model or rank")
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise ValueError(f"the adapter has no '{missing[0]}'" +
                         (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                         ": it targets fewer modules or layers than this model's adapters")


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load adapter weights into a model with adapters of the same targets and shapes.

    Values are copied into the existing parameters (keeping their dtype and device), or
    become them if those are still on the meta device.

    Raises:
        ValueError: One line naming the first missing, unexpected or misshapen key
            (:func:`check_lora_state_dict`).
    """
    check_lora_state_dict(model, state_dict)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state_dict.items():
            param = params[key]
            if param.is_meta:
                owner, _, name = key.rpartition(".")
                setattr(model.get_submodule(owner), name,
                        nn.Parameter(value.to(param.dtype), requires_grad=True))
            else:
                param.copy_(value)


def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every adapter into its base weight and return a plain Decoder.

    Each LoRA layer becomes an ``nn.Linear`` with ``W + (alpha / rank) * B @ A`` (computed in
    fp32). An NF4 base is dequantised first, and so is every other NF4 layer: the result is
    the model that was trained (NF4 base plus adapters) in ordinary weights. The merged
    model's state dict is a native checkpoint.

    Args:
        model: A Decoder with adapters (and/or an NF4 base).
        dtype: dtype of the merged weights; default the base weight's, or for an NF4 base
            the model's (its embedding's) dtype.

    Returns:
        The same model object, changed in place; all parameters frozen.
    """
    model_dtype = dtype or model.tok_embeddings.weight.dtype
    for path, module in list(model.named_modules()):
        if not isinstance(module, (LoRALinear, NF4Linear)):
            continue
        quantized = is_quantized(module)
        target = dtype or (model_dtype if quantized else module.weight.dtype)
        with torch.no_grad():
            if quantized:
                weight = base_weight(module, torch.float32)  # a new tensor
            else:  # a copy: the base may be mmap'd or shared with another model
                weight = module.weight.to(torch.float32, copy=True)
            if isinstance(module, LoRALinear):
                for _, (lo, hi), a, b in module.adapters():
                    weight[lo:hi] += lora_delta(a, b, module.scale)
            linear = nn.Linear(module.in_features, module.out_features,
                               bias=module.bias is not None, device="meta")
            linear.weight = nn.Parameter(weight.to(target), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.data.to(target), requires_grad=False)
        parent, _, child = path.rpartition(".")
        (model.get_submodule(parent) if parent else model).register_module(child, linear)
    for param in model.parameters():
        param.requires_grad_(False)
    return model
