"""Llama2 against transformers' LlamaForCausalLM, the KV cache against the full forward."""

import pytest
import torch
import torch.nn.functional as F
from hf_reference import hf_and_native, hf_to_native_reference

from tune_models import (
    Llama2,
    Llama2Config,
    linear_cross_entropy,
    llama2_7b,
    llama2_13b,
    llama2_70b,
    llama2_tiny,
)

transformers = pytest.importorskip("transformers")


def _hf_to_native(sd: dict, cfg: Llama2Config) -> dict:
    return hf_to_native_reference(sd, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)


def _hf_pair(cfg: Llama2Config, seed: int = 0):
    return hf_and_native(cfg, seed)


CONFIGS = {
    "mha": Llama2Config(vocab_size=256, dim=64, n_layers=2, n_heads=4, multiple_of=32,
                        max_seq_len=128),
    "gqa": Llama2Config(vocab_size=256, dim=96, n_layers=3, n_heads=6, n_kv_heads=2,
                        multiple_of=32, max_seq_len=128, rope_theta=500000.0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    cfg = CONFIGS[name]
    hf, ours = _hf_pair(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, 37))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == (3, 37, cfg.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_grads_match_transformers(name):
    """labels= gives HF's loss (as a sum) and the same parameter gradients."""
    cfg = CONFIGS[name]
    hf, ours = _hf_pair(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    labels = tokens.clone()
    labels[0, :7] = -100  # a masked prompt
    # HF shifts labels inside; ours takes already-shifted next-token targets.
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    n_tokens = (shifted != -100).sum()
    hf(tokens, labels=labels).loss.backward()
    loss_sum = ours(tokens, labels=shifted)
    (loss_sum / n_tokens).backward()
    hf_loss = F.cross_entropy(
        hf(tokens).logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum"
    )
    torch.testing.assert_close(loss_sum, hf_loss.detach(), atol=1e-4, rtol=1e-6)
    hf_grads = _hf_to_native(
        {k: p.grad for k, p in hf.named_parameters()}, cfg
    )
    for key, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_grads[key], atol=1e-6, rtol=1e-4, msg=key)


def test_kv_cache_decode_equals_full_forward():
    cfg = CONFIGS["gqa"]
    _, model = _hf_pair(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(batch_size=2, max_seq_len=32)
        prefill = model(tokens[:, :10], input_pos=torch.arange(10))
        steps = [model(tokens[:, i : i + 1], input_pos=torch.tensor([i])) for i in range(10, 24)]
    incremental = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)
    # The caches are not part of the checkpoint.
    assert not any("kv_cache" in k for k in model.state_dict())
    model.clear_caches()
    assert not model.caches_are_enabled


def test_activation_checkpointing_keeps_grads_and_keys():
    torch.manual_seed(0)
    cfg = CONFIGS["gqa"]
    model = Llama2(cfg)
    model.init_weights()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    model(tokens, labels=tokens).backward()
    plain = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    keys = set(model.state_dict())
    for layer in model.layers:
        layer.use_checkpoint = True
    model(tokens, labels=tokens).backward()
    assert set(model.state_dict()) == keys
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[k], atol=1e-6, rtol=1e-5)


def test_linear_cross_entropy_matches_plain_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(3, 50, 32, requires_grad=True)
    weight = torch.randn(1000, 32, requires_grad=True)
    labels = torch.randint(0, 1000, (3, 50))
    labels[:, :20] = -100
    ref = F.cross_entropy((hidden @ weight.T).flatten(0, 1), labels.flatten(), reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.37, (hidden, weight))
    import tune_models.loss as loss_mod

    old, loss_mod._CHUNK_ELEMENTS = loss_mod._CHUNK_ELEMENTS, 7000  # force several chunks
    try:
        got = linear_cross_entropy(hidden, weight, labels)
        grads = torch.autograd.grad(got * 0.37, (hidden, weight))
    finally:
        loss_mod._CHUNK_ELEMENTS = old
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels), ref.detach())


def test_packed_mask_isolates_documents():
    """A block-diagonal causal mask with per-document positions equals separate forwards."""
    cfg = CONFIGS["gqa"]
    _, model = _hf_pair(cfg)
    a, b = torch.randint(0, cfg.vocab_size, (1, 9)), torch.randint(0, cfg.vocab_size, (1, 14))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(9), torch.arange(14)])[None]
    doc = torch.cat([torch.zeros(9), torch.ones(14)]).long()
    mask = (doc[:, None] == doc[None, :]) & torch.ones(23, 23, dtype=torch.bool).tril()
    with torch.no_grad():
        got = model(packed, input_pos=pos, mask=mask[None])
        torch.testing.assert_close(got[:, :9], model(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(got[:, 9:], model(b), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "preset, expected",
    [(llama2_7b, 6_738_415_616), (llama2_13b, 13_015_864_320), (llama2_70b, 68_976_648_192)],
)
def test_preset_parameter_counts_are_the_published_ones(preset, expected):
    with torch.device("meta"):
        model = Llama2(preset())
    assert sum(p.numel() for p in model.parameters()) == expected


def test_tiny_preset_runs_forward_and_backward():
    torch.manual_seed(0)
    model = Llama2(llama2_tiny(vocab_size=100))
    model.init_weights()
    tokens = torch.randint(0, 100, (2, 12))
    loss = model(tokens, labels=tokens) / tokens.numel()
    loss.backward()
    # Untrained: loss close to uniform over the vocabulary.
    assert abs(loss.item() - torch.log(torch.tensor(100.0)).item()) < 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=64, n_heads=6), "dim (64) must be divisible by n_heads (6)"),
        (dict(dim=64, n_heads=4, n_kv_heads=3), "n_heads (4) must be divisible by n_kv_heads (3)"),
        (dict(dim=60, n_heads=4), "head_dim"),
        (dict(n_layers=0), "n_layers must be positive"),
    ],
)
def test_inconsistent_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Llama2Config(**kwargs)


def test_too_long_sequence_is_refused():
    model = Llama2(Llama2Config(vocab_size=16, dim=16, n_layers=1, n_heads=2, max_seq_len=8))
    with pytest.raises(ValueError, match="sequence length 9 exceeds max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="KV cache length 9 exceeds max_seq_len 8"):
        model.setup_caches(1, 9)
