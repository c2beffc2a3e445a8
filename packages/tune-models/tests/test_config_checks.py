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

