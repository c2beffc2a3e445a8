"""DecoderConfig refuses values no model can have, in one ValueError line; the one dtype map."""

import pytest
import torch

from tune_models import DTYPES, dtype_of


def test_one_dtype_map_by_config_names_and_torch_spellings():
    assert DTYPES == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert [dtype_of(n) for n in ("bf16", "bfloat16", "torch.float16", "half", "FP32")] == \
        [torch.bfloat16, torch.bfloat16, torch.float16, torch.float16, torch.float32]
    assert dtype_of(torch.bfloat16) is torch.bfloat16
    for bad in ("int8", "fp8", torch.int64, "float64"):
        with pytest.raises(ValueError, match="^unknown dtype .*: use one of fp32, bf16, fp16$"):
            dtype_of(bad)



NAN, INF = float("nan"), float("inf")
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("kwargs, message", [
    # Values that built a model that generates nothing (NaN RoPE angles, NaN norms) ...
    (dict(rope_theta=NAN), "rope_theta must be a finite positive number, got nan"),
    (dict(rope_theta=-10000.0), "rope_theta must be a finite positive number, got -10000.0"),
    (dict(norm_eps=INF), "norm_eps must be a finite positive number, got inf"),
    (dict(ffn_dim_multiplier=NAN), "ffn_dim_multiplier must be a finite positive number, got nan"),
    (dict(rope_scaling={**LLAMA3_SCALING, "factor": NAN}),
     "rope_scaling['factor'] must be a finite positive number, got nan"),
    (dict(rope_scaling={**LLAMA3_SCALING, "high_freq_factor": INF}),
     "rope_scaling['high_freq_factor'] must be a finite positive number, got inf"),
    # ... sizes no model has, which spent memory and minutes before anything failed ...
    (dict(n_layers=1_000_000_000),
     "n_layers 1,000,000,000 is larger than any model's (at most 65,536): check the value"),
    (dict(vocab_size=2**40),
     "vocab_size 1,099,511,627,776 is larger than any model's (at most 16,777,216)"),
    (dict(ffn_dim_multiplier=1e12), "the FFN width from dim, ffn_dim_multiplier and "
                                    "multiple_of is 10,922,000,000,000,000, larger than any"),
    # ... and values of the wrong kind, which raised a TypeError deep inside
    (dict(n_layers="1e9"), "n_layers must be a positive integer, got '1e9'"),
    (dict(dim=64.0), "dim must be a positive integer, got 64.0"),
    (dict(multiple_of=0), "multiple_of must be positive, got 0"),
])
def test_values_no_model_has_are_one_value_error_line(kwargs, message):
    from tune_models import DecoderConfig

    with pytest.raises(ValueError) as caught:
        DecoderConfig(**kwargs)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_every_preset_is_within_the_bounds():
    from tune_models import MODELS

    for preset in MODELS.values():
        preset()  # the published models, 70B included, are far inside them
