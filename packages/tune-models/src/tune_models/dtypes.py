"""The floating-point dtypes tune trains, stores and casts weights in, by the names configs use.

One table for every package (training configs, ``tune generate --dtype``, checkpoint casts):
a rule written once, imported everywhere else.
"""

from __future__ import annotations

import torch

# Config spelling -> dtype. The order is the one messages list.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def dtype_of(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` (or torch's own spelling, ``"bfloat16"``, ``"torch.float16"``, ``"half"``)
    -> the torch dtype; a torch dtype of the table is returned as it is.

    Raises:
        ValueError: For anything that is not one of :data:`DTYPES`; the message lists them.
    """
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
    else:
        key = str(name).strip().lower()
        if key in DTYPES:
            return DTYPES[key]
        # torch's names (float32, bfloat16, half, ...) of the same dtypes, as config.json and
        # str(torch.bfloat16) write them
        found = getattr(torch, key.removeprefix("torch."), None)
        if isinstance(found, torch.dtype) and found in DTYPES.values():
            return found
    raise ValueError(f"unknown dtype '{name}': use one of {', '.join(DTYPES)}")
