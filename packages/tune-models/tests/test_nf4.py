"""NF4 with double-quantised scales against an independent reference, and QLoRA on CPU."""

import copy

import pytest
import torch

from tune_models import (
    Decoder,
    NF4Linear,
    apply_lora,
    dequantize_nf4,
    llama2_tiny,
    merge_lora,
    quantize_base,
    quantize_nf4,
    qwen2_tiny,
)
from tune_models.nf4 import (
    BLOCK_SIZE,
    NF4_CODEBOOK,
    SCALE_BLOCK_SIZE,
    NF4Weight,
    base_weight,
    dequantize_scales,
    is_quantized,
)


def _reference_nf4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain NF4 without double quantisation, written from the paper: per 64-block absmax,
    each weight to the nearest code (argmin of the distance, not the midpoints)."""
    book = torch.tensor(NF4_CODEBOOK, dtype=torch.float64)
    flat = w.reshape(-1).double()
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % BLOCK_SIZE)]).view(-1, BLOCK_SIZE)
    absmax = flat.abs().amax(1, keepdim=True)
    normed = flat / absmax.clamp_min(1e-300)
    codes = (normed[..., None] - book).abs().argmin(-1)  # (blocks, 64)
    return codes, absmax.squeeze(1)


def test_the_code_book_is_nf4_from_normal_quantiles():
    # QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1), offset 0.9677083
    # (the midpoint of 1 - 1/(2*15) and 1 - 1/(2*16)), with an exact zero, scaled to [-1, 1].
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    offset = 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    torch.testing.assert_close(torch.tensor(NF4_CODEBOOK, dtype=torch.float64),
                               values / values.abs().max(), atol=2e-7, rtol=0)


@pytest.mark.parametrize("shape", [(96, 256), (7, 50), (1000, 333)])
def test_codes_match_the_reference_and_the_error_is_bounded(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    q = quantize_nf4(w)
    ref_codes, ref_absmax = _reference_nf4(w)
    # Unpack ours: high nibble first.
    codes = torch.stack([q.codes >> 4, q.codes & 15], dim=1).view(-1, BLOCK_SIZE).long()
    assert torch.equal(codes, ref_codes)
    absmax = dequantize_scales(q.scales, q.factors)[: len(ref_absmax)].double()
    back = dequantize_nf4(q, shape)
    assert back.shape == shape and back.dtype == torch.float32
    book = torch.tensor(NF4_CODEBOOK, dtype=torch.float64)
    expected = (book[ref_codes] * absmax[:, None]).flatten()[: w.numel()].view(shape)
    torch.testing.assert_close(back.double(), expected, atol=1e-9, rtol=1e-6)
    # Each weight is within half the widest code-book gap of its block's (stored) absmax,
    # plus the scale's own double-quantisation error.
    half_gap = (book[1:] - book[:-1]).max() / 2
    scale_err = (absmax - ref_absmax).abs()
    bound = (ref_absmax * half_gap + scale_err)[:, None].expand(-1, BLOCK_SIZE)
    err = (back.double() - w.double()).reshape(-1)
    assert (err.abs() <= bound.reshape(-1)[: w.numel()] + 1e-9).all()
    # On Gaussian weights NF4's mean error is a few percent of the block absmax.
    assert err.abs().mean() < 0.05 * ref_absmax.mean()


def test_double_quantised_scales_are_within_half_a_step_of_their_group():
    torch.manual_seed(1)
    w = torch.randn(700, 512) * torch.rand(700, 1)  # scales that vary a lot between rows
    q = quantize_nf4(w)
    _, ref_absmax = _reference_nf4(w)
    n_blocks = len(ref_absmax)
    groups = -(-n_blocks // SCALE_BLOCK_SIZE)
    assert q.scales.dtype == torch.int8 and q.scales.numel() == groups * SCALE_BLOCK_SIZE
    assert q.factors.dtype == torch.int32 and q.factors.numel() == groups + 1
    factor = q.factors.view(torch.float32)[:-1].double()
    absmax = dequantize_scales(q.scales, q.factors)[:n_blocks].double()
    step = factor.repeat_interleave(SCALE_BLOCK_SIZE)[:n_blocks] / 127
    assert ((absmax - ref_absmax).abs() <= step / 2 + 1e-7).all()
    # 4 bits per weight + 8 bits per 64 + 32 bits per 64 * 256: about 4.127 bits.
    bits = 8 * sum(t.numel() * t.element_size() for t in q) / w.numel()
    assert 4.12 < bits < 4.14


def test_dequantise_in_chunks_equals_one_pass(monkeypatch):
    import tune_models.nf4 as nf4

    torch.manual_seed(2)
    w = torch.randn(300, 200)
    whole = dequantize_nf4(quantize_nf4(w), w.shape)
    monkeypatch.setattr(nf4, "_CHUNK", 64 * 7)  # chunks that cut a scale group
    q = quantize_nf4(w)
    assert torch.equal(dequantize_nf4(q, w.shape), whole)


def test_model_to_bf16_moves_the_nf4_base_without_rounding_it():
    torch.manual_seed(3)
    model = Decoder(llama2_tiny(vocab_size=64))
    model.init_weights()
    apply_lora(model, rank=2, alpha=4, targets=["q", "v"])
    quantize_base(model, "nf4")
    before = copy.deepcopy(model.state_dict())
    model.to(torch.bfloat16)
    for key, tensor in model.state_dict().items():
        if "_nf4" in key:
            assert torch.equal(tensor, before[key]), key
        else:
            assert tensor.dtype == torch.bfloat16, key
    w1 = model.layers[0].feed_forward.w1
    assert isinstance(w1, NF4Linear)
    # The bf16 weight is the fp32 dequantisation rounded once.
    stored = NF4Weight(*(before[f"layers.0.feed_forward.w1.weight{suffix}"]
                         for suffix in ("_nf4", "_nf4_scales", "_nf4_factors")))
    fp32 = dequantize_nf4(stored, (w1.out_features, w1.in_features))
    assert torch.equal(base_weight(w1, torch.bfloat16), fp32.to(torch.bfloat16))


@pytest.mark.parametrize("config", [llama2_tiny(vocab_size=64), qwen2_tiny(vocab_size=64)],
                         ids=["llama2", "qwen2"])
def test_qlora_step_trains_only_the_adapters_with_the_dequantised_gradients(config):
    """Forward and backward through NF4 layers on CPU in fp32: loss and adapter gradients equal
    a float model holding the dequantised weights; nothing else gets a gradient."""
    torch.manual_seed(4)
    model = Decoder(config)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    apply_lora(model, rank=4, alpha=8, targets=["q", "k", "v", "o", "gate", "up", "down"])
    quantize_base(model, "nf4")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b" in name:
                p.normal_(0, 0.1)
    assert all(is_quantized(m) for layer in model.layers
               for m in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w1,
                         layer.feed_forward.w2, layer.feed_forward.w3))
    # The reference: the same adapters over the dequantised base as ordinary float weights
    # (merging with B = 0 only dequantises).
    without_adapters = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in without_adapters.named_parameters():
            if ".lora_b" in name:
                p.zero_()
    reference = Decoder(config)
    reference.load_state_dict(merge_lora(without_adapters).state_dict())
    apply_lora(reference, rank=4, alpha=8, targets=["q", "k", "v", "o", "gate", "up", "down"])
    with torch.no_grad():
        ours = dict(model.named_parameters())
        for name, p in reference.named_parameters():
            if ".lora_" in name:
                p.copy_(ours[name])
    tokens = torch.randint(0, config.vocab_size, (2, 40))
    labels = torch.randint(0, config.vocab_size, (2, 40))
    loss = model(tokens, labels=labels)
    loss.backward()
    expected = reference(tokens, labels=labels)
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-5)
    theirs = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad
            torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4,
                                       msg=name)
        else:
            assert not p.requires_grad and p.grad is None, name


def test_quantise_a_meta_model_from_lazy_weights_one_at_a_time():
    """The 8B memory path: nothing but the module being quantised is ever in fp32."""
    torch.manual_seed(5)
    config = llama2_tiny(vocab_size=64)
    real = Decoder(config)
    real.init_weights()
    apply_lora(real, rank=2, alpha=2, targets=["v"])
    quantize_base(real, "nf4")

    torch.manual_seed(5)
    source = Decoder(config)
    source.init_weights()
    state = source.state_dict()
    asked = []

    class Lazy(dict):
        def __getitem__(self, key):
            asked.append(key)
            return state[key].clone()

    with torch.device("meta"):
        lazy = Decoder(config)
    apply_lora(lazy, rank=2, alpha=2, targets=["v"])
    quantize_base(lazy, "nf4", weights=Lazy(), device="cpu")
    assert len(asked) == 5 * config.n_layers and all(k.endswith(".weight") for k in asked)
    mine, theirs = lazy.state_dict(), real.state_dict()
    for key in theirs:
        if "_nf4" in key:
            assert torch.equal(mine[key], theirs[key]), key
        else:
            assert mine[key].is_meta, key  # embeddings, norms, adapters: the caller's job


def test_quantize_base_refuses_what_it_cannot_do():
    model = Decoder(llama2_tiny(vocab_size=64))
    with pytest.raises(ValueError, match="unknown quantize_base scheme 'int4'"):
        quantize_base(model, "int4")
    with pytest.raises(ValueError, match="trainable.*apply LoRA first"):
        quantize_base(model, "nf4")
    with torch.device("meta"):
        meta = Decoder(llama2_tiny(vocab_size=64))
    apply_lora(meta, rank=2, alpha=2, targets=["q"])
    with pytest.raises(ValueError, match="meta device: load the weights first"):
        quantize_base(meta, "nf4")
    model.requires_grad_(False)
    quantize_base(model, "nf4")
    with pytest.raises(ValueError, match="already quantised"):
        quantize_base(model, "nf4")
    with pytest.raises(ValueError, match="call apply_lora before quantize_base"):
        apply_lora(model, rank=2, alpha=2, targets=["o"])
