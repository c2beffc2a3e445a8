"""LoRA as a model transform: step 0 is the base model, the adapters' math and gradients,
merging, and one clear line for every bad request."""

import copy
import math

import pytest
import torch
from hf_reference import family_twins

from tune_models import (
    Decoder,
    LoRALinear,
    LoRASettings,
    apply_lora,
    llama2_tiny,
    load_lora_state_dict,
    lora_parameter_shapes,
    lora_settings,
    lora_state_dict,
    merge_lora,
    reset_lora_parameters,
)

TWINS = family_twins(vocab_size=128)
ALL = ["q", "k", "v", "o", "gate", "up", "down", "output"]


def _targets(config) -> list[str]:
    return [t for t in ALL if not (t == "output" and config.tie_embeddings)]


def _model(config, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(config)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.uniform_(0.5, 1.5)  # zero biases and unit gains would hide mistakes
            if "norm" in name and config.norm_unit_offset:
                p.sub_(1.0)  # Gemma stores a gain minus one: gains of 0.5 to 1.5 again
    return model.eval()


def _randomise_b(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b" in name:
                p.normal_(0, 0.05)


@pytest.mark.parametrize("family", list(TWINS))
def test_step_zero_reproduces_the_base_model_exactly(family):
    config = TWINS[family][0]
    model = _model(config)
    tokens = torch.randint(0, config.vocab_size, (2, 33))
    labels = torch.randint(0, config.vocab_size, (2, 33))
    with torch.no_grad():
        logits, loss = model(tokens), model(tokens, labels=labels)
    apply_lora(model, rank=8, alpha=16, dropout=0.1, targets=_targets(config))
    with torch.no_grad():
        assert torch.equal(model(tokens), logits)
        assert torch.equal(model(tokens, labels=labels), loss)
    # Training mode too: dropout is on the adapters' input only, and B is zero.
    model.train()
    with torch.no_grad():
        assert torch.equal(model(tokens), logits)


def test_adapters_start_as_peft_initialises_them():
    model = apply_lora(_model(llama2_tiny(vocab_size=64)), rank=8, alpha=16,
                       targets=["q", "v", "down"])
    for name, p in lora_state_dict(model).items():
        if ".lora_b" in name:
            assert torch.equal(p, torch.zeros_like(p)), name
        else:  # kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1 / math.sqrt(p.shape[1])
            assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound, name


@pytest.mark.parametrize("family", list(TWINS))
def test_adapters_add_scale_b_a_to_the_right_rows(family):
    """Logits with adapters == logits of the base whose weights are W + alpha/r * B @ A on the
    targeted rows, built by hand here (not by merge_lora)."""
    config = TWINS[family][0]
    model = _model(config)
    base = copy.deepcopy(model.state_dict())
    apply_lora(model, rank=4, alpha=12, targets=_targets(config))
    _randomise_b(model)
    adapters = lora_state_dict(model)
    h, kv, d = config.n_heads, config.n_kv_heads, config.head_dim
    rows = {"q": slice(0, h * d), "k": slice(h * d, (h + kv) * d),
            "v": slice((h + kv) * d, (h + 2 * kv) * d)}
    by_hand = {k: v.clone() for k, v in base.items()}
    for key, a in adapters.items():
        if ".lora_a" not in key:
            continue
        b = adapters[key.replace(".lora_a", ".lora_b")]
        module, _, part = key.partition(".lora_a")
        target = by_hand[module + ".weight"]
        target[rows[part[1:]] if part else slice(None)] += 3.0 * (b @ a)
    reference = Decoder(config).eval()
    reference.load_state_dict(by_hand)
    tokens = torch.randint(0, config.vocab_size, (2, 40))
    labels = torch.randint(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(tokens, labels=labels),
                                   reference(tokens, labels=labels), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama2", "qwen2"])
def test_only_adapters_train_and_their_gradients_are_right(family):
    """Gradients of A and B equal autograd through W + s * B @ A written as one expression,
    for the fused q/k/v slices, the single projections and the output adapter in the loss."""
    config = TWINS[family][0]
    model = _model(config)
    base = copy.deepcopy(model)
    apply_lora(model, rank=4, alpha=8, targets=_targets(config))
    _randomise_b(model)
    tokens = torch.randint(0, config.vocab_size, (2, 30))
    labels = torch.randint(0, config.vocab_size, (2, 30))
    model(tokens, labels=labels).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)

    leaves = {k: v.detach().clone().requires_grad_() for k, v in lora_state_dict(model).items()}
    weights = dict(base.named_parameters())
    h, kv, d = config.n_heads, config.n_kv_heads, config.head_dim
    spans = {"q": (0, h * d), "k": (h * d, (h + kv) * d), "v": ((h + kv) * d, (h + 2 * kv) * d)}
    for module in {k.partition(".lora_")[0] for k in leaves}:
        weight = weights[module + ".weight"].detach()
        if module.endswith("wqkv"):
            pieces = [weight[lo:hi] + 2.0 * leaves[f"{module}.lora_b.{p}"]
                      @ leaves[f"{module}.lora_a.{p}"] for p, (lo, hi) in spans.items()]
            weights[module + ".weight"] = torch.cat(pieces)
        else:
            weights[module + ".weight"] = weight + 2.0 * leaves[module + ".lora_b"] \
                @ leaves[module + ".lora_a"]
    loss = torch.func.functional_call(base, weights, (tokens,), {"labels": labels})
    loss.backward()
    ours = dict(model.named_parameters())
    for key, leaf in leaves.items():
        torch.testing.assert_close(ours[key].grad, leaf.grad, atol=1e-5, rtol=1e-4, msg=key)


def test_dropout_acts_on_the_adapter_path_only():
    config = llama2_tiny(vocab_size=64)
    model = apply_lora(_model(config), rank=4, alpha=8, dropout=0.5, targets=["q", "v", "o"])
    _randomise_b(model)
    tokens = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        eval_logits = model.eval()(tokens)
        model.train()
        a, b = model(tokens), model(tokens)
    assert not torch.equal(a, b) and not torch.equal(a, eval_logits)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b" in name:
                p.zero_()
        # With B = 0 the adapters add nothing: training mode changes nothing either.
        assert torch.equal(model(tokens), model.eval()(tokens))


@pytest.mark.parametrize("family", list(TWINS))
def test_state_dict_names_and_shapes_are_the_documented_schema(family):
    config = TWINS[family][0]
    model = apply_lora(_model(config), rank=3, alpha=3, targets=_targets(config))
    settings = lora_settings(model)
    assert settings == LoRASettings(3, 3.0, 0.0, tuple(_targets(config)))
    shapes = {k: tuple(v.shape) for k, v in lora_state_dict(model).items()}
    assert shapes == lora_parameter_shapes(config, settings)
    h, kv, d = config.n_heads, config.n_kv_heads, config.head_dim
    assert shapes["layers.1.attention.wqkv.lora_a.q"] == (3, config.dim)
    assert shapes["layers.1.attention.wqkv.lora_b.q"] == (h * d, 3)
    assert shapes["layers.1.attention.wqkv.lora_b.k"] == (kv * d, 3)
    assert shapes["layers.0.feed_forward.w2.lora_a"] == (3, config.hidden_dim)
    # The base keys are the native schema, unchanged: a base checkpoint loads as it is.
    base_keys = set(Decoder(config).state_dict())
    assert {k for k in model.state_dict() if ".lora_" not in k} == base_keys


def test_on_the_meta_device_adapters_wait_for_reset():
    config = llama2_tiny(vocab_size=64)
    with torch.device("meta"):
        model = Decoder(config)
    apply_lora(model, rank=2, alpha=4, targets=["q", "down"])
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    reset_lora_parameters(model)
    for name, p in lora_state_dict(model).items():
        assert torch.isfinite(p).all() and (p.abs().sum() == 0) == (".lora_b" in name), name


def test_load_lora_state_dict_round_trips_and_refuses_another_base():
    config = llama2_tiny(vocab_size=64)
    trained = apply_lora(_model(config, 1), rank=4, alpha=8, targets=["q", "v"])
    _randomise_b(trained)
    fresh = apply_lora(_model(config, 1), rank=4, alpha=8, targets=["q", "v"])
    load_lora_state_dict(fresh, lora_state_dict(trained))
    tokens = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert torch.equal(fresh(tokens), trained(tokens))

    wider = llama2_tiny(vocab_size=64)
    wider.dim, wider.hidden_dim, wider.head_dim = 128, None, None
    wider.__post_init__()
    other = apply_lora(Decoder(wider), rank=4, alpha=8, targets=["q", "v"])
    with pytest.raises(ValueError, match=r"has shape \(4, 64\), this model's is \(4, 128\): "
                                         "the adapter was made for another base model"):
        load_lora_state_dict(other, lora_state_dict(trained))
    fewer = apply_lora(_model(config, 1), rank=4, alpha=8, targets=["q", "v", "o"])
    with pytest.raises(ValueError, match="the adapter has no 'layers.0.attention.wo.lora_a'"):
        load_lora_state_dict(fewer, lora_state_dict(trained))
    with pytest.raises(ValueError, match="targets: q, v"):
        load_lora_state_dict(trained, lora_state_dict(fewer))


@pytest.mark.parametrize("family", list(TWINS))
def test_merged_weights_give_the_logits_of_base_plus_adapter(family):
    config = TWINS[family][0]
    model = apply_lora(_model(config), rank=4, alpha=8, targets=_targets(config))
    _randomise_b(model)
    tokens = torch.randint(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        expected = model(tokens)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert not any(p.requires_grad for p in merged.parameters())
    plain = Decoder(config).eval()
    plain.load_state_dict(merged.state_dict(), strict=True)  # a native checkpoint
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), expected, atol=1e-5, rtol=0)


def test_merging_a_bf16_model_keeps_bf16_and_adds_in_fp32():
    config = llama2_tiny(vocab_size=64)
    model = apply_lora(_model(config).to(torch.bfloat16), rank=4, alpha=8, targets=["v"])
    _randomise_b(model)
    a = model.layers[0].attention.wqkv.lora_a["v"].float()
    b = model.layers[0].attention.wqkv.lora_b["v"].float()
    w = model.layers[0].attention.wqkv.weight.float()
    lo = (config.n_heads + config.n_kv_heads) * config.head_dim
    merge_lora(model)
    merged = model.layers[0].attention.wqkv.weight
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged[lo:], (w[lo:] + 2.0 * b @ a).to(torch.bfloat16))
    assert torch.equal(merged[:lo], w[:lo].to(torch.bfloat16))


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "lora_rank must be a positive integer, got 0"),
    ({"rank": 2.5}, "lora_rank must be a positive integer, got 2.5"),
    ({"alpha": -1}, "lora_alpha must be a positive number, got -1"),
    ({"dropout": 1.0}, r"lora_dropout must be in \[0, 1\), got 1.0"),
    ({"targets": ["q", "q_proj"]}, "unknown LoRA target module 'q_proj' \\(did you mean 'q'\\?\\);"
                                   " choose from q, k, v, o, gate, up, down, output"),
    ({"targets": ["qq"]}, "unknown LoRA target module 'qq' \\(did you mean 'q'\\?\\)"),
    ({"targets": []}, "lora_target_modules is empty"),
])
def test_bad_settings_are_one_line(kwargs, message):
    settings = {"rank": 8, "alpha": 16, "targets": ["q", "v"], **kwargs}
    model = _model(llama2_tiny(vocab_size=64))
    with pytest.raises(ValueError, match=message) as error:
        apply_lora(model, **settings)
    assert "\n" not in str(error.value)
    assert not any(p.requires_grad is False for p in model.parameters())  # untouched


def test_output_adapter_with_tied_embeddings_and_applying_twice_are_refused():
    tied = _model(TWINS["qwen2"][0])
    with pytest.raises(ValueError, match="ties it to the input embeddings.*remove 'output'"):
        apply_lora(tied, rank=2, alpha=2, targets=["q", "output"])
    model = apply_lora(_model(llama2_tiny(vocab_size=64)), rank=2, alpha=2, targets=["q"])
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, rank=2, alpha=2, targets=["v"])


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_qk_and_gemma_norms_are_neither_adapted_nor_quantised(family):
    from tune_models import RMSNorm, quantize_base

    config = TWINS[family][0]
    model = apply_lora(_model(config), rank=4, alpha=8, targets=_targets(config))
    quantize_base(model, "nf4")
    norms = {n: m for n, m in model.named_modules() if isinstance(m, RMSNorm)}
    per_layer = 4 + 2 * config.post_norms  # attention_norm, ffn_norm, q_norm, k_norm (+2)
    assert len(norms) == config.n_layers * per_layer + 1
    assert "layers.0.attention.q_norm" in norms and "layers.0.attention.k_norm" in norms
    for module in norms.values():
        assert module.weight.dtype == torch.float32 and not module.weight.requires_grad
    assert not any("norm" in key for key in lora_state_dict(model))
