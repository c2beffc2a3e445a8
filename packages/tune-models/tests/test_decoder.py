"""The decoder against transformers (Llama, Mistral, Qwen2, Qwen3, Gemma 3, and Gemma 2 for the
soft-caps), the KV cache against the full forward, presets against the published parameter
counts."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hf_reference import family_twins, hf_and_native, hf_config, hf_to_native_reference

from tune_models import (
    Decoder,
    DecoderConfig,
    Llama2,
    Llama2Config,
    TiedOutput,
    gemma3_1b,
    gemma3_4b,
    gemma3_12b,
    gemma3_27b,
    linear_cross_entropy,
    llama2_7b,
    llama2_13b,
    llama2_70b,
    llama2_tiny,
    llama3_1_8b,
    llama3_1_70b,
    llama3_2_1b,
    llama3_2_3b,
    llama3_tiny,
    mistral_7b,
    qwen2_5_0_5b,
    qwen2_5_1_5b,
    qwen2_5_7b,
    qwen3_0_6b,
    qwen3_1_7b,
    qwen3_4b,
    qwen3_8b,
    qwen3_14b,
    qwen3_32b,
    rope_frequencies,
    uses_sliding_window,
)

transformers = pytest.importorskip("transformers")

# Gemma 2's layers (as Gemma 3's less QK-norm, one local layer to one global, one RoPE base)
# with its two soft-caps, small enough to bend the scores and logits of a tiny model.
GEMMA2 = DecoderConfig(
    vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
    norm_eps=1e-6, max_seq_len=128, sliding_window=8, sliding_window_pattern=2,
    norm_unit_offset=True, post_norms=True, activation="gelu_tanh", scale_embeddings=True,
    query_pre_attn_scalar=24, attn_logit_softcap=0.05, final_logit_softcap=1.5,
)
# name -> (config, transformers architecture): one tiny twin per family, plus multi-head
# attention, a head_dim that is not dim / n_heads, and Gemma 2's soft-capping.
CASES = {
    **family_twins(),
    "mha": (DecoderConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, multiple_of=32,
                          max_seq_len=128), "llama"),
    "head_dim": (DecoderConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                               head_dim=24, hidden_dim=96, max_seq_len=128), "llama"),
    "gemma2": (GEMMA2, "gemma2"),
}
# Longer than llama3's original context (48) and mistral's window (16).
SEQ_LEN = 70


def _hf_pair(name: str, seed: int = 0):
    cfg, architecture = CASES[name]
    return hf_and_native(cfg, seed, architecture)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name):
    cfg = CASES[name][0]
    hf, ours = _hf_pair(name)
    tokens = torch.randint(0, cfg.vocab_size, (3, SEQ_LEN))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == (3, SEQ_LEN, cfg.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_grads_match_transformers(name):
    """labels= gives HF's loss (as a sum) and the same parameter gradients."""
    cfg = CASES[name][0]
    hf, ours = _hf_pair(name)
    # Gemma's HF embedding has padding_idx 0 (<pad>): no gradient reaches that row from the
    # input. Real text never holds id 0, so the inputs here do not either.
    tokens = torch.randint(1, cfg.vocab_size, (2, 40))
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
    # With tied embeddings HF lists the matrix once (embed_tokens) and so do we: its gradient
    # sums the input and the output use in both.
    hf_grads = hf_to_native_reference(
        {k: p.grad for k, p in hf.named_parameters()}, cfg.n_layers, cfg.n_heads,
        cfg.n_kv_heads, tied=cfg.tie_embeddings,
    )
    assert set(hf_grads) == {k for k, _ in ours.named_parameters()}
    for key, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_grads[key], atol=1e-6, rtol=1e-4, msg=key)


@pytest.mark.parametrize("name", [*family_twins(), "gemma2"])
def test_kv_cache_decode_equals_full_forward(name):
    cfg = CASES[name][0]
    _, model = _hf_pair(name)
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ_LEN))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(batch_size=2, max_seq_len=SEQ_LEN + 8)
        prefill = model(tokens[:, :10], input_pos=torch.arange(10))
        steps = [model(tokens[:, i : i + 1], input_pos=torch.tensor([i]))
                 for i in range(10, SEQ_LEN)]
    incremental = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)
    # The caches are not part of the checkpoint.
    assert not any("kv_cache" in k for k in model.state_dict())
    model.clear_caches()
    assert not model.caches_are_enabled


def test_sliding_window_limits_what_a_token_sees():
    """Mistral: each layer reaches back window - 1 positions, so the last logits ignore every
    token more than n_layers * (window - 1) positions back, and only those."""
    cfg = CASES["mistral"][0]
    _, model = _hf_pair("mistral")
    reach = cfg.n_layers * (cfg.sliding_window - 1)
    tokens = torch.randint(0, cfg.vocab_size, (1, 40))
    first_seen = 40 - 1 - reach

    @torch.no_grad()
    def last_logits(m, changed):
        x = tokens.clone()
        x[0, changed] = (x[0, changed] + 1) % cfg.vocab_size
        return m(x)[0, -1]

    base = last_logits(model, [])
    torch.testing.assert_close(last_logits(model, list(range(first_seen))), base,
                               atol=1e-6, rtol=0)
    assert not torch.allclose(last_logits(model, [first_seen]), base, atol=1e-4)
    no_window = Decoder(dataclasses.replace(cfg, sliding_window=None)).eval()
    no_window.load_state_dict(model.state_dict())
    assert not torch.allclose(last_logits(no_window, [0]), last_logits(no_window, []), atol=1e-4)


def test_tied_embeddings_have_one_matrix_and_no_output_key():
    model = Decoder(llama3_tiny(vocab_size=128))
    keys = set(model.state_dict())
    assert "output.weight" not in keys and "tok_embeddings.weight" in keys
    assert isinstance(model.output, TiedOutput)
    assert model.output.weight is model.tok_embeddings.weight
    # It follows the embedding when that is replaced (load with assign=True, dtype moves).
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert model.output.weight is model.tok_embeddings.weight
    model = model.to(torch.float64)
    assert model.output.weight.dtype == torch.float64
    assert model.output.weight is model.tok_embeddings.weight
    # One parameter, counted once: llama3_tiny's params = untied ones - vocab x dim.
    untied = Decoder(dataclasses.replace(llama3_tiny(vocab_size=128), tie_embeddings=False))
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(p.numel() for p in untied.parameters()) - 128 * 64


def test_llama3_rope_scaling_matches_transformers_frequencies():
    """Slow pairs are divided by factor, fast ones kept, the band between blended."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = llama3_tiny()
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config(cfg))
    got = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    torch.testing.assert_close(got, expected.float(), atol=0, rtol=1e-6)
    plain = rope_frequencies(cfg.head_dim, cfg.rope_theta)
    ratio = plain / got
    factor = cfg.rope_scaling["factor"]
    assert (ratio == 1).any() and (ratio == factor).any()  # kept and slowed pairs
    assert ((ratio > 1) & (ratio < factor)).any()  # and at least one blended pair


def test_activation_checkpointing_keeps_grads_and_keys():
    torch.manual_seed(0)
    cfg = CASES["llama2"][0]
    model = Decoder(cfg)
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


@pytest.mark.parametrize("name", ["llama2", "mistral"])
def test_packed_mask_isolates_documents(name):
    """A block-diagonal causal mask with per-document positions equals separate forwards
    (for mistral, documents longer than its window: the window applies within each)."""
    cfg = CASES[name][0]
    _, model = _hf_pair(name)
    a, b = torch.randint(0, cfg.vocab_size, (1, 19)), torch.randint(0, cfg.vocab_size, (1, 24))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(19), torch.arange(24)])[None]
    doc = torch.cat([torch.zeros(19), torch.ones(24)]).long()
    mask = (doc[:, None] == doc[None, :]) & torch.ones(43, 43, dtype=torch.bool).tril()
    with torch.no_grad():
        got = model(packed, input_pos=pos, mask=mask[None])
        torch.testing.assert_close(got[:, :19], model(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(got[:, 19:], model(b), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "preset, expected",
    [
        (llama2_7b, 6_738_415_616), (llama2_13b, 13_015_864_320), (llama2_70b, 68_976_648_192),
        (llama3_1_8b, 8_030_261_248), (llama3_1_70b, 70_553_706_496),
        (llama3_2_1b, 1_235_814_400), (llama3_2_3b, 3_212_749_824),
        (mistral_7b, 7_241_732_096),
        (qwen2_5_0_5b, 494_032_768), (qwen2_5_1_5b, 1_543_714_304), (qwen2_5_7b, 7_615_616_512),
        (qwen3_0_6b, 596_049_920), (qwen3_1_7b, 1_720_574_976), (qwen3_4b, 4_022_468_096),
        (qwen3_8b, 8_190_735_360), (qwen3_14b, 14_768_307_200), (qwen3_32b, 32_762_123_264),
        (gemma3_1b, 999_885_952), (gemma3_4b, 3_880_263_168), (gemma3_12b, 11_766_034_176),
        (gemma3_27b, 27_009_346_304),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_preset_parameter_counts_are_the_published_ones(preset, expected):
    with torch.device("meta"):
        model = Decoder(preset())
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", list(family_twins()))
def test_tiny_presets_train_from_scratch(name):
    torch.manual_seed(0)
    cfg = dataclasses.replace(CASES[name][0], vocab_size=100)
    model = Decoder(cfg)
    model.init_weights()
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    assert len(biases) == (cfg.n_layers if cfg.qkv_bias else 0)
    assert all(not b.any() for b in biases)  # biases start at zero
    # Norm gains start at one: Gemma stores them minus one.
    gain = 0.0 if cfg.norm_unit_offset else 1.0
    assert all((p == gain).all() for n, p in model.named_parameters() if "norm" in n)
    tokens, labels = torch.randint(0, 100, (2, 2, 12))
    loss = model(tokens, labels=labels) / labels.numel()
    loss.backward()
    # Untrained: loss close to uniform over the vocabulary. (Random labels: with tied
    # embeddings an untrained model already favours its input token.)
    assert abs(loss.item() - torch.log(torch.tensor(100.0)).item()) < 0.5
    assert all(p.grad is not None for p in model.parameters())


def test_llama2_names_still_work():
    """Code written when tune knew Llama 2 only keeps importing and building it."""
    assert Llama2 is Decoder and Llama2Config is DecoderConfig
    cfg = llama2_tiny()
    assert (cfg.head_dim, cfg.qkv_bias, cfg.tie_embeddings, cfg.rope_scaling,
            cfg.sliding_window) == (16, False, False, None, None)
    keys = set(Decoder(cfg).state_dict())
    assert "output.weight" in keys and not any(k.endswith(".bias") for k in keys)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=64, n_heads=6), "dim (64) must be divisible by n_heads (6)"),
        (dict(dim=64, n_heads=4, n_kv_heads=3), "n_heads (4) must be divisible by n_kv_heads (3)"),
        (dict(dim=60, n_heads=4), "head_dim (15) must be positive and even"),
        (dict(dim=64, n_heads=4, head_dim=15), "head_dim (15) must be positive and even"),
        (dict(n_layers=0), "n_layers must be positive"),
        (dict(sliding_window=0), "sliding_window must be positive or None"),
        (dict(qkv_bias="yes"), "qkv_bias must be true or false"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
         "rope_scaling type 'yarn' is not supported (supported: llama3, linear)"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0}),
         "rope_scaling of type 'llama3' lacks 'original_max_position_embeddings'"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                            "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}),
         "low_freq_factor (4.0) must be below high_freq_factor (1.0)"),
    ],
)
def test_inconsistent_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DecoderConfig(**kwargs)


def test_explicit_head_dim_decouples_heads_from_width():
    cfg = DecoderConfig(vocab_size=16, dim=64, n_layers=1, n_heads=6, n_kv_heads=2, head_dim=16)
    model = Decoder(cfg)
    assert model.layers[0].attention.wqkv.weight.shape == ((6 + 2 * 2) * 16, 64)
    assert model.layers[0].attention.wo.weight.shape == (64, 6 * 16)


def test_too_long_sequence_is_refused():
    model = Decoder(DecoderConfig(vocab_size=16, dim=16, n_layers=1, n_heads=2, max_seq_len=8))
    with pytest.raises(ValueError, match="sequence length 9 exceeds max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="KV cache length 9 exceeds max_seq_len 8"):
        model.setup_caches(1, 9)


def test_gemma3s_local_and_global_layers_and_rope_bases():
    """Five local layers to one global: Gemma-3-1B's 26 layers have global layers 5, 11, 17,
    23; a Mistral has only local ones; a model without a window only global ones."""
    cfg = gemma3_1b()
    assert [i for i in range(26) if not uses_sliding_window(cfg, i)] == [5, 11, 17, 23]
    assert all(uses_sliding_window(mistral_7b(), i) for i in range(32))
    assert not any(uses_sliding_window(llama2_7b(), i) for i in range(32))
    # Local layers turn at base 10k, unscaled; global ones at 1M, slowed down by 8 (4B+).
    big = gemma3_4b()
    torch.testing.assert_close(rope_frequencies(256, big.rope_theta, big.rope_scaling),
                               rope_frequencies(256, 1e6) / 8)
    assert big.rope_local_theta == 10000.0 and cfg.rope_scaling is None


def test_final_softcap_is_in_the_chunked_loss_and_its_gradients():
    """linear_cross_entropy(softcap=c) is the loss of c * tanh(logits / c), and so are its
    gradients (the full-logit path as reference)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 30, 16, requires_grad=True)
    weight = torch.randn(500, 16, requires_grad=True)
    labels = torch.randint(0, 500, (2, 30))
    labels[:, :5] = -100
    capped = 3.0 * torch.tanh((hidden @ weight.T) / 3.0)
    ref = F.cross_entropy(capped.flatten(0, 1), labels.flatten(), reduction="sum")
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, labels, softcap=3.0)
    grads = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    assert (got - linear_cross_entropy(hidden, weight, labels)).abs() > 1.0  # it does cap


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(qk_norm="yes"), "qk_norm must be true or false"),
        (dict(activation="gelu"), "activation must be one of silu, gelu_tanh, got 'gelu'"),
        (dict(sliding_window_pattern=6), "sliding_window_pattern needs a sliding_window"),
        (dict(sliding_window=8, sliding_window_pattern=1),
         "sliding_window_pattern must be a whole number >= 2 or None, got 1"),
        (dict(rope_local_theta=1e4), "rope_local_theta is the RoPE base of sliding-window"),
        (dict(attn_logit_softcap=0.0), "attn_logit_softcap must be a finite positive number"),
        (dict(query_pre_attn_scalar=-1), "query_pre_attn_scalar must be a finite positive"),
        (dict(final_logit_softcap=float("inf")), "final_logit_softcap must be a finite"),
        (dict(rope_scaling={"rope_type": "linear"}),
         "rope_scaling of type 'linear' lacks 'factor'"),
    ],
)
def test_bad_values_of_the_new_fields_are_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        DecoderConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_gemma_scales_embeddings_by_sqrt_dim_rounded_to_the_weights_dtype():
    """In bf16 the first layer sees exactly what transformers' scaled embedding gives:
    sqrt(48) = 6.93 is rounded to bf16's 6.9375 before it multiplies."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    cfg = dataclasses.replace(family_twins()["gemma3"][0], dim=48, hidden_dim=96)
    torch.manual_seed(0)
    model = Decoder(cfg).to(torch.bfloat16).eval()
    model.init_weights()
    reference = Gemma3TextScaledWordEmbedding(cfg.vocab_size, cfg.dim, 0, cfg.dim ** 0.5)
    reference.load_state_dict({"weight": model.tok_embeddings.weight}, strict=False)
    tokens = torch.randint(1, cfg.vocab_size, (2, 16))
    seen = []
    model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(tokens)
        expected = reference.to(torch.bfloat16)(tokens)
    assert torch.equal(seen[0], expected)
    unrounded = (model.tok_embeddings.weight[tokens].float() * cfg.dim ** 0.5).bfloat16()
    assert not torch.equal(seen[0], unrounded)
